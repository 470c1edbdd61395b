"""``vblora merge`` without torch: plan the merge of VB-LoRA adapters into a safetensors model, check
everything, then stream it shard by shard through the Rust writer.

Planning reads only the base's safetensors headers and the adapters (configs and their few megabytes of
factors), maps each adapted module to one base tensor, and checks names, shapes, dtypes and the adapters'
agreement before a single byte is written. Writing goes into a temporary folder next to the output, which
is renamed into place at the end; any error or Ctrl-C removes it, so the output is whole or absent. The
base folder is only ever read.

Several adapters merge in one pass: their factors stack along the rank, ``u = [w1 B1 | w2 B2 ...]``,
``v = [A1; A2; ...]`` (transposed for ``fan_in_fan_out`` models such as GPT-2's Conv1D), so each weight is
read, updated with one rounding and written once.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from . import _native
from .config import CONFIG_NAME, PACKED_WEIGHTS_NAME, WEIGHTS_NAME
from .errors import VBLoRAError

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PEFT_PREFIX = "base_model.model."
# --dtype names -> safetensors dtypes.
DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
FLOAT_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
MERGEABLE = ("F32", "F16", "BF16")
# PEFT's VBLoRAConfig defaults, used where a config leaves a field out (as PEFT itself does).
CONFIG_DEFAULTS = {"topk": 2, "num_vectors": 256, "vector_length": 256, "fan_in_fan_out": False}
# Weight files in other formats hold the unmerged weights: never copied into the output.
OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".safetensors")

Factors = tuple[np.ndarray, np.ndarray]


@dataclass
class Shard:
    name: str
    path: str
    tensors: dict[str, tuple[str, tuple[int, ...]]]
    data_bytes: int


@dataclass
class Base:
    path: str
    shards: list[Shard]
    index: Optional[dict]
    # tensor name -> its shard
    where: dict[str, Shard]


@dataclass
class Adapter:
    path: str
    fan_in_fan_out: bool
    weight: float
    # stored module path -> (A (r, in), B (out, r)), float32
    factors: dict[str, Factors]


@dataclass
class Plan:
    base: Base
    adapters: list[Adapter]
    out_dtype: Optional[str]
    # shard name -> {tensor name: (u, v)}
    updates: dict[str, dict[str, Factors]]
    # other files of the base copied as they are (config.json gets the new dtype with --dtype)
    extra_files: list[str]
    notes: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(s.data_bytes for s in self.base.shards)

    @property
    def merged_tensors(self) -> int:
        return sum(len(u) for u in self.updates.values())


# --- reading ----------------------------------------------------------------------------------------


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError as exc:
        raise VBLoRAError(f"{path}: file not found") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise VBLoRAError(f"{path}: not a readable JSON file: {exc}") from exc
    if not isinstance(data, dict):
        raise VBLoRAError(f"{path}: expected a JSON object")
    return data


def _shard(folder: str, name: str) -> Shard:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise VBLoRAError(f"{path}: file not found")
    tensors, _, data_bytes = _native.safetensors_header(path)
    return Shard(name, path, tensors, data_bytes)


def read_base(folder: str) -> Base:
    """The base model's shards (headers only) and index."""
    if not os.path.isdir(folder):
        raise VBLoRAError(f"{folder}: not a folder (BASE must be a transformers model folder)")
    index_path = os.path.join(folder, INDEX_FILE)
    if os.path.exists(index_path):
        index = _read_json(index_path)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise VBLoRAError(f"{index_path}: no weight_map")
        names = sorted(set(weight_map.values()), key=str)
        for name in names:
            if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", ".."):
                raise VBLoRAError(f"{index_path}: shard name {name!r} is not a file name in this folder")
        shards = [_shard(folder, name) for name in names]
        by_name = {s.name: s for s in shards}
        for tensor, name in weight_map.items():
            if tensor not in by_name[name].tensors:
                raise VBLoRAError(f"{by_name[name].path}: no tensor {tensor}, which {INDEX_FILE} places there")
    elif os.path.exists(os.path.join(folder, WEIGHTS_FILE)):
        index = None
        shards = [_shard(folder, WEIGHTS_FILE)]
    else:
        raise VBLoRAError(
            f"{folder}: no {WEIGHTS_FILE} or {INDEX_FILE} (only safetensors models can be merged this way)"
        )
    where: dict[str, Shard] = {}
    for shard in shards:
        for tensor in shard.tensors:
            if tensor in where:
                raise VBLoRAError(f"{shard.path}: tensor {tensor} is also in {where[tensor].path}")
            where[tensor] = shard
    return Base(folder, shards, index, where)


