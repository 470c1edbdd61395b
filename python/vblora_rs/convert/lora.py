"""The exactly equivalent plain LoRA adapter of a VB-LoRA adapter (``vblora to-lora``, the vLLM plugin).

VB-LoRA adds ``B @ A`` to each target, with A and B gathered from the bank; a LoRA adapter of the same rank
holding those very A and B with ``lora_alpha = r`` (scaling 1) adds the same delta, so the export is exact
(no SVD, no truncation) and loads anywhere PEFT's LoRA does.

Every module is converted at once, whatever the input: the sub-vectors of the whole adapter are computed in two
calls on flat arrays (a packed file's decoded arrays, or a PEFT folder's tensors concatenated: PEFT's compute form
of the stored top-K, or one Rust top-K selection over every module's full logits; then one bank gather), the B
grids are transposed together, and each module's ``A (r, in)`` and ``B (out, r)`` are views of two buffers
(:func:`_split_factors`, for both inputs): the same values bit for bit as the module by module path (every step is
row by row), with nothing per module but two numpy views. Python work per module would contend for the GIL with
vLLM's event loop when the resolver converts inside its API server (timings: docs/bench_vllm.md). The module by
module path (:func:`lora_tensors`) remains for what the flat path leaves to it (full logits of mixed dtypes) and
to name the module of an error.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, NamedTuple, Optional, Union

import numpy as np

from ..errors import VBLoRAError
from ..storage import atomic, finite
from ..storage.adapter_config import AdapterConfig
from ..storage.header_size import json_string_bytes
from ..storage.locate import PACKED, locate
from ..storage.names import CONFIG_NAME, MODEL_PREFIX, WEIGHTS_NAME
from ..storage.packed_arrays import PackedArrays, read_packed_arrays

if TYPE_CHECKING:
    import torch

    from .adapter_tensors import AdapterFile

__all__ = [
    "LORA_CONFIG_NAME",
    "LORA_WEIGHTS_NAME",
    "RawTensor",
    "export_lora",
    "lora_config",
    "lora_tensors",
    "packed_lora_tensors",
    "peft_lora_tensors",
    "save_tensors",
]

LORA_CONFIG_NAME = CONFIG_NAME
LORA_WEIGHTS_NAME = WEIGHTS_NAME  # PEFT names a LoRA adapter's weights file as any other
# VB-LoRA's bias modes, in LoRA's words.
_BIAS = {"none": "none", "all": "all", "vblora_only": "lora_only"}

# TensorSpec's names of the safetensors dtypes a packed file's extras may hold
SPEC_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "U64": "uint64",
    "I32": "int32", "U32": "uint32", "I16": "int16", "U16": "uint16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "C64": "complex64",
}  # fmt: skip


class RawTensor(NamedTuple):
    """An extra tensor carried over as it is stored: TensorSpec's dtype name, its shape, its bytes (uint8, C order,
    little-endian)."""

    dtype: str
    shape: tuple[int, ...]
    data: np.ndarray


Tensors = dict[str, Union[np.ndarray, RawTensor]]


def _sub_vectors(arrays: PackedArrays) -> np.ndarray:
    """``(S, L)`` float32: each sub-vector as PEFT's forward builds it from the stored top-K."""
    import torch

    from .. import ops
    from . import topk

    indices = torch.from_numpy(arrays.indices)
    weights = torch.from_numpy(arrays.weights)
    bank = torch.from_numpy(arrays.bank)
    if arrays.weights_dtype == "bfloat16":
        weights = weights.view(torch.bfloat16)
    if arrays.bank_dtype == "bfloat16":
        bank = bank.view(torch.bfloat16)
    idx, w = topk.compute_form(indices, weights, arrays.config.num_vectors)
    return ops.low_rank_from_topk(idx, w, bank, name="vblora_logits").numpy()


