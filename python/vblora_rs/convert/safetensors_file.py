"""Safetensors files of torch tensors: reading one with errors that name it, and the float dtypes adapters hold."""

from __future__ import annotations

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


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; a damaged file raises VBLoRAError naming it."""
    try:
        with safe_open(path, framework="pt") as fh:
            return {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except FileNotFoundError as exc:
        raise VBLoRAError(f"{path}: file not found") from exc
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise VBLoRAError(f"{path}: not a readable safetensors file: {exc}") from exc
