"""The ``vllm.general_plugins`` entry point (pyproject.toml): vLLM calls :func:`register` in each of its
processes at start. Like vLLM's own filesystem resolver, ours is registered only when configured:

* ``VBLORA_RS_VLLM_ADAPTER_DIRS``: folders of VB-LoRA adapters, ``os.pathsep``-separated, searched in order
  for ``NAME`` (a PEFT adapter folder, full or top-K, or a packed file) or ``NAME.safetensors`` (packed);
* ``VBLORA_RS_VLLM_CACHE_DIR``: where the LoRA conversions are kept (default: ``vllm-lora`` in the package's
  cache folder, ``$VBLORA_RS_CACHE`` or ``~/.cache/vblora_rs``);
* ``VBLORA_RS_VLLM_CACHE_MAX_BYTES``: the cache's bound (default 4 GiB), least recently used entries evicted;
* ``VBLORA_RS_VLLM_MAX_LORA_RANK``: the server's ``--max-lora-rank`` where it is not on the command line.

The server calls resolvers only with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=1`` (vLLM's rule for every resolver).
"""

from __future__ import annotations

import os

from ..errors import VBLoRAError
from .lora_cache import ADAPTER_DIRS_ENV, adapter_dirs


def register() -> None:
    """Register the VB-LoRA resolver with vLLM when ``VBLORA_RS_VLLM_ADAPTER_DIRS`` names folders."""
    dirs = adapter_dirs()
    if not dirs:
        return
    missing = [d for d in dirs if not os.path.isdir(d)]
    if missing:  # vLLM's own resolver refuses a bad folder at start too: better than 404s at every request
        raise VBLoRAError(f"{ADAPTER_DIRS_ENV}: {', '.join(missing)} is not a folder")
    from vllm.lora.resolver import LoRAResolverRegistry

    from .resolver import RESOLVER_NAME, VBLoRAResolver

    LoRAResolverRegistry.register_resolver(RESOLVER_NAME, VBLoRAResolver(dirs))
