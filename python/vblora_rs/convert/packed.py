"""The packed single-file adapter format, ``adapter_packed.safetensors`` (see ``docs/packed-format.md``).

A packed file is a plain safetensors file: the vector bank, every top-K index of every sub-vector bit-packed at
``ceil(log2(num_vectors))`` bits, the first k-1 softmax weights, the checkpoint's other tensors unchanged, and a small
``__metadata__`` (modules table, dims, adapter config). It holds exactly what PEFT's ``save_only_topk_weights``
checkpoint holds, so :func:`read_packed` gives that checkpoint back bit for bit; ``half=`` also stores the bank and
weights in float16/bfloat16 (lossy, with a per-layer error report). Encoding, decoding and all validation of the
file run in Rust (through :mod:`vblora_rs.storage.packed_arrays`); this module maps PEFT's tensor dict to and from
that layout.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional, Union

import torch

from .. import ops
from ..errors import VBLoRAError
from ..storage import atomic, packed_arrays
from ..storage.adapter_config import AdapterConfig
from ..storage.names import BANK_KEY, PACKED_WEIGHTS_NAME, TOPK_INDICES, TOPK_WEIGHTS, index_bits
from . import topk
from .safetensors_file import check_float

__all__ = [
    "PACKED_WEIGHTS_NAME",
    "PackReport",
    "is_packed_file",
    "read_packed",
    "topk_tensors_from_full",
    "write_packed",
]

PREFIX = "base_model.model."  # where PEFT puts a module's keys
SUM_TOLERANCE = 1e-6  # how far above 1 the stored k-1 weights of a row may sum (as the Rust decoder checks)

_INDEX_DTYPES = {torch.uint8: "uint8", torch.int16: "int16", torch.int32: "int32", torch.int64: "int64"}
_INDEX_DTYPES_BY_NAME = {name: dtype for dtype, name in _INDEX_DTYPES.items()}
# safetensors dtype names of the tensors an extra may hold
_ST_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.uint16: "U16",
    torch.uint32: "U32",
    torch.uint64: "U64",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.complex64: "C64",
}
_ST_DTYPES_BY_NAME = {name: dtype for dtype, name in _ST_DTYPES.items()}
_GRIDS = ("vblora_logits_A", "vblora_logits_B")


@dataclass(frozen=True)
class PackReport:
    """What :func:`write_packed` wrote. Byte counts are of the tensors' data; ``header_and_extras_bytes`` is the
    rest of the file (safetensors header with the metadata, plus every extra tensor)."""

    path: str
    total_bytes: int
    bank_bytes: int
    indices_bytes: int
    weights_bytes: int
    header_and_extras_bytes: int
    half: Optional[torch.dtype] = None
    # module path -> max |B@A (original) - B@A (half-stored)| in float32; empty unless ``half`` was given
    layer_errors: dict[str, float] = field(default_factory=dict)

    @property
    def max_error(self) -> float:
        return max(self.layer_errors.values(), default=0.0)


@dataclass
class _Layout:
    """A PEFT top-K dict rearranged into the packed layout (sub-vector-major, A then B, module after module)."""

    modules: list[tuple[str, int, int, int]]
    prefix: str
    indices: torch.Tensor  # (S, k) int64
    weights: torch.Tensor  # (S, k-1)
    bank: torch.Tensor  # (num_vectors, L)
    indices_dtype: torch.dtype
    extras: dict[str, torch.Tensor]


def _module_keys(prefix: str, path: str) -> list[str]:
    return [f"{prefix}{path}.{grid}{part}" for grid in _GRIDS for part in (TOPK_INDICES, TOPK_WEIGHTS)]


def _layout(tensors: dict[str, torch.Tensor], config: AdapterConfig) -> _Layout:
    """Checks a PEFT top-K checkpoint dict against ``config`` and lays it out for the encoder; errors name the key."""
    suffix = f".{_GRIDS[0]}{TOPK_INDICES}"
    bases = [key[: -len(suffix)] for key in tensors if key.endswith(suffix)]
    if not bases:
        full = [k for k in tensors if k.endswith(_GRIDS)]
        hint = f" (tensor {full[0]} holds full logits: convert with topk_tensors_from_full)" if full else ""
        raise VBLoRAError(f"no *{suffix} tensor: not a VB-LoRA top-K checkpoint{hint}")
    prefix = PREFIX if all(b.startswith(PREFIX) for b in bases) else ""
    k, r = config.topk, config.r
    modules, indices, weights = [], [], []
    index_dtype: Optional[torch.dtype] = None
    weight_dtype: Optional[torch.dtype] = None
    used: set[str] = set()
    for base in bases:
        path = base[len(prefix) :]
        keys = _module_keys(prefix, path)
        for key in keys:
            if key not in tensors:
                raise VBLoRAError(f"missing tensor {key}")
        idx_a, w_a, idx_b, w_b = (tensors[key] for key in keys)
        if idx_a.dim() != 3 or idx_b.dim() != 3 or idx_a.shape[0] != r or idx_b.shape[1] != r:
            raise VBLoRAError(
                f"tensors {keys[0]} {tuple(idx_a.shape)} and {keys[2]} {tuple(idx_b.shape)} are not "
                f"(r, in/L, topk) and (out/L, r, topk) with r={r}"
            )
        for ikey, wkey, idx, w in ((keys[0], keys[1], idx_a, w_a), (keys[2], keys[3], idx_b, w_b)):
            if idx.shape[-1] != k:
                raise VBLoRAError(f"tensor {ikey} has shape {tuple(idx.shape)}: {idx.shape[-1]} indices, topk={k}")
            if w.shape != (*idx.shape[:-1], k - 1):
                raise VBLoRAError(
                    f"tensor {wkey} has shape {tuple(w.shape)}, expected {(*idx.shape[:-1], k - 1)} (topk={k})"
                )
            if idx.dtype not in _INDEX_DTYPES:
                raise VBLoRAError(f"tensor {ikey} has dtype {idx.dtype}, expected uint8, int16, int32 or int64")
            check_float(w, wkey)
            index_dtype = index_dtype or idx.dtype
            weight_dtype = weight_dtype or w.dtype
            if (idx.dtype, w.dtype) != (index_dtype, weight_dtype):
                raise VBLoRAError(
                    f"tensors {ikey} ({idx.dtype}) and {wkey} ({w.dtype}) differ in dtype from the first module's "
                    f"({index_dtype}, {weight_dtype}); a packed file holds one of each"
                )
            rows = idx.numel() // k
            indices.append(idx.reshape(rows, k).to(torch.int64))
            weights.append(w.reshape(rows, k - 1))
        modules.append((path, r, idx_a.shape[1], idx_b.shape[0]))
        used.update(keys)
    if BANK_KEY not in tensors:
        raise VBLoRAError(f"missing tensor {BANK_KEY}")
    bank = tensors[BANK_KEY]
    check_float(bank, BANK_KEY)
    if tuple(bank.shape) != (config.num_vectors, config.vector_length):
        raise VBLoRAError(
            f"tensor {BANK_KEY} has shape {tuple(bank.shape)}, the config says "
            f"(num_vectors, vector_length) = {(config.num_vectors, config.vector_length)}"
        )
    used.add(BANK_KEY)
    extras = {key: t for key, t in tensors.items() if key not in used}
    for key in extras:
        if key.endswith((TOPK_INDICES, TOPK_WEIGHTS, *_GRIDS)):
            raise VBLoRAError(f"tensor {key} has no matching VB-LoRA tensors (a top-K indices/weights pair of A and B)")
    assert index_dtype is not None
    return _Layout(modules, prefix, torch.cat(indices), torch.cat(weights), bank, index_dtype, extras)


def _extra_bytes(key: str, t: torch.Tensor) -> tuple[str, str, list[int], bytes]:
    if t.dtype not in _ST_DTYPES:
        raise VBLoRAError(f"tensor {key} has dtype {t.dtype}, which safetensors cannot store")
    data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return key, _ST_DTYPES[t.dtype], list(t.shape), data


def _half_weights(weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weights`` rounded to ``dtype``; rows whose rounded sum would pass 1 + tolerance are rounded toward zero
    instead, so that every stored row stays a valid softmax prefix."""
    w32 = weights.float()
    out = w32.to(dtype)
    over = out.double().sum(-1) > 1 + SUM_TOLERANCE
    if bool(over.any()):
        rows = out[over]
        up = rows.float() > w32[over]
        out[over] = torch.where(up, torch.nextafter(rows, torch.zeros_like(rows)), rows)
    return out