def packed_lora_tensors(arrays: PackedArrays) -> Optional[Tensors]:
    """``base_model.model.<module>.lora_A.weight (r, in)`` and ``.lora_B.weight (out, r)`` in float32 for every
    module (sorted by name, as PEFT lists them), plus the extras as stored; None for an extra of a dtype unknown
    here.
    A factor that overflows float32 is an error naming the file and tensor."""
    extras: Tensors = {}
    for name, dtype, shape, data in arrays.extras:
        if dtype not in SPEC_DTYPES:
            return None
        extras[name] = RawTensor(SPEC_DTYPES[dtype], tuple(shape), np.frombuffer(data, dtype=np.uint8))
    names, dims = [m[0] for m in arrays.modules], arrays.dims
    out: Tensors = {}
    out.update(_split_factors(_sub_vectors(arrays), names, dims[:, 1], dims[:, 2], arrays.config.r, arrays.path))
    out.update(extras)
    return out


def peft_lora_tensors(adapter: AdapterFile) -> Optional[Tensors]:
    """:func:`packed_lora_tensors` of a PEFT folder (full logits or top-K, as read by
    :func:`~vblora_rs.convert.adapter_tensors.read_adapter`): every module's sub-vectors in one selection (full
    logits: one Rust top-K over all modules' logits; top-K: PEFT's compute form of all stored rows at once) and one
    bank gather, then the same split into A and B: bit for bit what :func:`lora_tensors` builds module by module
    (every step is row by row). None where that path must go module by module: full logits of several dtypes, or
    an error, which :func:`lora_tensors` then names by module."""
    import torch

    from .. import ops
    from . import topk
    from .adapter_tensors import FULL

    extras = adapter.extras
    config, modules = adapter.config, list(adapter.modules.values())
    if not modules:
        return None
    try:
        if adapter.storage == FULL:  # A then B of each module: the rows of the flat sub-vectors
            logits = [t for m in modules for t in adapter.logits(m.name)]
            if len({t.dtype for t in logits}) > 1 or not ops.native_ok(*logits):
                return None
            idx, weights = ops.topk_softmax_many(logits, config.topk, name="vblora_logits")
        else:  # the rows read_adapter checked at once, else gathered here
            k = config.topk
            if adapter.stored_rows is not None:
                indices, stored = adapter.stored_rows
            else:
                parts = [adapter.topk(m.name) for m in modules]
                pairs = [pair for p in parts for pair in ((p[0], p[1]), (p[2], p[3]))]  # A then B, module by module
                indices = torch.cat([i.reshape(-1, k).to(torch.long) for i, _ in pairs])
                # rows from the indices: with k=1 the weights hold no values
                stored = torch.cat([w.reshape(i.numel() // k, k - 1) for i, w in pairs])
            idx, weights = topk.compute_form(indices, stored, config.num_vectors)
        rows = ops.low_rank_from_topk(idx, weights, adapter.bank, name="vblora_logits").numpy()
    except VBLoRAError:
        return None  # lora_tensors raises it again, naming the module
    L = config.vector_length
    in_sub = np.array([m.in_features // L for m in modules], dtype=np.int64)
    out_sub = np.array([m.out_features // L for m in modules], dtype=np.int64)
    out: Tensors = {}
    out.update(_split_factors(rows, [m.name for m in modules], in_sub, out_sub, config.r, adapter.weights_path))
    for key, value in extras.items():  # checked after the factors, as lora_tensors' dict lists them
        value = value.detach().contiguous()
        if value.dtype.is_floating_point:
            problem = finite.overflow_problem(value.float().numpy())
            if problem:
                raise VBLoRAError(f"{adapter.weights_path}: {key} {problem}")
        data = value.reshape(-1).view(torch.uint8).numpy()
        out[key] = RawTensor(str(value.dtype).removeprefix("torch."), tuple(value.shape), data)
    return out


def _split_factors(
    rows: np.ndarray, names: list[str], in_sub: np.ndarray, out_sub: np.ndarray, r: int, path: str
) -> dict[str, np.ndarray]:
    """The LoRA factors of every module from the flat sub-vectors ``rows (S, L)`` (float32), which hold each
    module's A grid (``r * in_sub`` rows) then its B grid (``out_sub * r`` rows), module after module in the order
    of ``names``: ``{base_model.model.<module>.lora_A.weight: A (r, in), ...lora_B.weight: B (out, r)}``, sorted by
    module name, each a view of one of two buffers. A factor that overflows float32 is an error naming ``path``, the
    module and the factor."""
    L = rows.shape[1]
    # each module's rows: A grid (r * in_sub) then B grid (out_sub * r); split them into two buffers
    a_len, b_len = r * in_sub, out_sub * r
    is_b = np.repeat(np.tile(np.array([False, True]), len(a_len)), np.column_stack([a_len, b_len]).reshape(-1))
    a_flat = rows[~is_b].reshape(-1)  # module after module: (r, in_sub, L) each, i.e. A (r, in_sub * L)
    # B grids (out_sub, r, L) -> (out_sub, L, r), all at once since r is the adapter's: B (out_sub * L, r) each
    b_rows = np.ascontiguousarray(rows[is_b].reshape(-1, r, L).transpose(0, 2, 1)).reshape(-1, r)
    # offsets as Python ints (numpy scalars per module cost more than the slicing)
    a_end, a_size = np.cumsum(a_len * L).tolist(), (a_len * L).tolist()
    b_end, b_size = np.cumsum(out_sub * L).tolist(), (out_sub * L).tolist()
    factors: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, a_stop, a_n, b_stop, b_n in zip(names, a_end, a_size, b_end, b_size):
        factors[name] = (a_flat[a_stop - a_n : a_stop].reshape(r, -1), b_rows[b_stop - b_n : b_stop])
    if finite.overflow_problem(rows):  # A and B hold the very values of ``rows``
        _raise_overflow(path, factors)
    out: dict[str, np.ndarray] = {}
    for name in sorted(factors):
        out[f"{MODEL_PREFIX}{name}.lora_A.weight"], out[f"{MODEL_PREFIX}{name}.lora_B.weight"] = factors[name]
    return out


def _raise_overflow(path: str, factors: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """Name the first factor that is not finite, module by module in name order (A before B), as the module by
    module export checks them (the error path: one pass over the modules)."""
    for name in sorted(factors):
        for label, factor in zip(("lora_A", "lora_B"), factors[name]):
            problem = finite.overflow_problem(factor)
            if problem:
                raise VBLoRAError(f"{path}: {MODEL_PREFIX}{name}.{label}.weight {problem}")
    raise VBLoRAError(f"{path}: the LoRA factors overflow float32")


_NUMPY_SPEC = {np.float32: "float32"}  # the factors' dtype


def save_tensors(tensors: Tensors, path: str, metadata: dict[str, str]) -> None:
    """Write ``tensors`` (float32 factors, and extras as stored) as one safetensors file: the same bytes as
    safetensors' own ``save_file`` of them (the same serializer), from the buffers as they are (one TensorSpec per
    tensor: ``safetensors.numpy.save_file`` spent 6 ms of a 40 ms export on numpy's ``dtype.name`` and ``ctypes``
    per tensor, 420 of them)."""
    from safetensors import TensorSpec, serialize_file

    specs = {}
    for key, t in tensors.items():
        if isinstance(t, RawTensor):
            dtype, shape, data = t
        else:
            dtype, shape, data = _NUMPY_SPEC[t.dtype.type], t.shape, t
        if not data.flags.c_contiguous:
            raise VBLoRAError(f"{path}: tensor {key} is not contiguous")  # every tensor here is a C-order buffer
        pointer = data.__array_interface__["data"][0]
        specs[key] = TensorSpec(dtype=dtype, shape=list(shape), data_ptr=pointer, data_len=data.nbytes)
    serialize_file(specs, path, metadata=metadata)  # the buffers outlive the call: ``tensors`` holds them


def lora_config(cfg: AdapterConfig, modules: Iterable[str]) -> dict[str, Any]:
    """PEFT ``LoraConfig`` fields of the exported adapter of ``modules`` (as ``LoraConfig.to_dict`` names them)."""
    return {
        "peft_type": "LORA",
        "task_type": cfg.task_type,
        "base_model_name_or_path": cfg.base_model_name_or_path,
        "revision": cfg.revision,
        "inference_mode": True,
        "auto_mapping": None,
        "r": cfg.r,
        "lora_alpha": cfg.r,  # scaling = lora_alpha / r = 1: VB-LoRA has no scaling
        "lora_dropout": 0.0,
        # exact module paths: the same modules whatever target_modules, layers_to_transform, exclude_modules chose
        "target_modules": sorted(modules),
        "fan_in_fan_out": cfg.fan_in_fan_out,
        "bias": _BIAS[cfg.bias],
        "modules_to_save": list(cfg.modules_to_save) if cfg.modules_to_save else None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_rslora": False,
        "use_dora": False,
    }


def lora_tensors(adapter: AdapterFile) -> dict[str, torch.Tensor]:
    """``base_model.model.<module>.lora_A.weight`` (r, in) and ``.lora_B.weight`` (out, r) in float32, plus the
    adapter's other tensors (modules_to_save, biases) under their own keys."""
    from .adapter_tensors import module_factors

    out: dict[str, torch.Tensor] = {}
    for module, (A, B) in module_factors(adapter, progress=True).items():
        out[f"{MODEL_PREFIX}{module}.lora_A.weight"] = A
        out[f"{MODEL_PREFIX}{module}.lora_B.weight"] = B
    for key, value in adapter.extras.items():
        out[key] = value.contiguous()
    return out


def _output_bytes(adapter: AdapterFile) -> int:
    """Bytes of the exported tensors: A (r, in) and B (out, r) in float32 per module, plus the extras."""
    r = adapter.config.r
    factors = sum(4 * r * (m.in_features + m.out_features) for m in adapter.modules.values())
    return factors + sum(t.nbytes for t in adapter.extras.values())


def _packed_output_bytes(arrays: PackedArrays) -> int:
    """:func:`_output_bytes` of a packed file, from its modules table."""
    cfg = arrays.config
    features = int((arrays.dims[:, 1] + arrays.dims[:, 2]).sum()) * cfg.vector_length
    return 4 * cfg.r * features + sum(len(data) for *_, data in arrays.extras)


def _check_room(out: str, needed: int) -> None:
    """The export must fit the output's disk and this machine's free memory (it is built in memory, then written):
    a small hostile file can describe factors of any size."""
    free_disk = shutil.disk_usage(os.path.dirname(out)).free
    if needed > free_disk:
        raise VBLoRAError(f"{out}: the LoRA factors take {needed:,d} bytes, {free_disk:,d} are free on that disk")
    try:
        free_memory = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return
    if needed > free_memory:
        raise VBLoRAError(f"{out}: the LoRA factors take {needed:,d} bytes, {free_memory:,d} of memory are free")


def export_lora(adapter_path: Union[str, os.PathLike], output: Union[str, os.PathLike], force: bool = False) -> str:
    """Export the VB-LoRA adapter at ``adapter_path`` as the exactly equivalent PEFT LoRA adapter.

    Args:
        adapter_path: a PEFT VB-LoRA adapter folder (full logits or top-K) or a packed adapter file.
        output: the folder to write (``adapter_config.json`` + ``adapter_model.safetensors``, rank r,
            ``lora_alpha = r``, float32 factors); it appears whole or not at all (:mod:`vblora_rs.storage.atomic`).
        force: replace an existing ``output``.

    Returns:
        The absolute path of the written folder.

    Raises:
        VBLoRAError: naming the file, tensor or module at fault (factors that overflow float32 included);
            nothing is written then.
    """
    from safetensors.torch import save_file

    from .adapter_tensors import read_adapter

    out = os.path.abspath(os.fspath(output))
    atomic.check_target(out, force)
    found = locate(adapter_path)
    flat = sys.byteorder == "little"  # save_tensors writes the buffers as they are; safetensors is little-endian
    if found.kind == PACKED:  # every module at once from the flat arrays (a file may list 300k modules)
        arrays = read_packed_arrays(found.weights_path)
        weights_path, config, names = found.weights_path, arrays.config, [m[0] for m in arrays.modules]
        _check_inputs(out, weights_path, _packed_output_bytes(arrays), names)
        tensors: Optional[dict[str, Any]] = packed_lora_tensors(arrays) if flat else None
        save: Callable[..., Any] = save_tensors
    else:  # a PEFT folder: every module at once too, unless peft_lora_tensors leaves it to the per-module path
        adapter = read_adapter(adapter_path)
        weights_path, config, names = adapter.weights_path, adapter.config, list(adapter.modules)
        _check_inputs(out, weights_path, _output_bytes(adapter), names)
        tensors = peft_lora_tensors(adapter) if flat else None
        save = save_tensors
    if tensors is None:  # full logits of mixed dtypes, an error to name, an extra of an unknown dtype: by module
        if found.kind == PACKED:
            adapter = read_adapter(adapter_path)
            weights_path, config, names = adapter.weights_path, adapter.config, list(adapter.modules)
            _check_inputs(out, weights_path, _output_bytes(adapter), names)
        tensors = lora_tensors(adapter)
        for key, value in tensors.items():
            if value.dtype.is_floating_point:
                problem = finite.overflow_problem(value.detach().float().numpy())
                if problem:
                    raise VBLoRAError(f"{weights_path}: {key} {problem}")
        save = save_file
    config_fields = lora_config(config, names)

    staging = atomic.temp_folder(out)
    try:
        try:
            save(tensors, os.path.join(staging, LORA_WEIGHTS_NAME), metadata={"format": "pt"})
        except Exception as exc:  # safetensors' SafetensorError (a full disk, ...) is no OSError
            if isinstance(exc, OSError) or type(exc).__name__ == "SafetensorError":
                raise VBLoRAError(f"{out}: writing {LORA_WEIGHTS_NAME} failed: {exc}") from None
            raise
        with open(os.path.join(staging, LORA_CONFIG_NAME), "w", encoding="utf-8") as fh:
            json.dump(config_fields, fh, indent=2, sort_keys=True)
            fh.write("\n")
        atomic.usual_mode(staging, folder=True)  # mkdtemp's 0700 would make the adapter private
        atomic.install(staging, out, replace=force)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


# safetensors readers refuse longer headers
MAX_HEADER_BYTES = 100_000_000
# the least a header entry takes besides its key: `:{"dtype":"F32","shape":[1,1],"data_offsets":[0,0]},`
_ENTRY_MIN = len(':{"dtype":"F32","shape":[1,1],"data_offsets":[0,0]},')


def _check_header(weights_path: str, names: list[str]) -> None:
    """The LoRA file's header must fit safetensors' limit: refused from a lower bound of it, before any factor is
    built (a file listing a million modules would need two million entries)."""

    per_key = len(MODEL_PREFIX) + len(".lora_A.weight") + _ENTRY_MIN
    lower = 2 * (int(json_string_bytes(names).sum()) + per_key * len(names))
    if lower > MAX_HEADER_BYTES:
        raise VBLoRAError(
            f"{weights_path}: lists {len(names):,d} modules: their LoRA file ({2 * len(names):,d} tensors) needs a "
            f"header of at least {lower:,d} bytes, and safetensors readers accept at most {MAX_HEADER_BYTES:,d}"
        )


def _check_inputs(out: str, weights_path: str, needed: int, names: list[str]) -> None:
    """The input is not the output's own folder, the LoRA header fits safetensors, the export fits disk and memory."""
    if os.path.abspath(os.path.dirname(weights_path)) == out:
        raise VBLoRAError(f"{out}: is the input adapter's own folder; choose another output")
    _check_header(weights_path, names)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    _check_room(out, needed)


