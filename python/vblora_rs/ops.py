"""VB-LoRA kernels on torch CPU tensors, run by the Rust extension.

Tensors reach Rust as numpy views of their storage (no copy); bfloat16, which numpy lacks, travels
as its uint16 bits. Every kernel releases the GIL. These functions check device, dtype, shape and
contiguity and raise :class:`VBLoRAError` naming the tensor at fault; callers that may hold other
tensors (CUDA, float64, strided views) use :func:`native_ok` to pick the torch path instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Optional

import numpy as np
import torch

from . import _native
from ._threads import bind_torch_threads
from .errors import VBLoRAError

__all__ = [
    "MergeTerm",
    "delta_weight",
    "get_num_threads",
    "low_rank_from_topk",
    "low_rank_matrices",
    "low_rank_matrices_from_topk",
    "low_rank_matrix",
    "merge_",
    "native_ok",
    "set_num_threads",
    "thread_backend",
    "topk_softmax",
]

_native.load_numpy_api()  # here, where an interruption is an ordinary KeyboardInterrupt of this import
_NATIVE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_num_threads: Optional[int] = None
bind_torch_threads()


def thread_backend() -> str:
    """Whose threads run the kernels: ``"openmp"`` (torch's own OpenMP team, the default where torch uses
    OpenMP) or ``"rayon"`` (the extension's pools; ``VBLORA_RS_THREADS=rayon`` forces them)."""
    return _native.thread_backend()


def set_num_threads(n: Optional[int]) -> None:
    """Set the threads the kernels use.

    Args:
        n: a positive thread count, or ``None`` to follow ``torch.get_num_threads()`` (the default).
    """
    global _num_threads
    if n is not None and (not isinstance(n, int) or n < 1):
        raise ValueError(f"num_threads must be a positive int or None, got {n!r}")
    _num_threads = n


def get_num_threads() -> int:
    """Returns the threads the kernels use now (see :func:`set_num_threads`)."""
    return _num_threads if _num_threads is not None else torch.get_num_threads()


def native_ok(*tensors: torch.Tensor) -> bool:
    """Whether the Rust kernels can take these tensors as they are (CPU, contiguous, f32/f16/bf16)."""
    return all(
        type(t) in (torch.Tensor, torch.nn.Parameter)
        and t.device.type == "cpu"
        and t.dtype in _NATIVE_DTYPES
        and t.is_contiguous()
        for t in tensors
    )


def float_view(t: torch.Tensor, name: str) -> np.ndarray:
    """A zero-copy numpy view of a CPU float tensor for the kernels (bfloat16 as its uint16 bits); VBLoRAError
    naming ``name`` for a tensor the kernels cannot take."""
    if type(t) not in (torch.Tensor, torch.nn.Parameter):  # e.g. FSDP's DTensor: numpy() would refuse it
        raise VBLoRAError(
            f"{name} is a {type(t).__name__} (a tensor subclass, such as an FSDP shard); the Rust kernels take "
            "whole plain tensors: gather it first"
        )
    if t.device.type != "cpu":
        raise VBLoRAError(f"{name} is on {t.device}; the Rust kernels take CPU tensors")
    if t.dtype not in _NATIVE_DTYPES:
        raise VBLoRAError(f"{name} has dtype {t.dtype}; expected float32, float16 or bfloat16")
    if not t.is_contiguous():
        raise VBLoRAError(f"{name} with shape {tuple(t.shape)} is not contiguous")
    t = t.detach()
    return _borrowed_view(t.view(torch.uint16) if t.dtype == torch.bfloat16 else t)


class _Borrowed:
    """What numpy needs to view a tensor's memory (``__array_interface__``), and the tensor, kept alive by the
    array. ``Tensor.numpy()`` would also mark the storage as never resizable again, for good: FSDP frees and
    re-allocates its gathered parameters' storage after every forward (``resize_``), so a no-grad forward of a
    sharded model would fail at the reshard after the kernels had seen its logits. The views made here live for
    one kernel call."""

    __slots__ = ("__array_interface__", "tensor")

    def __init__(self, t: torch.Tensor, typestr: str) -> None:
        self.tensor = t
        self.__array_interface__ = {
            "shape": tuple(t.shape),
            "typestr": typestr,
            "data": (t.data_ptr(), False),
            "strides": None,  # C-contiguous, checked by the caller
            "version": 3,
        }


_TYPESTR = {torch.float32: np.dtype(np.float32).str, torch.float16: np.dtype(np.float16).str}
_TYPESTR[torch.uint16] = np.dtype(np.uint16).str


def _borrowed_view(t: torch.Tensor) -> np.ndarray:
    """A writable numpy view of contiguous CPU ``t`` that leaves its storage resizable (see ``_Borrowed``)."""
    if t.numel() == 0:
        return np.empty(tuple(t.shape), dtype=np.dtype(_TYPESTR[t.dtype]))
    return np.asarray(_Borrowed(t, _TYPESTR[t.dtype]))


def _rows(t: torch.Tensor, name: str) -> torch.Tensor:
    """View a (..., n) tensor as (rows, n) without copying."""
    if t.dim() < 1:
        raise VBLoRAError(f"{name} must have at least one dimension")
    return t.reshape(-1, t.shape[-1]) if t.is_contiguous() else t


def _check_bank(bank: torch.Tensor, name: str) -> None:
    if bank.dim() != 2:
        raise VBLoRAError(f"{name} must be 2-D (num_vectors, vector_length), got shape {tuple(bank.shape)}")


def _wrap(name: str, fn, *args):  # type: ignore[no-untyped-def]
    try:
        return fn(*args)
    except VBLoRAError as exc:
        raise VBLoRAError(f"{name}: {exc}") from None


def topk_softmax(logits: torch.Tensor, k: int, *, name: str = "logits") -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (int64, largest first, ties in torch's order) of the ``k`` largest logits of every row of the
    last dimension and the float32 softmax of those logits: bit for bit ``torch.topk`` then ``softmax``.

    The selection (the pass over all ``num_vectors`` logits) runs in Rust, and so does the softmax of the ``k``
    kept logits, by the steps of torch's CPU kernel, once this process has seen it give ``torch.softmax``'s bits
    (else torch weighs them): bit-equal weights are what make merged weights equal PEFT's, bf16 included.

    Args:
        logits: a contiguous CPU float32/float16/bfloat16 tensor ``(..., num_vectors)``.
        k: how many to keep per row (``1 <= k <= num_vectors``).
        name: what ``logits`` is, for error messages.

    Returns:
        ``(indices, weights)``, both of shape ``(..., k)``.
    """
    indices, weights = _select([_rows(logits, name)], int(k), name)
    shape = (*logits.shape[:-1], int(k))
    return indices.reshape(shape), weights.reshape(shape)


def topk_softmax_many(
    logits: Sequence[torch.Tensor], k: int, *, name: str = "logits"
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`topk_softmax` of several logits tensors (one float dtype) at once: ``(indices (S, k), weights (S,
    k))`` over all their rows, in order. One Rust call selects in every tensor (an adapter has hundreds of small
    ones, where a call each costs more than the work), and one torch softmax (row by row, so bit for bit the same
    as per tensor) weighs the kept logits."""
    rows = [_rows(t, name) for t in logits]
    if not rows:
        return torch.empty(0, int(k), dtype=torch.long), torch.empty(0, int(k))
    return _select(rows, int(k), name)


def _select(rows: list[torch.Tensor], k: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One Rust selection over the rows of ``rows``: ``(indices, weights)``, the weights bit for bit torch's."""
    views = [float_view(r, name) for r in rows]
    if _selection_weights_are_torchs(k):  # weighed by the selection's threads, while the row is in cache
        idx, weights = _wrap(name, _native.topk_many, views, k, False, get_num_threads())
        return torch.from_numpy(idx), torch.from_numpy(weights)
    # the kept logits come back exactly (widened to float32, as torch's .float() does) for torch to weigh
    idx, kept = _wrap(name, _native.topk_many, views, k, True, get_num_threads())
    return torch.from_numpy(idx), torch.softmax(torch.from_numpy(kept), dim=-1)


_WEIGHTS_ARE_TORCHS: dict[int, bool] = {}


def _selection_weights_are_torchs(k: int) -> bool:
    """Whether the softmax the selection computes itself (``rust/topk/softmax.rs``: torch's kernel step by step,
    for ``k <= TORCH_SOFTMAX_MAX_K``) gives ``torch.softmax``'s bits in this process; compared once per ``k`` on
    calibration rows, so that a torch built another way (no SIMD, another ``exp``) keeps weighing them itself."""
    known = _WEIGHTS_ARE_TORCHS.get(k)
    if known is None:
        known = _WEIGHTS_ARE_TORCHS[k] = k <= _native.TORCH_SOFTMAX_MAX_K and _same_weights_as_torch(k)
    return known


def _same_weights_as_torch(k: int) -> bool:
    """The selection's weights against ``torch.softmax`` of its kept logits, bit for bit, on 4,096 rows of ``k``
    logits: spreads from 1e-3 to 64 (each ``exp`` rounding path), gaps where ``exp`` underflows, ties, ``-inf``."""
    gen = torch.Generator().manual_seed(k)
    scales = torch.logspace(-3, 1.8, 4096)
    logits = torch.randn(4096, k, generator=gen) * scales[:, None]
    if k > 1:
        logits[:64, 1:] = logits[:64, :1] - torch.linspace(80.0, 120.0, 64)[:, None]  # exp underflows past -104
        logits[64:96, 1:] = logits[64:96, :1]  # ties
        logits[96:128, 1:] = float("-inf")
    idx, weights = _native.topk_many([logits.numpy()], k, False, 1)
    expected = torch.softmax(torch.gather(logits, 1, torch.from_numpy(idx)), dim=-1)
    return torch.equal(expected.view(torch.int32), torch.from_numpy(weights).view(torch.int32))


def low_rank_matrix(logits: torch.Tensor, bank: torch.Tensor, topk: int, *, name: str = "logits") -> torch.Tensor:
    """``softmax(topk(logits)) @ bank[indices]`` per row: shape ``logits.shape[:-1] + (L,)``, float32, bit for
    bit PEFT's ``(weights.unsqueeze(-1) * bank[indices]).sum(-2)`` on float32 inputs. Nothing of size
    ``rows * num_vectors`` is allocated.

    Args:
        logits: ``(..., num_vectors)`` CPU float logits.
        bank: the vector bank ``(num_vectors, L)``.
        topk: K of the top-K selection.
        name: what ``logits`` is, for error messages.

    Returns:
        The sub-vectors, ``(..., L)`` float32.
    """
    _check_bank(bank, "vector bank")
    if logits.shape[-1] != bank.shape[0]:
        raise VBLoRAError(f"{name} has {logits.shape[-1]} logits per row but the bank holds {bank.shape[0]} vectors")
    if _selection_weights_are_torchs(int(topk)):  # select, weigh and gather in one pass over the rows
        rows = _rows(logits, name)
        out = _wrap(
            name,
            _native.low_rank_from_logits,
            float_view(rows, name),
            float_view(bank, "vector bank"),
            int(topk),
            get_num_threads(),
        )
        return torch.from_numpy(out).reshape(*logits.shape[:-1], bank.shape[1])
    indices, weights = topk_softmax(logits, topk, name=name)
    return low_rank_from_topk(indices, weights, bank, name=name)


def low_rank_from_topk(
    indices: torch.Tensor, weights: torch.Tensor, bank: torch.Tensor, *, name: str = "topk"
) -> torch.Tensor:
    """``sum_j weights[..., j] * bank[indices[..., j]]``: shape ``indices.shape[:-1] + (L,)``, float32."""
    _check_bank(bank, "vector bank")
    if indices.shape != weights.shape:
        raise VBLoRAError(f"{name}: indices {tuple(indices.shape)} and weights {tuple(weights.shape)} differ in shape")
    idx = _rows(indices.to(torch.int64).contiguous(), f"{name} indices")
    w = _rows(weights.to(torch.float32).contiguous(), f"{name} weights")
    out = _wrap(
        name,
        _native.low_rank_from_topk,
        idx.numpy(),
        w.detach().numpy(),
        float_view(bank, "vector bank"),
        get_num_threads(),
    )
    return torch.from_numpy(out).reshape(*indices.shape[:-1], bank.shape[1])


def _as_lora_matrices(sub_A: torch.Tensor, sub_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sub-vectors ``(r, in/L, L)`` and ``(out/L, r, L)`` -> ``A (r, in)`` and ``B (out, r)``."""
    A = sub_A.reshape(sub_A.shape[0], -1)
    B = sub_B.transpose(1, 2).reshape(-1, sub_B.shape[1])
    return A, B


def _check_lora_shapes(shape_A: torch.Size, shape_B: torch.Size, what: str) -> None:
    if len(shape_A) != 3 or len(shape_B) != 3 or shape_A[0] != shape_B[1]:
        raise VBLoRAError(
            f"{what} must be (r, in/L, ...) and (out/L, r, ...) with the same r, "
            f"got {tuple(shape_A)} and {tuple(shape_B)}"
        )


def low_rank_matrices(
    logits_A: torch.Tensor, logits_B: torch.Tensor, bank: torch.Tensor, topk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``A (r, in)`` and ``B (out, r)`` of one adapter (float32) from its logits ``(r, in/L, num_vectors)`` and
    ``(out/L, r, num_vectors)`` and the bank ``(num_vectors, L)``; nothing of size num_vectors per sub-vector
    is materialised beyond the logits.

    Args:
        logits_A: ``(r, in/L, num_vectors)``.
        logits_B: ``(out/L, r, num_vectors)``.
        bank: ``(num_vectors, L)``.
        topk: K of the top-K selection.

    Returns:
        ``(A, B)``: ``A (r, in)`` and ``B (out, r)``, float32; the layer adds ``x @ A.T @ B.T``.
    """
    _check_lora_shapes(logits_A.shape, logits_B.shape, "logits")
    return _as_lora_matrices(
        low_rank_matrix(logits_A, bank, topk, name="vblora_logits_A"),
        low_rank_matrix(logits_B, bank, topk, name="vblora_logits_B"),
    )


def low_rank_matrices_from_topk(
    indices_A: torch.Tensor,
    weights_A: torch.Tensor,
    indices_B: torch.Tensor,
    weights_B: torch.Tensor,
    bank: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`low_rank_matrices` from top-K indices and (all k) softmax weights per sub-vector."""
    _check_lora_shapes(indices_A.shape, indices_B.shape, "top-K indices")
    return _as_lora_matrices(
        low_rank_from_topk(indices_A, weights_A, bank, name="vblora_logits_A"),
        low_rank_from_topk(indices_B, weights_B, bank, name="vblora_logits_B"),
    )


class MergeTerm(NamedTuple):
    """One adapter's contribution ``scale * (B @ A)``; ``A`` is ``(r, in)``, ``B`` is ``(out, r)``."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float = 1.0


def _stacked_factors(terms: Sequence[MergeTerm], fan_in_fan_out: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``u (rows, R)`` and ``v (R, cols)`` with ``u @ v == sum_i scale_i * B_i @ A_i`` (transposed for
    fan_in_fan_out): every adapter merges in the same single pass over the weight."""
    us, vs = [], []
    for i, term in enumerate(terms):
        A = term.A.detach().to(torch.float32)
        B = term.B.detach().to(torch.float32)
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise VBLoRAError(f"merge term {i}: A {tuple(A.shape)} and B {tuple(B.shape)} are not (r, in) and (out, r)")
        Bs = B if term.scale == 1.0 else B * float(term.scale)
        if fan_in_fan_out:
            us.append(A.t())
            vs.append(Bs.t())
        else:
            us.append(Bs)
            vs.append(A)
    u = torch.cat(us, dim=1).contiguous()
    v = torch.cat(vs, dim=0).contiguous()
    return u, v


def merge_(
    weight: torch.Tensor, terms: Sequence[MergeTerm], fan_in_fan_out: bool = False, *, name: str = "weight"
) -> torch.Tensor:
    """In place ``weight += sum_i scale_i * (B_i @ A_i)`` (``.T`` if ``fan_in_fan_out``) in one pass,
    accumulating in float32 and rounding once into the weight's dtype.

    Args:
        weight: a 2-D contiguous CPU float32/float16/bfloat16 tensor, ``(out, in)`` (``(in, out)`` with
            ``fan_in_fan_out``).
        terms: the adapters' :class:`MergeTerm` ``(A, B, scale)``; a negative scale unmerges.
        fan_in_fan_out: the weight is stored transposed (GPT-2's Conv1D).
        name: what ``weight`` is, for error messages.

    Returns:
        ``weight``, updated in place.
    """
    if not terms:
        return weight
    if weight.dim() != 2:
        raise VBLoRAError(f"{name} must be 2-D, got shape {tuple(weight.shape)}")
    u, v = _stacked_factors(terms, fan_in_fan_out)
    if u.shape[0] != weight.shape[0] or v.shape[1] != weight.shape[1]:
        want = (v.shape[1], u.shape[0]) if fan_in_fan_out else (u.shape[0], v.shape[1])
        raise VBLoRAError(
            f"{name} has shape {tuple(weight.shape)} but the adapter delta has shape "
            f"{(u.shape[0], v.shape[1])}" + (f" (B @ A is {want}, fan_in_fan_out=True)" if fan_in_fan_out else "")
        )
    view = float_view(weight, name)
    _wrap(name, _native.rank_update_, view, u.numpy(), v.numpy(), get_num_threads())
    return weight


def delta_weight(A: torch.Tensor, B: torch.Tensor, fan_in_fan_out: bool = False) -> torch.Tensor:
    """``B @ A`` (transposed if ``fan_in_fan_out``) as a new float32 tensor, written once (no zero-fill pass).

    Args:
        A: ``(r, in)``.
        B: ``(out, r)``.
        fan_in_fan_out: return ``(B @ A).T``.

    Returns:
        The delta weight, float32.
    """
    u, v = _stacked_factors([MergeTerm(A, B)], fan_in_fan_out)
    return torch.from_numpy(_wrap("delta", _native.low_rank_product, u.numpy(), v.numpy(), get_num_threads()))
