"""Consistent VB-LoRA adapters listing a huge number of tiny modules (issue 13: a 6 MB packed file naming 300k
modules must not cost minutes and gigabytes).

Files are written by the project's own writers, so they are valid: the packed file by the Rust encoder
(``_native.encode_packed``, the writer under :func:`vblora_rs.convert.packed.write_packed`, called here with the flat
arrays it takes so that writing a million modules does not itself cost a Python object per module), the PEFT
folder by ``safetensors.numpy`` with PEFT's keys. Torch-free, so a measured CLI run is not charged for torch
imported by its fixture.

    python tests/support/many_modules.py packed OUT_DIR N     # OUT_DIR/adapter_packed.safetensors, N modules
    python tests/support/many_modules.py peft OUT_DIR N       # OUT_DIR/adapter_config.json + adapter_model.safetensors
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
from vblora_rs import _native
from vblora_rs.storage.adapter_config import AdapterConfig as VBLoRAConfig
from vblora_rs.storage.names import CONFIG_NAME, PACKED_WEIGHTS_NAME, WEIGHTS_NAME

PREFIX = "base_model.model."
BANK_KEY = "base_model.vblora_vector_bank"
NUM_VECTORS, VECTOR_LENGTH, R, TOPK = 16, 4, 1, 2
TARGET = "fc"


def module_name(i: int) -> str:
    """The path of module ``i``: what a model with that many ``layers.i.fc`` Linear layers would name it."""
    return f"layers.{i}.{TARGET}"


def config(**overrides: object) -> VBLoRAConfig:
    fields: dict = dict(
        r=R, num_vectors=NUM_VECTORS, vector_length=VECTOR_LENGTH, topk=TOPK, target_modules=[TARGET],
        save_only_topk_weights=True,
    )  # fmt: skip
    fields.update(overrides)
    return VBLoRAConfig(**fields)


def _topk(rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``rows`` valid top-2 rows: two distinct indices, largest weight first (k-1 = 1 stored weight in [0.5, 1])."""
    rng = np.random.default_rng(seed)
    first = rng.integers(0, NUM_VECTORS, rows)
    second = (first + 1 + rng.integers(0, NUM_VECTORS - 1, rows)) % NUM_VECTORS
    indices = np.stack([first, second], axis=1).astype(np.int64)
    weights = rng.uniform(0.5, 1.0, (rows, TOPK - 1)).astype(np.float32)
    return indices, weights


def _bank(seed: int) -> np.ndarray:
    return np.random.default_rng(seed + 1).uniform(-0.02, 0.02, (NUM_VECTORS, VECTOR_LENGTH)).astype(np.float32)


def write_packed_file(folder: str, n_modules: int, seed: int = 0, in_sub: int = 1, out_sub: int = 1) -> str:
    """``folder/adapter_packed.safetensors`` listing ``n_modules`` modules ``layers.i.fc`` of weight
    ``(out_sub * L, in_sub * L)``; returns its path."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, PACKED_WEIGHTS_NAME)
    cfg = config()
    modules = [(module_name(i), R, in_sub, out_sub) for i in range(n_modules)]
    indices, weights = _topk(n_modules * R * (in_sub + out_sub), seed)
    metadata = {
        "indices_dtype": "uint8",
        "key_prefix": PREFIX,
        "config": json.dumps(cfg.to_dict(), sort_keys=True, separators=(",", ":")),
    }
    _native.encode_packed(path, metadata, modules, indices, weights, _bank(seed), [])
    return path


def write_peft_folder(folder: str, n_modules: int, seed: int = 0) -> str:
    """A PEFT top-K adapter folder (``save_only_topk_weights``) with ``n_modules`` modules, 4 tensors each;
    returns the weights file's path."""
    from safetensors.numpy import save_file

    os.makedirs(folder, exist_ok=True)
    indices, weights = _topk(n_modules * 2 * R, seed)
    idx = indices.astype(np.uint8).reshape(n_modules, 2, R, 1, TOPK)
    w = weights.reshape(n_modules, 2, R, 1, TOPK - 1)
    tensors: dict[str, np.ndarray] = {BANK_KEY: _bank(seed)}
    for i in range(n_modules):
        base = f"{PREFIX}{module_name(i)}"
        tensors[f"{base}.vblora_logits_A_topk_indices"] = idx[i, 0]  # (r, in_sub, k)
        tensors[f"{base}.vblora_logits_A_topk_weights"] = w[i, 0]
        tensors[f"{base}.vblora_logits_B_topk_indices"] = idx[i, 1].reshape(1, R, TOPK)  # (out_sub, r, k)
        tensors[f"{base}.vblora_logits_B_topk_weights"] = w[i, 1].reshape(1, R, TOPK - 1)
    path = os.path.join(folder, WEIGHTS_NAME)
    save_file(tensors, path, metadata={"format": "pt"})
    config().save_pretrained(folder)
    assert os.path.isfile(os.path.join(folder, CONFIG_NAME))
    return path


if __name__ == "__main__":
    kind, out, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    written = write_packed_file(out, count) if kind == "packed" else write_peft_folder(out, count)
    print(f"{written}: {os.path.getsize(written):,d} bytes, {count:,d} modules")