def _packed_file(path: str) -> Optional[str]:
    """The packed weights file of ``path`` (the file itself, or a folder holding one), else None."""
    if os.path.isfile(path):
        return path
    candidate = os.path.join(path, PACKED_WEIGHTS_NAME)
    if os.path.isfile(candidate) and not os.path.isfile(os.path.join(path, WEIGHTS_NAME)):
        return candidate
    return None


def read_adapter(folder: str, weight: float, num_threads: int) -> Adapter:
    """An adapter's config and its factors (validated by the Rust reader): a PEFT folder, or a packed file or a
    folder holding one (whose config travels inside the file)."""
    packed = _packed_file(folder)
    if packed is not None:
        config_text, factors = _native.packed_adapter_factors(packed, num_threads)
        config = {**CONFIG_DEFAULTS, **json.loads(config_text)}
        _check_config(packed, config)
        return Adapter(packed, bool(config["fan_in_fan_out"]), weight, factors)
    config_path = os.path.join(folder, CONFIG_NAME)
    config = {**CONFIG_DEFAULTS, **_read_json(config_path)}
    _check_config(config_path, config)
    weights_path = os.path.join(folder, WEIGHTS_NAME)
    if not os.path.isfile(weights_path):
        raise VBLoRAError(f"{weights_path}: file not found")
    factors = _native.adapter_factors(
        weights_path, config["topk"], config["num_vectors"], config["vector_length"], num_threads
    )
    return Adapter(weights_path, bool(config["fan_in_fan_out"]), weight, factors)


def _check_config(config_path: str, config: dict) -> None:
    peft_type = config.get("peft_type", "VBLORA")
    if str(peft_type).upper() != "VBLORA":
        raise VBLoRAError(f"{config_path}: peft_type is {peft_type!r}, not a VB-LoRA adapter")
    if config.get("bias", "none") != "none":
        raise VBLoRAError(f"{config_path}: bias={config['bias']!r}: merging trained biases is not supported")
    if config.get("modules_to_save"):
        raise VBLoRAError(f"{config_path}: modules_to_save is set: merging those modules is not supported")
    for key in ("topk", "num_vectors", "vector_length"):
        if not isinstance(config[key], int) or isinstance(config[key], bool):
            raise VBLoRAError(f"{config_path}: {key} must be an integer, got {config[key]!r}")


# --- planning ---------------------------------------------------------------------------------------


class _Names:
    """Base tensor names, with every dotted suffix indexed, for matching modules across prefixes."""

    def __init__(self, names: list[str]) -> None:
        self.names = set(names)
        self.by_suffix: dict[str, list[str]] = {}
        for name in names:
            parts = name.split(".")
            for i in range(1, len(parts)):
                self.by_suffix.setdefault(".".join(parts[i:]), []).append(name)

    def match(self, target: str) -> list[str]:
        """``target`` itself; else base names that add a prefix to it, and the longest suffix of
        ``target`` that is a base name (the adapter saved with a prefix the base lacks)."""
        if target in self.names:
            return [target]
        found = list(self.by_suffix.get(target, []))
        parts = target.split(".")
        for i in range(1, len(parts) - 1):
            suffix = ".".join(parts[i:])
            if suffix in self.names:
                found.append(suffix)
                break
        return found


def _target(module: str, names: _Names, adapter: Adapter) -> str:
    stripped = module[len(PEFT_PREFIX) :] if module.startswith(PEFT_PREFIX) else module
    target = f"{stripped}.weight"
    found = names.match(target)
    if not found:
        raise VBLoRAError(f"{adapter.path}: module {stripped} has no weight {target} in the base model")
    if len(found) > 1:
        raise VBLoRAError(
            f"{adapter.path}: module {stripped} matches several base tensors ({', '.join(sorted(found))})"
        )
    return found[0]


