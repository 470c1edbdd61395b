"""Floating-point tolerances derived from the dtype and the length of the reductions, never from the result one
machine happened to produce (CPUs of one kind differ: AVX2-only, AVX-512, AVX512-BF16; matmul kernels block and
order their sums differently with the row count, the SIMD width and the thread count).

Two ways of evaluating the same comparison:

* ``reordered``: both sides compute the same thing in the same dtype, in another order (other blocking, other
  row count, fused or separate multiply-add, other ``ln``/``exp``). A sum of ``n`` products evaluated in any
  order is within ``gamma_n * sum|x_i y_i|`` of the exact sum, ``gamma_n = n u / (1 - n u) ~ n u`` with ``u``
  the unit roundoff (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., section 3.1), so two
  orders are within ``2 n u`` of each other relative to ``sum|x_i y_i|``. A chain of ``depth`` reductions (a
  network's layers) adds one such error per step to first order.
* ``probable``: one side runs in a lower precision than the other (a model cast to bfloat16 against float32).
  The worst case above is vacuous there (``2 n u > 1`` for bfloat16 and ``n = 64``); rounding errors behave as
  independent zero-mean variables, and ``lambda * sqrt(n) * u`` bounds a sum's relative error with probability
  at least ``1 - 2 exp(-lambda^2 / 2)`` (Higham and Mary, "A new approach to probabilistic rounding error
  analysis", SIAM J. Sci. Comput. 41(5), 2019); ``lambda = 6`` makes a failure by chance ~1e-8 per value.

``scale`` bounds ``sum|x_i y_i|`` relative to the compared values; it is 1 for the layer-normed models of the
tests, whose activations and logits are O(1), and the magnitude of the operands where a test compares small
values (an adapter's delta weights). Both functions return keyword arguments for ``torch.testing.assert_close``.
"""

from __future__ import annotations

import math

import torch

# Chained reductions per transformer block on the longest path: query projection, scores, weighted values,
# output projection, the two feed-forward projections.
BLOCK_DEPTH = 6
# A decoder block adds cross-attention: its query projection, scores, weighted values and output projection.
CROSS_ATTENTION_DEPTH = 4
LAMBDA = 6.0


def unit_roundoff(dtype: torch.dtype) -> float:
    """Half the distance from 1 to the next value: the largest relative error of one rounding."""
    if dtype == torch.float32 and torch.cuda.is_available() and torch.backends.cuda.matmul.allow_tf32:
        return 2.0**-11  # TF32 matmuls keep 10 explicit mantissa bits
    return torch.finfo(dtype).eps / 2


def network_depth(blocks: int, encoder_blocks: int = 0, heads: int = 1) -> int:
    """Chained reductions from the input ids to the output: the blocks, cross-attention, the output head(s)."""
    cross = CROSS_ATTENTION_DEPTH * blocks if encoder_blocks else 0
    return BLOCK_DEPTH * (blocks + encoder_blocks) + cross + heads


# The tests' tiny models (the MLP of support/models.py, the transformers ones of vblora_rs.demo.mini_models): longest
# reduction (the feed-forward width, GPT-2's is 4 * n_embd) and chained reductions from input to output (two blocks
# each; BERT and RoBERTa add a pooler to the classifier; the MLP is four linear layers).
MODELS: dict[str, tuple[int, int]] = {
    "mlp": (32, 4),
    "gpt2": (128, network_depth(2)),
    "llama": (64, network_depth(2)),
    "opt": (64, network_depth(2)),
    "bert": (64, network_depth(2, heads=2)),
    "roberta": (64, network_depth(2, heads=2)),
    "t5": (64, network_depth(2, encoder_blocks=2)),
    "bart": (64, network_depth(2, encoder_blocks=2)),
}
# An adapter's delta weight: the top-K softmax (exp, sum, divide), the weighted sum of K bank vectors, B @ A over
# the rank, the addition to the base weight.
DELTA_DEPTH = 6


def reordered(dtype: torch.dtype, n: int, depth: int = 1, scale: float = 1.0) -> dict[str, float]:
    """Same computation, same dtype, other summation order: ``2 n u`` per chained reduction."""
    bound = 2 * n * unit_roundoff(dtype) * depth
    return {"rtol": bound, "atol": bound * scale}


def model(case: str, dtype: torch.dtype = torch.float32, backward: bool = False) -> dict[str, float]:
    """Outputs (or, with ``backward``, gradients: the chain runs twice) of one of the tests' models, reordered."""
    n, depth = MODELS[case]
    return reordered(dtype, n, depth * (2 if backward else 1))


def delta(dtype: torch.dtype, n: int, scale: float = 1.0) -> dict[str, float]:
    """Delta (or merged) weights of an adapter, ``n`` = max(top-K, rank), reordered."""
    return reordered(dtype, n, DELTA_DEPTH, scale)


def half_model(case: str, dtype: torch.dtype) -> dict[str, float]:
    """Outputs of one of the tests' models run in a half type against the same model (in that type or in float32):
    matmuls accumulate in float32 and round once to the half type, and the weights themselves are one rounding
    (or, after a merge, a few ulps) apart, so each chained step adds about two roundings: ``2 u`` per step."""
    return reordered(dtype, 1, MODELS[case][1])


def probable(dtype: torch.dtype, n: int, depth: int = 1, scale: float = 1.0) -> dict[str, float]:
    """Computed in ``dtype`` against a more precise reference: ``lambda sqrt(n) u`` per chained reduction, plus
    the rounding of the inputs to ``dtype`` (one ``u``)."""
    bound = (LAMBDA * math.sqrt(n) * depth + 1) * unit_roundoff(dtype)
    return {"rtol": bound, "atol": bound * scale}


def same_bits_as_torch() -> bool:
    """Whether the kernels run the arithmetic torch's CPU kernels run, bit for bit: on the FMA levels (AVX2+FMA
    and AVX-512; docs/architecture.md, "Exactness"). On the portable path (``VBLORA_RS_SIMD=portable``, CPUs
    without FMA) the same sums are rounded differently, so bit-parity tests compare within the reordering bound
    there."""
    from vblora_rs import _native

    return _native.simd_level() != "portable"


def assert_same(got: torch.Tensor, want: torch.Tensor, tol: dict[str, float], msg: str = "") -> None:
    """Bit-identical where :func:`same_bits_as_torch`, else within ``tol``."""
    if same_bits_as_torch():
        assert torch.equal(got, want), msg
    else:
        torch.testing.assert_close(got, want, **tol, msg=msg or None)
