"""What ``vblora inspect`` needs of an adapter, as columns: module names and per-module numbers in arrays, dtypes,
the bank usage counts.

A packed file is summarised from the decoder's flat arrays alone (numpy, no torch, nothing per module but its
name), so a 12 MB file listing 300k modules costs seconds; a PEFT folder (one tensor per grid in its own file)
goes through :class:`vblora_rs.adapter_files.AdapterFile`, whose cost per module is that of its tensors.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from ..errors import VBLoRAError
from ..storage.header_size import json_string_bytes
from ..storage.locate import PACKED, locate
from ..storage.names import BANK_KEY, index_bits, indices_dtype_name, module_order

if TYPE_CHECKING:
    from ..convert.adapter_tensors import AdapterFile
    from ..storage.adapter_config import AdapterConfig
    from ..storage.packed_arrays import PackedArrays

# torch dtype (str without "torch.") -> safetensors name, as safetensors.torch maps them
TORCH_TO_ST = {
    "bool": "BOOL", "uint8": "U8", "int8": "I8", "float8_e5m2": "F8_E5M2", "float8_e4m3fn": "F8_E4M3",
    "float8_e8m0fnu": "F8_E8M0", "float8_e4m3fnuz": "F8_E4M3FNUZ", "float8_e5m2fnuz": "F8_E5M2FNUZ",
    "int16": "I16", "uint16": "U16", "float16": "F16", "bfloat16": "BF16", "int32": "I32", "uint32": "U32",
    "float32": "F32", "complex64": "C64", "float64": "F64", "int64": "I64", "uint64": "U64",
}  # fmt: skip
ST_TO_TORCH = {st: name for name, st in TORCH_TO_ST.items()}
ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "F8_E4M3FNUZ": 1, "F8_E5M2FNUZ": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "C64": 8, "F64": 8, "I64": 8, "U64": 8,
}  # fmt: skip


def st_dtype(dtype: Any, what: str) -> str:
    """The safetensors name of a torch dtype (or of its name)."""
    name = TORCH_TO_ST.get(str(dtype).removeprefix("torch."))
    if name is None:
        raise VBLoRAError(f"{what}: dtype {dtype} has no safetensors equivalent")
    return name


@dataclass(frozen=True)
class BankUsage:
    counts: list[int]  # how many sub-vectors select each bank vector (one of their top-k)
    mean_top1_weight: float  # mean over sub-vectors of the largest of their k weights
    sub_vectors: int

    @property
    def unused(self) -> int:
        return sum(1 for c in self.counts if c == 0)


@dataclass
class Summary:
    """An adapter as inspect sees it. Module columns are aligned with ``names`` (sorted); ``in_sub`` / ``out_sub``
    are the A grid's columns and the B grid's rows (weight ``(out_sub * L, in_sub * L)``); ``stored_bytes`` is
    what each module's tensors take in the adapter's own file. Dtypes are safetensors names: ``value_dtype`` of
    the logits or top-K weights, ``index_dtype`` of top-K indices as PEFT's file would hold them."""

    weights_path: str
    storage: str  # "full", "topk" or "packed"
    config: AdapterConfig
    names: list[str]
    in_sub: np.ndarray
    out_sub: np.ndarray
    stored_bytes: np.ndarray
    value_dtype: str
    index_dtype: str
    bank_dtype: str
    extras: list[tuple[str, str, tuple[int, ...]]]  # (key, safetensors dtype, shape)
    file_metadata: Optional[dict[str, str]]
    usage: BankUsage

    @functools.cached_property
    def name_json_bytes(self) -> np.ndarray:
        """JSON bytes of each module name, quotes included (for exact header sizes)."""
        return json_string_bytes(self.names)

    @property
    def sub_vectors(self) -> np.ndarray:
        return self.config.r * (self.in_sub + self.out_sub)

    @property
    def extras_bytes(self) -> int:
        return sum(int(np.prod(shape, dtype=np.int64)) * ITEMSIZE[dtype] for _, dtype, shape in self.extras)


def read_summary(path: str) -> Summary:
    """The summary of the adapter at ``path`` (anything :func:`vblora_rs.storage.locate.locate` accepts)."""
    found = locate(path)
    if found.kind == PACKED:
        from ..storage.packed_arrays import read_packed_arrays

        return from_packed(read_packed_arrays(found.weights_path))
    from ..convert.adapter_tensors import read_adapter

    return from_adapter_file(read_adapter(path))


# --- packed files: numpy only ---------------------------------------------------------------------


def _float32(values: np.ndarray, dtype_name: str) -> np.ndarray:
    """Decoded weights as float32 (bfloat16 arrives as its uint16 bits)."""
    if dtype_name == "bfloat16":
        return (values.astype(np.uint32) << 16).view(np.float32)
    return values.astype(np.float32, copy=False)


