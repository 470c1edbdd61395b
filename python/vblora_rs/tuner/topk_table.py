"""Compact top-K adapters in a model: the top-K indices and weights of every sub-vector, without dense logits.

A ``save_only_topk_weights`` checkpoint stores, per sub-vector, the indices of the K kept bank vectors and the
first K-1 softmax weights (the last is 1 minus their sum). PEFT turns that back into dense logits (hundreds of
MB for a 7B model). Here the stored form is kept as it is, in one :class:`TopKTable` per adapter (all layers'
sub-vectors in a few large tensors, as the packed file holds them), and A and B are built straight from it
(the PEFT-exact decoding is :func:`vblora_rs.convert.topk.compute_form`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..convert.topk import as_numpy, indices_dtype


class TopKTable(nn.Module):
    """One adapter's stored top-K form for all its layers: ``indices (S, K)`` in PEFT's integer dtype and
    ``weights (S, K-1)`` as stored, one row per sub-vector. Layers know their rows (see ``Linear``)."""

    def __init__(self, indices: torch.Tensor, weights: torch.Tensor, num_vectors: int) -> None:
        super().__init__()
        self.num_vectors = num_vectors
        self.register_buffer("indices", indices)
        self.register_buffer("weights", weights)

    def extra_repr(self) -> str:
        return f"rows={self.indices.shape[0]}, topk={self.indices.shape[1]}, num_vectors={self.num_vectors}"


def table_from_layers(
    parts: list[tuple[torch.Tensor, torch.Tensor]], num_vectors: int, topk: int
) -> tuple[TopKTable, list[int]]:
    """One table from per-matrix ``(indices, weights)`` pairs (any leading shape); returns it and each pair's
    first row."""
    starts, rows = [], 0
    for idx, _ in parts:
        starts.append(rows)
        rows += idx.numel() // topk
    dtype = indices_dtype(num_vectors)
    if parts:
        np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
        indices = torch.from_numpy(np.concatenate([as_numpy(i).reshape(-1, topk).astype(np_dtype) for i, _ in parts]))
        # rows counted from the indices: with topk=1 the weights hold no values and -1 cannot be inferred
        counts = [i.numel() // topk for i, _ in parts]
        wdtype = parts[0][1].dtype
        if wdtype == torch.bfloat16:  # numpy has no bfloat16
            weights = torch.cat([w.reshape(n, topk - 1) for n, (_, w) in zip(counts, parts)])
        else:
            weights = torch.from_numpy(
                np.concatenate([as_numpy(w).reshape(n, topk - 1) for n, (_, w) in zip(counts, parts)])
            )
    else:
        indices = torch.empty(0, topk, dtype=dtype)
        weights = torch.empty(0, topk - 1)
    return TopKTable(indices, weights, num_vectors), starts


def rows_of(table: TopKTable, start: int, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored ``(indices (*shape, K), weights (*shape, K-1))`` of one matrix, as views of the table."""
    k = table.indices.shape[1]
    end = start + shape[0] * shape[1]
    return table.indices[start:end].reshape(*shape, k), table.weights[start:end].reshape(*shape, k - 1)