def _check_tensor(shard: Shard, name: str, module: str, adapter: Adapter, out_dtype: Optional[str]) -> None:
    a, b = adapter.factors[module]
    expected = (a.shape[1], b.shape[0]) if adapter.fan_in_fan_out else (b.shape[0], a.shape[1])
    dtype, shape = shard.tensors[name]
    if tuple(shape) != expected:
        layout = "(in, out) as fan_in_fan_out=true says" if adapter.fan_in_fan_out else "(out, in)"
        raise VBLoRAError(
            f"{shard.path}: tensor {name} has shape {tuple(shape)}, but module {module} of {adapter.path} "
            f"needs {expected}, {layout}"
        )
    effective = DTYPES[out_dtype] if out_dtype and dtype in FLOAT_SIZES else dtype
    if effective not in MERGEABLE:
        raise VBLoRAError(
            f"{shard.path}: tensor {name} has dtype {dtype}; merging needs F32, F16 or BF16 (see --dtype)"
        )


def _stack(parts: list[tuple[Adapter, Factors]]) -> Factors:
    """``(u, v)`` with ``u @ v = sum_i w_i * delta_i`` in the base tensor's layout."""
    us, vs = [], []
    for adapter, (a, b) in parts:
        scaled_b = b if adapter.weight == 1.0 else b * np.float32(adapter.weight)
        if adapter.fan_in_fan_out:  # W is (in, out): W += A^T @ B^T
            us.append(a.T)
            vs.append(scaled_b.T)
        else:  # W is (out, in): W += B @ A
            us.append(scaled_b)
            vs.append(a)
    u = np.ascontiguousarray(np.concatenate(us, axis=1), dtype=np.float32)
    v = np.ascontiguousarray(np.concatenate(vs, axis=0), dtype=np.float32)
    return u, v


def _extra_files(base: Base) -> tuple[list[str], list[str]]:
    """Files of the base copied to the output, and notes on what is left out."""
    shard_names = {s.name for s in base.shards}
    files, notes = [], []
    for name in sorted(os.listdir(base.path)):
        path = os.path.join(base.path, name)
        if name in shard_names or name == INDEX_FILE:
            continue
        if not os.path.isfile(path):
            notes.append(f"not copied (a folder): {path}")
        elif name.endswith(OTHER_WEIGHTS) or name.endswith(".index.json"):
            notes.append(f"not copied (weights in another format, unmerged): {path}")
        elif not os.access(path, os.R_OK):
            raise VBLoRAError(f"{path}: not readable")
        else:
            files.append(name)
    return files, notes


def plan_merge(
    base_dir: str,
    adapter_dirs: list[str],
    weights: Optional[list[float]] = None,
    out_dtype: Optional[str] = None,
    num_threads: int = 0,
) -> Plan:
    """Read and check everything a merge needs; raises VBLoRAError naming the file at fault."""
    if not adapter_dirs:
        raise VBLoRAError("no adapter to merge")
    if weights is None:
        weights = [1.0] * len(adapter_dirs)
    if len(weights) != len(adapter_dirs):
        raise VBLoRAError(f"--weights has {len(weights)} values for {len(adapter_dirs)} adapters")
    if not all(math.isfinite(w) for w in weights):
        raise VBLoRAError(f"--weights must be finite numbers, got {weights}")
    if out_dtype is not None and out_dtype not in DTYPES:
        raise VBLoRAError(f"dtype must be one of {', '.join(DTYPES)}, got {out_dtype!r}")
    base = read_base(base_dir)
    adapters = [read_adapter(d, w, num_threads) for d, w in zip(adapter_dirs, weights)]
    for adapter in adapters[1:]:
        if adapter.fan_in_fan_out != adapters[0].fan_in_fan_out:
            raise VBLoRAError(
                f"{adapter.path} has fan_in_fan_out={adapter.fan_in_fan_out} but {adapters[0].path} has "
                f"{adapters[0].fan_in_fan_out}: they cannot both fit this model's weights"
            )
    names = _Names(list(base.where))
    per_tensor: dict[str, list[tuple[Adapter, Factors]]] = {}
    for adapter in adapters:
        seen: dict[str, str] = {}
        for module in adapter.factors:
            target = _target(module, names, adapter)
            if target in seen:
                raise VBLoRAError(f"{adapter.path}: modules {seen[target]} and {module} both map to {target}")
            seen[target] = module
            _check_tensor(base.where[target], target, module, adapter, out_dtype)
            per_tensor.setdefault(target, []).append((adapter, adapter.factors[module]))
    updates: dict[str, dict[str, Factors]] = {}
    for target, parts in per_tensor.items():
        updates.setdefault(base.where[target].name, {})[target] = _stack(parts)
    files, notes = _extra_files(base)
    return Plan(base, adapters, out_dtype, updates, files, notes)


