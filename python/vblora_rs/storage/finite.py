"""THE rule for non-finite values, one for every entry point (``from_pretrained``, ``vblora merge``,
``inspect``, ``to-lora``, ``pack``):

* the vector bank must be finite;
* full logits may hold ``-inf`` (a vector a sub-vector never selects) but no NaN or ``+inf``, and every
  sub-vector keeps at least one finite logit (else its softmax is NaN);
* stored top-K weights follow :mod:`.topk`;
* anything computed from finite inputs (A and B, a delta, a merged weight, LoRA factors, a scaled factor) that is
  not finite overflowed its dtype: an error naming the tensor, never a file written with inf or NaN.

Each function returns ``""`` or the problem, for callers to prefix with the file and tensor.
"""

from __future__ import annotations

import numpy as np


def _first_row(mask: np.ndarray) -> int:
    return int(np.argmax(mask.reshape(mask.shape[0], -1).any(-1))) if mask.ndim > 1 else int(np.argmax(mask))


def bank_problem(bank: np.ndarray) -> str:
    """The bank (``num_vectors, vector_length``) holds a NaN or an infinity."""
    bad = ~np.isfinite(bank)
    if bad.any():
        return f"holds NaN or infinite values (vector {_first_row(bad)}); the bank must be finite"
    return ""


def logits_problem(logits: np.ndarray) -> str:
    """Full logits ``(..., num_vectors)``: no NaN or +inf, and a finite logit in every sub-vector."""
    rows = logits.reshape(-1, logits.shape[-1]) if logits.ndim else logits.reshape(1, 1)
    bad = np.isnan(rows) | np.isposinf(rows)
    if bad.any():
        return f"sub-vector {_first_row(bad)} holds NaN or +inf logits"
    if rows.size and not np.isfinite(rows).any(-1).all():
        return f"sub-vector {int(np.argmin(np.isfinite(rows).any(-1)))} has no finite logit (all -inf)"
    return ""


def overflow_problem(values: np.ndarray) -> str:
    """A result computed from finite inputs holds a non-finite value: it overflowed."""
    bad = ~np.isfinite(values)
    if bad.any():
        at = np.unravel_index(int(np.argmax(bad)), values.shape)
        return f"overflows {values.dtype} at {tuple(int(i) for i in at)} (the inputs are finite)"
    return ""
