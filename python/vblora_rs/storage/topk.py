"""THE validity rule of stored top-K rows, the one every reader applies (Rust ``stored_topk``: the packed
decoder, the streaming merge, and through :func:`first_bad_row` the model side's checks).

A row of ``k`` indices and ``k - 1`` stored softmax weights is valid when every index is in
``[0, num_vectors)``, no index repeats within the row, every weight is finite and ``>= 0``, and the weights
sum (in float64) to at most ``1 + 1e-6``.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .. import _native


def first_bad_row(indices: np.ndarray, weights: np.ndarray, num_vectors: int) -> Optional[tuple[int, str, str]]:
    """``None`` when every row is valid, else ``(row, part, reason)`` for the first bad row, ``part`` being
    ``"indices"`` or ``"weights"``. ``indices (..., k)`` of any integer dtype, ``weights (..., k - 1)`` of any float
    dtype (numpy arrays; bfloat16 tensors go in as float32, which is exact; float64 weights are rounded to float32,
    as PEFT's float32 logits would be)."""
    k = indices.shape[-1] if indices.ndim else 0
    idx = np.ascontiguousarray(indices.reshape(-1, k) if k else indices.reshape(0, 1), dtype=np.int64)
    w = np.ascontiguousarray(weights.reshape(idx.shape[0], max(k - 1, 0)), dtype=np.float32)
    found = _native.check_topk_rows(idx, w, num_vectors)
    return None if found is None else (int(found[0]), str(found[1]), str(found[2]))