def _max_delta_difference(A: torch.Tensor, B: torch.Tensor, A2: torch.Tensor, B2: torch.Tensor) -> float:
    """max |B@A - B2@A2| as one rank-2r product ``[B, -B2] @ [A; A2]`` (float32): one (out, in) pass instead of two
    deltas and a subtraction, about half the time (at 4096x11008: ~45-60 ms vs ~70-125 ms on a busy 2-core VM; a
    row-blocked torch.mm variant was no faster). float32 rounding of the stacked sum is far below the 16-bit error."""
    delta = ops.delta_weight(torch.cat([A, A2], dim=0), torch.cat([B, -B2], dim=1))
    lo, hi = torch.aminmax(delta)
    return max(-float(lo), float(hi))


def _layer_errors(
    layout: _Layout, weights_half: torch.Tensor, bank_half: torch.Tensor, progress: bool = False
) -> dict[str, float]:
    """Per module, max |B@A - B'@A'| (float32) between the original and the half-stored adapter."""
    from .._progress import bar

    errors: dict[str, float] = {}
    k = layout.indices.shape[1]
    at = 0
    shown = bar(len(layout.modules), "half-precision error", unit="layer", enabled=progress)
    for path, r, in_sub, out_sub in layout.modules:
        shown.update(1)
        n_a, n_b = r * in_sub, out_sub * r
        idx_a = layout.indices[at : at + n_a].reshape(r, in_sub, k)
        idx_b = layout.indices[at + n_a : at + n_a + n_b].reshape(out_sub, r, k)
        factors = []
        for weights, bank in ((layout.weights, layout.bank), (weights_half, bank_half)):
            full = topk.full_weights(weights[at : at + n_a + n_b])
            factors.append(
                ops.low_rank_matrices_from_topk(
                    idx_a, full[:n_a].reshape(r, in_sub, k), idx_b, full[n_a:].reshape(out_sub, r, k), bank
                )
            )
        (A, B), (A2, B2) = factors
        errors[path] = _max_delta_difference(A, B, A2, B2)
        at += n_a + n_b
    shown.close()
    return errors


