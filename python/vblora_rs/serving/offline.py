"""VB-LoRA adapters by name in vLLM's offline API: ``llm.generate(prompts, params, lora_request=
lora_request(llm, "customer-42"))``. The same resolver as the server's, told the engine's own model and
``max_lora_rank``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Optional

from ..errors import VBLoRAError
from .lora_cache import ADAPTER_DIRS_ENV, LoraCache

if TYPE_CHECKING:
    from vllm.lora.request import LoRARequest

    from .resolver import VBLoRAResolver

_ATTRIBUTE = "_vblora_rs_resolvers"  # resolvers kept on the LLM object: they live and die with its engine


def resolver_for(llm: Any, dirs: Optional[Sequence[str]] = None, cache: Optional[LoraCache] = None) -> VBLoRAResolver:
    """A resolver for the engine of ``llm`` (a ``vllm.LLM``), over ``dirs`` (default: the environment's)."""
    from .lora_cache import adapter_dirs
    from .resolver import VBLoRAResolver

    config = llm.llm_engine.vllm_config
    if config.lora_config is None:
        raise VBLoRAError("this vllm.LLM was built without enable_lora=True; it serves no adapter")
    folders = tuple(adapter_dirs() if dirs is None else dirs)
    kept: dict[tuple[tuple[str, ...], int], VBLoRAResolver] = llm.__dict__.setdefault(_ATTRIBUTE, {})
    key = (folders, id(cache))
    if key not in kept:
        kept[key] = VBLoRAResolver(folders, cache, max_lora_rank=config.lora_config.max_lora_rank)
    return kept[key]


def lora_request(
    llm: Any, name: str, dirs: Optional[Sequence[str]] = None, cache: Optional[LoraCache] = None
) -> LoRARequest:
    """The ``LoRARequest`` serving the VB-LoRA adapter ``name`` on ``llm``; VBLoRAError if it is not found or
    cannot be served there."""
    resolver = resolver_for(llm, dirs, cache)
    request = resolver.resolve_now(llm.llm_engine.vllm_config.model_config.model, name)
    if request is None:
        where = ", ".join(resolver.dirs) or f"(none: set {ADAPTER_DIRS_ENV})"
        raise VBLoRAError(f"adapter '{name}': not found in {where}")
    return request
