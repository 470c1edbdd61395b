"""Top-K adapters as PEFT stores them, in torch: the encoding of dense logits into ``k`` indices and ``k - 1``
weights (bit for bit what PEFT saves), the PEFT-exact decoding back into the order and weights PEFT's forward
sees, and the checks of a stored pair (layout here, values by THE rule of :mod:`vblora_rs.storage.topk`).

Bit parity with PEFT: PEFT turns a stored pair back into dense logits (``log(weight)`` at the kept indices,
``-inf`` elsewhere) and its forward runs ``topk`` + ``softmax`` over them. On a row that is ``-inf`` except at
the K kept entries, ``topk`` returns the kept entries sorted by logit, largest first, and ``softmax`` of those K
logits gives the weights; :func:`compute_form` reproduces exactly that from the stored form (sort + the very
same ``softmax`` on a ``(rows, K)`` tensor). Only rows where the order is not decided by the values (two equal
kept logits, or a zero weight whose ``-inf`` ties with the fill) go through ``torch.topk`` on a rebuilt dense
row, so those few rows get torch's own tie order too.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import ops
from ..errors import VBLoRAError
from ..storage.names import TOPK_INDICES, TOPK_WEIGHTS, indices_dtype_name
from ..storage.topk import first_bad_row

CHECK_ROWS = 4096  # rows checked per call of the top-K rule


def indices_dtype(num_vectors: int) -> torch.dtype:
    """The integer dtype PEFT stores top-K indices in (:func:`vblora_rs.storage.names.indices_dtype_name`)."""
    return getattr(torch, indices_dtype_name(num_vectors))


def encode(logits: torch.Tensor, k: int, num_vectors: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored form of dense logits, bit for bit what PEFT saves: ``topk`` indices in PEFT's integer dtype and the
    first ``k-1`` softmax weights in the logits' dtype (the selection runs in Rust on CPU)."""
    logits = logits.detach()
    if ops.native_ok(logits):
        idx, weights = ops.topk_softmax(logits, k)
        weights = weights.to(logits.dtype)
    else:
        top, idx = logits.topk(k)
        weights = torch.softmax(top, dim=-1)
    return idx.to(indices_dtype(num_vectors)), weights[..., :-1].contiguous()


def full_weights(weights: torch.Tensor) -> torch.Tensor:
    """All K float32 weights from the K-1 stored: ``[w, 1 - sum(w)]``. A last weight that rounding leaves a hair
    below zero (sums up to 1 + 1e-6 are accepted) counts as 0, where PEFT's ``log`` would then give NaN."""
    w = weights.float()
    return torch.cat([w, (1 - w.sum(-1, keepdim=True)).clamp_min(0)], dim=-1)