def write_packed(
    path: Union[str, os.PathLike],
    tensors: dict[str, torch.Tensor],
    config: AdapterConfig,
    half: Optional[torch.dtype] = None,
    *,
    source: Optional[str] = None,
    report_errors: bool = True,
    progress: bool = False,
) -> PackReport:
    """Write a PEFT top-K checkpoint dict (as PEFT's ``get_peft_model_state_dict`` returns for a
    ``save_only_topk_weights`` config) as one packed file, atomically. ``half`` (torch.float16 or torch.bfloat16)
    stores the bank and weights in that dtype; the report then gives each layer's max delta-weight error. ``source``
    (e.g. the checkpoint file the tensors came from) prefixes messages about bad input tensors."""
    path = os.fspath(path)
    if half not in (None, torch.float16, torch.bfloat16):
        raise VBLoRAError(f"half must be None, torch.float16 or torch.bfloat16, got {half}")
    try:
        layout = _layout(tensors, config)
    except VBLoRAError as exc:
        if source is None:
            raise
        raise VBLoRAError(f"{source}: {exc}") from None
    bank, weights = layout.bank.detach().cpu().contiguous(), layout.weights.detach().cpu().contiguous()
    layout.bank, layout.weights = bank, weights
    errors: dict[str, float] = {}
    if half is not None:
        bank_half = bank.to(half)
        if not bool(torch.isfinite(bank_half).all()) and bool(torch.isfinite(bank).all()):
            raise VBLoRAError(f"tensor {BANK_KEY} holds values beyond the range of {half}; try torch.bfloat16")
        weights_half = _half_weights(weights, half)
        if report_errors:  # one low-rank product per layer: seconds for a 7B adapter
            errors = _layer_errors(layout, weights_half, bank_half, progress)
        bank, weights = bank_half, weights_half
    metadata = {
        "indices_dtype": _INDEX_DTYPES[layout.indices_dtype],
        "key_prefix": layout.prefix,
        "config": packed_arrays.stored_config_json(config),
    }
    extras = [_extra_bytes(key, t) for key, t in layout.extras.items()]
    try:
        total = packed_arrays.encode(
            path,
            metadata,
            layout.modules,
            layout.indices.contiguous().numpy(),
            ops.float_view(weights, "topk weights"),
            ops.float_view(bank, "vector bank"),
            extras,
        )
    except VBLoRAError as exc:
        # "<path>: argument ..." is a bad value in the input (an index, a weight row, the bank): name the source
        message = str(exc)
        if source is None or not message.startswith(f"{path}: argument "):
            raise
        raise VBLoRAError(f"{source}: {message[len(path) + 2 :]}") from None
    atomic.usual_mode(path)  # the encoder's temporary file was private
    bank_bytes = bank.numel() * bank.element_size()
    indices_bytes = (layout.indices.numel() * index_bits(config.num_vectors) + 7) // 8
    weights_bytes = weights.numel() * weights.element_size()
    return PackReport(
        path=path,
        total_bytes=total,
        bank_bytes=bank_bytes,
        indices_bytes=indices_bytes,
        weights_bytes=weights_bytes,
        header_and_extras_bytes=total - bank_bytes - indices_bytes - weights_bytes,
        half=half,
        layer_errors=errors,
    )