def packed_bank_usage(arrays: PackedArrays) -> BankUsage:
    """Selections per bank vector and the mean top-1 weight, over the flat arrays at once."""
    nv = arrays.config.num_vectors
    counts = np.bincount(arrays.indices.reshape(-1), minlength=nv)
    w = _float32(arrays.weights, arrays.weights_dtype)
    rows = w.shape[0]
    last = np.maximum(np.float32(1) - w.sum(axis=1, dtype=np.float32), np.float32(0))  # as topk_table.full_weights
    top1 = np.maximum(w.max(axis=1), last) if w.shape[1] else last
    mean = float(top1.astype(np.float64).sum()) / rows if rows else 0.0
    return BankUsage(counts.tolist(), mean, rows)


def from_packed(arrays: PackedArrays) -> Summary:
    config, k = arrays.config, arrays.config.topk
    order = sorted(range(len(arrays.modules)), key=lambda i: module_order(arrays.modules[i][0]))
    names = [arrays.modules[i][0] for i in order]
    dims = arrays.dims[np.array(order, dtype=np.int64)] if order else arrays.dims
    r, in_sub, out_sub = dims[:, 0], dims[:, 1], dims[:, 2]
    bits = index_bits(config.num_vectors)
    weight_size = arrays.weights.dtype.itemsize
    # per module: the indices of A and of B at `bits` each (each tensor rounded up to a byte), and the weights
    stored = sum((r * n * k * bits + 7) // 8 + r * n * (k - 1) * weight_size for n in (in_sub, out_sub))
    value_dtype = st_dtype(arrays.weights_dtype, "top-K weights")
    return Summary(
        weights_path=arrays.path,
        storage="packed",
        config=config,
        names=names,
        in_sub=in_sub,
        out_sub=out_sub,
        stored_bytes=np.asarray(stored, dtype=np.int64),
        value_dtype=value_dtype,
        index_dtype=TORCH_TO_ST[arrays.metadata["indices_dtype"]],
        bank_dtype=st_dtype(arrays.bank_dtype, BANK_KEY),
        extras=[(name, dtype, tuple(shape)) for name, dtype, shape, _ in arrays.extras],
        file_metadata=dict(arrays.metadata),
        usage=packed_bank_usage(arrays),
    )


# --- PEFT folders: through AdapterFile (torch) ----------------------------------------------------


def _file_metadata(path: str) -> Optional[dict[str, str]]:
    """The ``__metadata__`` of a safetensors file (its header is parsed in Rust: a PEFT file's may be 100 MB)."""
    from safetensors import safe_open

    with safe_open(path, framework="np") as fh:
        return fh.metadata()


def adapter_bank_usage(adapter: AdapterFile) -> BankUsage:
    """Selections per bank vector: the stored indices (top-K), or the top-k of the logits as PEFT picks them."""
    import torch

    from .. import ops
    from .._progress import bar
    from ..convert import topk

    counts = torch.zeros(adapter.config.num_vectors, dtype=torch.long)
    top1_sum, rows = 0.0, 0
    progress = bar(len(adapter.modules), "bank usage", unit="module")
    for name in adapter.modules:
        progress.update(1)
        if adapter.storage == "full":
            pairs = [ops.topk_softmax(t.contiguous(), adapter.config.topk) for t in adapter.logits(name)]
        else:
            idx_A, w_A, idx_B, w_B = adapter.topk(name)
            pairs = [(idx_A, topk.full_weights(w_A)), (idx_B, topk.full_weights(w_B))]
        for indices, weights in pairs:
            counts += torch.bincount(indices.reshape(-1).long(), minlength=counts.numel())
            top1_sum += float(weights.float().amax(-1).double().sum())
            rows += weights[..., 0].numel()
    progress.close()
    return BankUsage(counts.tolist(), top1_sum / rows if rows else 0.0, rows)


def from_adapter_file(adapter: AdapterFile) -> Summary:
    config, L = adapter.config, adapter.config.vector_length
    first = next(iter(adapter.modules))
    if adapter.storage == "full":
        value_dtype = st_dtype(adapter.logits(first)[0].dtype, first)
        index_dtype = TORCH_TO_ST[indices_dtype_name(config.num_vectors)]
    else:
        idx, weights = adapter.topk(first)[:2]
        value_dtype = st_dtype(weights.dtype, first)
        index_dtype = st_dtype(idx.dtype, "top-K indices")  # the file's own
    modules = sorted(adapter.modules.values(), key=lambda m: module_order(m.name))
    extras = [(k, st_dtype(v.dtype, k), tuple(v.shape)) for k, v in adapter.extras.items()]
    return Summary(
        weights_path=adapter.weights_path,
        storage=adapter.storage,
        config=config,
        names=[m.name for m in modules],
        in_sub=np.array([m.in_features // L for m in modules], dtype=np.int64),
        out_sub=np.array([m.out_features // L for m in modules], dtype=np.int64),
        stored_bytes=np.array([sum(adapter.tensors[k].nbytes for k in m.keys) for m in modules], dtype=np.int64),
        value_dtype=value_dtype,
        index_dtype=index_dtype,
        bank_dtype=st_dtype(adapter.bank.dtype, BANK_KEY),
        extras=extras,
        file_metadata=_file_metadata(adapter.weights_path),
        usage=adapter_bank_usage(adapter),
    )