def encode_many(logits: list[torch.Tensor], k: int, num_vectors: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`encode` of many logits tensors (an adapter's every layer) with one Rust top-K call and one softmax;
    the same tensors, bit for bit. Tensors the kernels cannot take (or of mixed dtypes) go one by one."""
    logits = [t.detach() for t in logits]
    if not logits or not ops.native_ok(*logits) or len({t.dtype for t in logits}) > 1:
        return [encode(t, k, num_vectors) for t in logits]
    idx, weights = ops.topk_softmax_many(logits, k)
    idx = idx.to(indices_dtype(num_vectors))
    weights = weights[:, :-1].to(logits[0].dtype).contiguous()
    out, start = [], 0
    for t in logits:
        end = start + t.numel() // t.shape[-1]
        lead = t.shape[:-1]
        # views of two tensors: whoever saves them with safetensors must unshare them (checkpoint does)
        out.append((idx[start:end].reshape(*lead, k), weights[start:end].reshape(*lead, k - 1)))
        start = end
    return out


def log_weights(weights: torch.Tensor) -> torch.Tensor:
    """``log([w, 1 - sum(w)])`` in float32: the logits PEFT scatters at the kept indices."""
    return torch.log(full_weights(weights))


def dense_logits(indices: torch.Tensor, weights: torch.Tensor, num_vectors: int) -> torch.Tensor:
    """The dense float32 logits PEFT builds from the stored form: log-weights at the kept indices, -inf elsewhere."""
    logits = log_weights(weights)
    dense = torch.full((*logits.shape[:-1], num_vectors), float("-inf"), device=logits.device)
    return dense.scatter(-1, indices.to(torch.long), logits)


def compute_form(indices: torch.Tensor, weights: torch.Tensor, num_vectors: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(indices int64, weights float32)`` with ``(..., K)`` entries as PEFT's forward sees them: ordered as
    ``torch.topk`` orders the dense logits, weights the ``softmax`` of the kept logits."""
    logits = log_weights(weights)
    idx = indices.to(torch.long)
    order = torch.argsort(logits, dim=-1, descending=True, stable=True)
    top = torch.gather(logits, -1, order)
    idx = torch.gather(idx, -1, order)
    # rows whose order the values do not decide: a tie between kept logits, or a -inf (zero weight)
    undecided = (top[..., 1:] == top[..., :-1]).any(-1) | torch.isinf(top[..., -1])
    if bool(undecided.any()):
        rows = undecided.nonzero(as_tuple=True)
        dense = dense_logits(indices[rows], weights[rows], num_vectors)
        top[rows], idx[rows] = dense.topk(top.shape[-1], dim=-1)
    return idx, torch.softmax(top, dim=-1)


def traceable_compute_form(indices: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`compute_form` without its data-dependent fix-up of tied rows, for torch.compile: a tie
    between kept logits (equal weights) or a zero weight only changes the order of the weighted sum, so A and B
    equal the eager ones up to rounding in those rows."""
    logits = log_weights(weights)
    top, order = torch.sort(logits, dim=-1, descending=True, stable=True)
    return torch.gather(indices.to(torch.long), -1, order), torch.softmax(top, dim=-1)


# --- validation ---------------------------------------------------------------------------------------


def check_stored(
    path: str, key: str, indices: torch.Tensor, weights: torch.Tensor, num_vectors: int, topk: int
) -> None:
    """Reject a stored top-K pair that PEFT would turn into wrong logits; messages name file and tensor."""
    check_layout(path, key, indices, weights, topk)
    problem = value_problem(indices, weights, num_vectors)
    if problem:
        raise VBLoRAError(f"{path}: tensor {key}{problem}")


def check_layout(path: str, key: str, indices: torch.Tensor, weights: torch.Tensor, topk: int) -> None:
    """Dtypes and shapes of a stored top-K pair (cheap: no pass over the values)."""
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise VBLoRAError(f"{path}: tensor {key}{TOPK_INDICES} has dtype {indices.dtype}, expected an integer dtype")
    if not weights.dtype.is_floating_point:
        raise VBLoRAError(f"{path}: tensor {key}{TOPK_WEIGHTS} has dtype {weights.dtype}, expected a float dtype")
    if indices.shape[-1:] != (topk,) or weights.shape != (*indices.shape[:-1], topk - 1):
        raise VBLoRAError(
            f"{path}: tensors {key}{TOPK_INDICES} {tuple(indices.shape)} and {key}{TOPK_WEIGHTS} "
            f"{tuple(weights.shape)} do not hold topk={topk} entries per sub-vector"
        )


def as_numpy(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor (bfloat16, which numpy lacks, as float32). The loading path checks and
    concatenates with numpy: each torch kernel used for the first time pages in its code from libtorch, which
    was most of the extra memory of loading a compact adapter (~5 MiB of ~14)."""
    t = t.detach().cpu()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


def index_problem(indices: torch.Tensor, num_vectors: int) -> str:
    """What is wrong with stored top-K indices (``"<suffix> holds ..."``), or ``""``."""
    if indices.numel():
        idx = as_numpy(indices)
        if int(idx.min()) < 0 or int(idx.max()) >= num_vectors:
            return f"{TOPK_INDICES} holds indices outside [0, {num_vectors})"
    return ""


def value_problem(indices: torch.Tensor, weights: torch.Tensor, num_vectors: int) -> str:
    """What is wrong with the values of a stored top-K pair (``"<suffix> <reason>"``), or ``""``: the one rule
    of stored top-K rows every reader applies (:func:`vblora_rs.storage.topk.first_bad_row`)."""
    problem = index_problem(indices, num_vectors)
    if problem:
        return problem
    idx, w = as_numpy(indices), as_numpy(weights)
    k = idx.shape[-1] if idx.ndim else 0
    idx = idx.reshape(-1, k) if k else idx.reshape(0, 1)
    w = w.reshape(idx.shape[0], max(k - 1, 0))  # rows from the indices: with k=1 the weights hold no values
    # in blocks: the rule's int64/float32 copies of a whole table would add to the peak memory of a load
    for start in range(0, idx.shape[0], CHECK_ROWS):
        found = first_bad_row(idx[start : start + CHECK_ROWS], w[start : start + CHECK_ROWS], num_vectors)
        if found is not None:
            row, part, reason = found
            return f"{TOPK_INDICES if part == 'indices' else TOPK_WEIGHTS} (row {start + row}) {reason}"
    return ""
