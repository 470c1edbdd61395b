"""PEFT's adapter weights file (``adapter_model.safetensors``) as files: its key names, reading it with errors
that name the file, and the one atomic safetensors writer.

Keys and dtypes are PEFT's: full mode stores ``<module>.vblora_logits_A`` / ``_B``; top-K mode
(``save_only_topk_weights``) stores ``<module>.vblora_logits_A_topk_indices`` in the smallest integer dtype PEFT
picks for ``num_vectors`` and ``..._topk_weights`` with the first k-1 softmax weights (the last one is 1 minus
their sum). Both store ``base_model.vblora_vector_bank``. Saving and loading adapters of a model is PEFT's
(``save_pretrained`` / ``from_pretrained``, through the tuner's state-dict hooks in :mod:`vblora_rs.tuner.model`).
"""

from __future__ import annotations

import os
import tempfile

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import BANK_KEY, MODEL_PREFIX, TOPK_INDICES, TOPK_WEIGHTS, WEIGHTS_NAME
from .errors import VBLoRAError

__all__ = [
    "BANK_KEY",
    "MODEL_PREFIX",
    "TOPK_INDICES",
    "TOPK_WEIGHTS",
    "WEIGHTS_NAME",
    "read_safetensors",
    "write_safetensors_atomically",
]


def write_safetensors_atomically(tensors: dict[str, torch.Tensor], target: str) -> None:
    """``tensors`` saved to ``target`` via a temporary file in the same folder: whole or not at all."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(target)), prefix=".adapter_model.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; a damaged file raises VBLoRAError naming it."""
    try:
        with safe_open(path, framework="pt") as fh:
            return {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except FileNotFoundError as exc:
        raise VBLoRAError(f"{path}: file not found") from exc
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise VBLoRAError(f"{path}: not a readable safetensors file: {exc}") from exc
