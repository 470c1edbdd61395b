"""LoRA factors of a packed adapter, computed for every module at once (for ``vblora to-lora``).

``adapter_files.module_factors`` builds each module's A and B with a few torch calls per module: fine for a
model's few hundred layers, minutes and gigabytes for a file listing 300k modules. Here the sub-vectors of the
whole file are computed in two calls on the decoder's flat arrays (PEFT's compute form, then the bank gather),
the B grids are transposed together, and each module's ``A (r, in)`` and ``B (out, r)`` are views of two
buffers: the same values bit for bit (every step is row by row), with nothing per module but two numpy views.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..config import MODEL_PREFIX
from ..errors import VBLoRAError
from ..packed_arrays import PackedArrays
from ..storage import finite

__all__ = ["NUMPY_DTYPES", "packed_lora_tensors"]

# safetensors dtypes numpy holds (safetensors.numpy writes these); an extra of another dtype (BF16, F8)
# leaves the export to the tensor-per-module path
NUMPY_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "U64": np.uint64, "I32": np.int32,
    "U32": np.uint32, "I16": np.int16, "U16": np.uint16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}  # fmt: skip


def _sub_vectors(arrays: PackedArrays) -> np.ndarray:
    """``(S, L)`` float32: each sub-vector as PEFT's forward builds it from the stored top-K."""
    import torch

    from .. import ops
    from ..tuner import topk_table as compact

    indices = torch.from_numpy(arrays.indices)
    weights = torch.from_numpy(arrays.weights)
    bank = torch.from_numpy(arrays.bank)
    if arrays.weights_dtype == "bfloat16":
        weights = weights.view(torch.bfloat16)
    if arrays.bank_dtype == "bfloat16":
        bank = bank.view(torch.bfloat16)
    idx, w = compact.compute_form(indices, weights, arrays.config.num_vectors)
    return ops.low_rank_from_topk(idx, w, bank, name="vblora_logits").numpy()


def packed_lora_tensors(arrays: PackedArrays) -> Optional[dict[str, np.ndarray]]:
    """``base_model.model.<module>.lora_A.weight (r, in)`` and ``.lora_B.weight (out, r)`` in float32 for every
    module (sorted by name, as PEFT lists them), plus the extras; None when an extra has a dtype numpy lacks.
    A factor that overflows float32 is an error naming the file and tensor."""
    extras = {}
    for name, dtype, shape, data in arrays.extras:
        if dtype not in NUMPY_DTYPES:
            return None
        extras[name] = np.frombuffer(data, dtype=NUMPY_DTYPES[dtype]).reshape(shape)
    r, L = arrays.config.r, arrays.config.vector_length
    rows = _sub_vectors(arrays)
    in_sub, out_sub = arrays.dims[:, 1], arrays.dims[:, 2]
    # each module's rows: A grid (r * in_sub) then B grid (out_sub * r); split them into two buffers
    a_len, b_len = r * in_sub, out_sub * r
    is_b = np.repeat(np.tile(np.array([False, True]), len(a_len)), np.column_stack([a_len, b_len]).reshape(-1))
    a_rows = np.ascontiguousarray(rows[~is_b])  # module after module: (r, in_sub, L) each, i.e. A (r, in_sub * L)
    # B grids (out_sub, r, L) -> (out_sub, L, r), all at once since r is the adapter's: B (out_sub * L, r) each
    b_rows = np.ascontiguousarray(rows[is_b].reshape(-1, r, L).transpose(0, 2, 1)).reshape(-1, r)
    for label, buffer in (("lora_A", a_rows), ("lora_B", b_rows)):
        if finite.overflow_problem(buffer):
            _raise_overflow(arrays, label, a_rows if label == "lora_A" else b_rows)
    a_end, b_end = np.cumsum(a_len * L), np.cumsum(out_sub * L)
    out: dict[str, np.ndarray] = {}
    order = sorted(range(len(arrays.modules)), key=[m[0] for m in arrays.modules].__getitem__)
    for i in order:
        name = arrays.modules[i][0]
        a_stop, b_stop = int(a_end[i]), int(b_end[i])
        a = a_rows.reshape(-1)[a_stop - int(a_len[i]) * L : a_stop].reshape(r, -1)
        out[f"{MODEL_PREFIX}{name}.lora_A.weight"] = a
        out[f"{MODEL_PREFIX}{name}.lora_B.weight"] = b_rows[b_stop - int(out_sub[i]) * L : b_stop]
    out.update(extras)
    return out


def _raise_overflow(arrays: PackedArrays, label: str, buffer: np.ndarray) -> None:
    """Name the first module whose ``label`` factor is not finite (the error path: one pass over the modules)."""
    r, L = arrays.config.r, arrays.config.vector_length
    flat = buffer.reshape(-1)
    at = 0
    for name, _, in_sub, out_sub in arrays.modules:
        n = r * (in_sub if label == "lora_A" else out_sub) * L
        part = flat[at : at + n]
        problem = finite.overflow_problem(part.reshape(r, -1) if label == "lora_A" else part.reshape(-1, r))
        if problem:
            raise VBLoRAError(f"{arrays.path}: {MODEL_PREFIX}{name}.{label}.weight {problem}")
        at += n
    raise VBLoRAError(f"{arrays.path}: the {label} factors overflow float32")