def _float_tensor(array, dtype_name: str) -> torch.Tensor:  # type: ignore[no-untyped-def]
    t = torch.from_numpy(array)
    return t.view(torch.bfloat16) if dtype_name == "bfloat16" else t


def _extra_tensor(path: str, name: str, dtype_name: str, shape: list[int], data: bytes) -> torch.Tensor:
    dtype = _ST_DTYPES_BY_NAME.get(dtype_name)
    if dtype is None:
        raise VBLoRAError(f"{path}: tensor {name} has dtype {dtype_name}, which torch cannot hold")
    if not data:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape)


def read_packed(path: Union[str, os.PathLike]) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """The adapter config and PEFT top-K checkpoint dict of a packed file: indices in the PEFT dtype recorded at
    packing, weights, bank and extras in their stored dtypes. A bad file raises VBLoRAError naming it."""
    path = os.fspath(path)
    decoded = packed_arrays.read_packed_arrays(path)
    config, meta = decoded.config, decoded.metadata
    index_dtype = _INDEX_DTYPES_BY_NAME[meta["indices_dtype"]]  # the decoder accepts these names only
    prefix, k = meta["key_prefix"], config.topk
    indices = torch.from_numpy(decoded.indices)
    weights = _float_tensor(decoded.weights, decoded.weights_dtype)
    out: dict[str, torch.Tensor] = {}
    at = 0
    for module, r, in_sub, out_sub in decoded.modules:
        keys = _module_keys(prefix, module)
        for (ikey, wkey), shape in (((keys[0], keys[1]), (r, in_sub)), ((keys[2], keys[3]), (out_sub, r))):
            n = shape[0] * shape[1]
            # copies: safetensors refuses to save tensors that share memory
            out[ikey] = indices[at : at + n].reshape(*shape, k).to(index_dtype, copy=True)
            out[wkey] = weights[at : at + n].reshape(*shape, k - 1).clone()
            at += n
    out[BANK_KEY] = _float_tensor(decoded.bank, decoded.bank_dtype)
    for name, dtype_name, shape, data in decoded.extras:
        if name in out:  # the decoder refuses module keys; the bank's PEFT key is checked here
            raise VBLoRAError(f"{path}: tensor {name} clashes with PEFT's key of the vector bank")
        out[name] = _extra_tensor(path, name, dtype_name, shape, data)
    return config, out


def is_packed_file(path: Union[str, os.PathLike]) -> bool:
    """Whether ``path`` is a safetensors file whose metadata marks it as packed (reads the header only)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) != 8:
                return False
            size = int.from_bytes(head, "little")
            if size > 100_000_000:  # the safetensors limit on headers
                return False
            header = fh.read(size)
        if len(header) != size:
            return False
        meta = json.loads(header).get("__metadata__")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(meta, dict) and "vblora_packed" in meta


def topk_tensors_from_full(tensors: dict[str, torch.Tensor], config: AdapterConfig) -> dict[str, torch.Tensor]:
    """A full-logits PEFT checkpoint dict converted to the top-K dict PEFT's ``save_only_topk_weights`` save writes
    (same keys, indices dtype and weights); other tensors pass through. Top-K dicts come back unchanged. The new
    tensors are views of two tensors holding every layer (clone them before ``safetensors.torch.save_file``)."""
    out: dict[str, torch.Tensor] = {}
    logits: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if not key.endswith(_GRIDS):
            out[key] = value
            continue
        if value.dim() != 3 or value.shape[-1] != config.num_vectors:
            raise VBLoRAError(
                f"tensor {key} has shape {tuple(value.shape)}, expected 3-D logits over "
                f"num_vectors={config.num_vectors} vectors"
            )
        if not value.dtype.is_floating_point:
            raise VBLoRAError(f"tensor {key} has dtype {value.dtype}, expected float logits")
        logits[key] = value
    try:
        encoded = topk.encode_many(list(logits.values()), config.topk, config.num_vectors)
    except VBLoRAError:  # name the tensor: encode them one by one
        for key, value in logits.items():
            try:
                topk.encode(value, config.topk, config.num_vectors)
            except VBLoRAError as exc:
                raise VBLoRAError(f"tensor {key}: {exc}") from None
        raise
    for key, (idx, weights) in zip(logits, encoded):
        out[key + TOPK_INDICES] = idx
        out[key + TOPK_WEIGHTS] = weights
    return out
