"""Safetensors files of torch tensors: reading one with errors that name it, and the float dtypes adapters hold."""

from __future__ import annotations

import os
from typing import Optional

import torch
from safetensors import SafetensorError, safe_open

from ..errors import VBLoRAError

# the dtypes a bank, logits or top-K weights may have (PEFT's adapters are float32, float16 or bfloat16)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_float(t: torch.Tensor, key: str, path: Optional[str] = None) -> None:
    """Raise VBLoRAError naming ``key`` (and the file ``path``) unless ``t`` is float32, float16 or bfloat16."""
    if t.dtype not in FLOAT_DTYPES:
        where = f"{path}: " if path else ""
        raise VBLoRAError(f"{where}tensor {key} has dtype {t.dtype}, expected float32, float16 or bfloat16")


# Files up to this size are read in one piece and parsed by safetensors' ``load``: an adapter of SmolLM2's shape
# (841 tensors, 330 KiB) in 4 ms instead of 18 ms through ``safe_open``'s ``get_tensor`` per tensor (whose Python
# storage slicing is most of the cost). Larger files go tensor by tensor: ``load`` holds the file twice at once.
WHOLE_FILE_BYTES = 64 << 20


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, by key; a damaged file raises VBLoRAError naming it."""
    from safetensors.torch import load

    try:
        if os.path.getsize(path) <= WHOLE_FILE_BYTES:
            with open(path, "rb") as fh:
                tensors = load(fh.read())
            return {key: tensors[key] for key in sorted(tensors)}  # safe_open's order
        with safe_open(path, framework="pt") as fh:
            return {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except FileNotFoundError as exc:
        raise VBLoRAError(f"{path}: file not found") from exc
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise VBLoRAError(f"{path}: not a readable safetensors file: {exc}") from exc
