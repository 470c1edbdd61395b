"""The vLLM ``LoRAResolver`` for VB-LoRA adapters (imported only by :mod:`.plugin`, when vLLM loads it, and by
:mod:`.offline`).

vLLM's OpenAI server asks its registered resolvers for a model name it does not know (with
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=1``), one name at a time. This resolver answers for the adapters in its
folders: it converts the adapter to LoRA through the cache (in a worker thread: the server's event loop keeps
serving), checks the result against the served model and returns a ``LoRARequest`` for the converted folder.
An adapter it does not have gives None (the server answers 404, or asks the next resolver); an adapter it has
but cannot serve raises :class:`~vblora_rs.errors.VBLoRAError`, a ``ValueError``, which the server turns into a
400 answer to that request alone, its message naming the adapter (and the module and both shapes).
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from collections.abc import Sequence
from typing import Optional

from vllm.lora.request import LoRARequest
from vllm.lora.resolver import LoRAResolver

from ..errors import VBLoRAError
from .base_model import BaseModel, check_lora, read_base
from .lora_cache import LoraCache, adapter_dirs, find_adapter

MAX_LORA_RANK_ENV = "VBLORA_RS_VLLM_MAX_LORA_RANK"
RESOLVER_NAME = "VB-LoRA Resolver"


def configured_max_lora_rank(argv: Optional[Sequence[str]] = None) -> int:
    """The server's ``max_lora_rank``, which vLLM does not pass to resolvers: ``$VBLORA_RS_VLLM_MAX_LORA_RANK``,
    else the ``--max-lora-rank`` of this process's command line (the OpenAI server's), else vLLM's default."""
    text = os.environ.get(MAX_LORA_RANK_ENV)
    args = list(sys.argv if argv is None else argv)
    if not text:
        for i, arg in enumerate(args):
            if arg == "--max-lora-rank" and i + 1 < len(args):
                text = args[i + 1]
            elif arg.startswith("--max-lora-rank="):
                text = arg.split("=", 1)[1]
    if text:
        try:
            return int(text)
        except ValueError:
            raise VBLoRAError(f"max_lora_rank {text!r} is not a whole number") from None
    from vllm.config.lora import LoRAConfig

    return int(LoRAConfig.__dataclass_fields__["max_lora_rank"].default)


def servable_modules(base: BaseModel) -> Optional[set[str]]:
    """Last names of the modules vLLM can serve a LoRA on for ``base``'s architecture: the model class's packed
    modules and their parts, its embedding modules, and the base's other linear layers (vLLM makes every linear
    layer of a LoRA-capable model LoRA-capable), less vocabulary-sized layers it does not list. Empty where the
    architecture supports no LoRA; None where vLLM does not know it (then only the shapes are checked)."""
    from vllm.model_executor.models import ModelRegistry
    from vllm.model_executor.models.interfaces import supports_lora

    for arch in base.architectures:
        cls = ModelRegistry._try_load_model_cls(arch)
        if cls is None:
            continue
        if not supports_lora(cls):
            return set()
        packed = dict(getattr(cls, "packed_modules_mapping", {}) or {})
        embedding = set(getattr(cls, "embedding_modules", {}) or {})
        names = set(packed) | {part for parts in packed.values() for part in parts} | embedding
        vocab = _vocab_size(base)
        for module, (out_features, in_features) in base.shapes.items():
            last = module.rsplit(".", 1)[-1]
            if vocab in (out_features, in_features) and last not in embedding:
                continue
            names.add(last)
        return names
    return None


def _vocab_size(base: BaseModel) -> Optional[int]:
    import json

    try:
        with open(os.path.join(base.folder, "config.json"), encoding="utf-8") as fh:
            config = json.load(fh)
    except (OSError, ValueError):
        return None
    value = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    return int(value) if isinstance(value, int) else None


class VBLoRAResolver(LoRAResolver):
    """Serves the VB-LoRA adapters of ``dirs`` by name, converted through ``cache``."""

    def __init__(
        self,
        dirs: Optional[Sequence[str]] = None,
        cache: Optional[LoraCache] = None,
        max_lora_rank: Optional[int] = None,
    ) -> None:
        self.dirs = list(adapter_dirs() if dirs is None else dirs)
        self.cache = cache or LoraCache()
        self.max_lora_rank = configured_max_lora_rank() if max_lora_rank is None else max_lora_rank
        self._bases: dict[str, tuple[BaseModel, Optional[set[str]]]] = {}
        self._bases_lock = threading.Lock()

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> Optional[LoRARequest]:
        path = find_adapter(self.dirs, lora_name)
        if path is None:
            return None
        return await asyncio.to_thread(self.request_for, base_model_name, lora_name, path)

    def resolve_now(self, base_model_name: str, lora_name: str) -> Optional[LoRARequest]:
        """:meth:`resolve_lora` for synchronous callers (the offline ``LLM`` API)."""
        path = find_adapter(self.dirs, lora_name)
        return None if path is None else self.request_for(base_model_name, lora_name, path)

    def base(self, name: str) -> tuple[BaseModel, Optional[set[str]]]:
        with self._bases_lock:
            if name not in self._bases:
                base = read_base(name)
                self._bases[name] = (base, servable_modules(base))
            return self._bases[name]

    def request_for(self, base_model_name: str, lora_name: str, path: str) -> LoRARequest:
        """Convert (or find in the cache) and check the adapter at ``path``; VBLoRAError naming it otherwise."""
        try:
            converted = self.cache.get(path)
        except VBLoRAError as exc:
            raise VBLoRAError(f"adapter '{lora_name}': {exc}") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:  # a file the readers did not expect
            raise VBLoRAError(f"adapter '{lora_name}': cannot be converted ({type(exc).__name__}: {exc})") from None
        base, servable = self.base(base_model_name)
        check_lora(lora_name, converted.folder, base, self.max_lora_rank, servable)
        return LoRARequest(
            lora_name=lora_name,
            lora_int_id=int(converted.key[:15], 16) + 1,  # the server renumbers; offline, one id per content
            lora_path=converted.folder,
            base_model_name=base_model_name,
        )