# --- writing ----------------------------------------------------------------------------------------


def check_output(out: str, base_dir: str, adapter_dirs: list[str], force: bool) -> None:
    """Refuse an existing OUT without ``force``, and any OUT whose replacement would delete an input."""
    real_out = os.path.realpath(out)
    for label, folder in [("BASE", base_dir)] + [("ADAPTER", d) for d in adapter_dirs]:
        real = os.path.realpath(folder)
        if real_out == real or real.startswith(real_out + os.sep) or real_out.startswith(real + os.sep):
            raise VBLoRAError(f"{out}: the output must lie outside {label} {folder} and not contain it")
    if os.path.lexists(out) and not force:
        raise VBLoRAError(f"{out}: already exists (pass --force to replace it)")


def _output_index(plan: Plan) -> dict:
    index = json.loads(json.dumps(plan.base.index))
    meta = index.get("metadata")
    if plan.out_dtype and isinstance(meta, dict) and "total_size" in meta:
        size = FLOAT_SIZES[DTYPES[plan.out_dtype]]
        total = 0
        for shard in plan.base.shards:
            total += shard.data_bytes
            for dtype, shape in shard.tensors.values():
                if dtype in FLOAT_SIZES:
                    total += math.prod(shape) * (size - FLOAT_SIZES[dtype])
        meta["total_size"] = total
    return index


def _write_json(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=False)
        fh.write("\n")


def _copy_extra(plan: Plan, folder: str) -> None:
    for name in plan.extra_files:
        src, dst = os.path.join(plan.base.path, name), os.path.join(folder, name)
        if name == "config.json" and plan.out_dtype:
            config = _read_json(src)
            # transformers 5 writes "dtype", older versions "torch_dtype"; from_pretrained(dtype="auto") reads it.
            config["dtype"] = plan.out_dtype
            if "torch_dtype" in config:
                config["torch_dtype"] = plan.out_dtype
            _write_json(dst, config)
        else:
            shutil.copyfile(src, dst)


def _install(tmp: str, out: str) -> None:
    """Rename the finished ``tmp`` to ``out``, replacing what is there (the caller checked --force)."""
    if not os.path.lexists(out):
        os.rename(tmp, out)
        return
    parent = os.path.dirname(os.path.abspath(out))
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=parent)
    moved = os.path.join(old, "previous")
    os.rename(out, moved)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(moved, out)
        os.rmdir(old)
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_merged(
    plan: Plan,
    out: str,
    num_threads: int = 0,
    progress: Optional[Callable[[int], object]] = None,
    force: bool = False,
) -> None:
    """Stream every shard of the base with the plan's updates into a temporary folder next to ``out``,
    add the index and the other files, then move it to ``out`` (replacing it only with ``force``). On any
    error, nothing is left behind and an existing ``out`` is kept."""
    check_output(out, plan.base.path, [os.path.dirname(a.path) for a in plan.adapters], force)
    out = os.path.abspath(out)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
    try:
        for shard in plan.base.shards:
            _native.merge_safetensors(
                shard.path,
                os.path.join(tmp, shard.name),
                plan.updates.get(shard.name, {}),
                plan.out_dtype,
                num_threads,
                progress,
            )
        if plan.base.index is not None:
            _write_json(os.path.join(tmp, INDEX_FILE), _output_index(plan))
        _copy_extra(plan, tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would make the model private
        _install(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
