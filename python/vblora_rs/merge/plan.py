"""The plan of a ``vblora merge``, without torch: every check made before a byte is written.

Planning reads only the base's safetensors headers and the adapters (validated whole, in time and memory
linear in their files, but no factor built yet), maps each adapted module to one base tensor, and checks names,
shapes, dtypes and the adapters' agreement before a single byte is written. Whether a weight is stored
transposed (``fan_in_fan_out``) is decided per layer from the base model's type, as PEFT decides it from the
layer class, never from the adapter's config. Writing the plan is :mod:`.write`.

Several adapters merge in one pass: their factors stack along the rank, ``u = [w1 B1 | w2 B2 ...]``,
``v = [A1; A2; ...]`` (transposed for layers stored ``(in, out)``, GPT-2's Conv1D), so each weight is read,
updated with one rounding and written once.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .. import _native
from ..errors import VBLoRAError
from ..storage import finite, targets
from ..storage.adapter_config import parse_config, read_config
from ..storage.json_file import read_object
from ..storage.locate import PACKED, locate
from ..storage.names import MODEL_PREFIX

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# --dtype names -> safetensors dtypes.
DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
FLOAT_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
MERGEABLE = ("F32", "F16", "BF16")
# Weight files in other formats hold the unmerged weights: never copied into the output.
OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".safetensors")
# What a transformers model folder needs besides its weights: configs, tokenizer and processor files, remote
# code, the model card and license. Anything else (dotfiles such as an .hf_token, notes, archives) stays behind.
MODEL_FILE_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".py", ".tiktoken", ".md")
MODEL_FILE_PREFIXES = ("LICENSE", "LICENCE", "NOTICE", "USE_POLICY")
# transformers model types whose layers of these names are Conv1D, weights stored (in, out): PEFT sets
# fan_in_fan_out for them whatever the config says; every other adapted layer is an nn.Linear, stored (out, in).
CONV1D_LAYERS: dict[str, frozenset[str]] = {
    "gpt2": frozenset({"c_attn", "q_attn", "c_proj", "c_fc"}),
    "decision_transformer": frozenset({"c_attn", "q_attn", "c_proj", "c_fc"}),
    "imagegpt": frozenset({"c_attn", "q_attn", "c_proj", "c_fc"}),
    "openai-gpt": frozenset({"c_attn", "c_proj", "c_fc"}),
    "clvp": frozenset({"c_fc", "c_proj"}),
}
FLOAT32_MAX = float(np.finfo(np.float32).max)

Factors = tuple[np.ndarray, np.ndarray]
# (rank, fan_in, fan_out) of a module's A (rank, fan_in) and B (fan_out, rank)
Shape = tuple[int, int, int]


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
    # config.json's model_type ("" without one): decides which layers are stored transposed
    model_type: str = ""


@dataclass
class Adapter:
    path: str
    config: dict
    weight: float
    # stored module path -> (rank, fan_in, fan_out)
    shapes: dict[str, Shape]
    packed: bool

    def factors(self, modules: list[str], num_threads: int) -> dict[str, Factors]:
        """``{module: (A (r, in), B (out, r))}`` in float32 for ``modules`` only."""
        if self.packed:
            return _native.packed_adapter_factors(self.path, num_threads, modules)[1]
        c = self.config
        return _native.adapter_factors(self.path, c["topk"], c["num_vectors"], c["vector_length"], num_threads, modules)


@dataclass
class Part:
    """One adapter's module merged into one base tensor."""

    adapter: Adapter
    module: str
    transposed: bool  # the base stores this layer (in, out)


@dataclass
class Plan:
    base: Base
    adapters: list[Adapter]
    out_dtype: Optional[str]
    # shard name -> {tensor name: the parts merged into it}
    updates: dict[str, dict[str, list[Part]]]
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


def _shard(folder: str, name: str) -> Shard:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise VBLoRAError(f"{path}: file not found")
    tensors, _, data_bytes = _native.safetensors_header(path)
    return Shard(name, path, tensors, data_bytes)


def read_base(folder: str) -> Base:
    """The base model's shards (headers only) and index."""
    if not os.path.exists(folder):
        raise VBLoRAError(f"{folder}: the folder does not exist")
    if not os.path.isdir(folder):
        raise VBLoRAError(f"{folder}: not a folder (BASE must be a transformers model folder)")
    index_path = os.path.join(folder, INDEX_FILE)
    if os.path.exists(index_path):
        index = read_object(index_path)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise VBLoRAError(f"{index_path}: no weight_map")
        for tensor, name in weight_map.items():
            if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", ".."):
                raise VBLoRAError(
                    f"{index_path}: weight_map places {tensor} in {name!r}, not a file name in this folder"
                )
        names = sorted(set(weight_map.values()))
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
    model_type = ""
    config_path = os.path.join(folder, "config.json")
    if os.path.isfile(config_path):
        config = read_object(config_path)
        value = config.get("model_type", "")
        model_type = value if isinstance(value, str) else ""
        quantization = config.get("quantization_config")
        if isinstance(quantization, dict):  # codes and scales, not weights (bitsandbytes, GPTQ, AWQ, fp8...)
            method = quantization.get("quant_method", "quantized")
            raise VBLoRAError(
                f"{config_path}: the model is quantized ({method}); vblora merge merges into full-precision "
                "checkpoints: give it the float32/float16/bfloat16 model the quantized one was made from, or use "
                "merge_and_unload in Python, which merges into the quantized layers"
            )
    return Base(folder, shards, index, where, model_type)


def read_adapter(path: str, weight: float, num_threads: int) -> Adapter:
    """An adapter's checked config and its modules' shapes, after the Rust reader validated the whole file
    (no factor is built here). ``path`` is anything :func:`.storage.locate.locate` accepts."""
    found = locate(path)
    if found.kind == PACKED:
        config_text, shapes = _native.packed_adapter_shapes(found.weights_path, num_threads)
        config = parse_config(config_text, f"{found.weights_path} (its config)")
        _check_mergeable(found.weights_path, config)
        return Adapter(found.weights_path, config, weight, shapes, packed=True)
    assert found.config_path is not None
    config = read_config(found.config_path)
    _check_mergeable(found.config_path, config)
    shapes = _native.adapter_shapes(
        found.weights_path, config["topk"], config["num_vectors"], config["vector_length"], num_threads
    )
    return Adapter(found.weights_path, config, weight, shapes, packed=False)


def _check_rank(adapter: Adapter) -> None:
    """The rank of every module's tensors is the config's ``r`` (the layers PEFT and the model side build from the
    config would not take them)."""
    r = adapter.config["r"]
    for module, (rank, _, _) in adapter.shapes.items():
        if rank != r:
            raise VBLoRAError(
                f"{adapter.path}: module {_stripped(module)} holds rank-{rank} tensors, the config says r={r}"
            )


def _check_targeted(adapter: Adapter) -> None:
    """THE target rule (:mod:`vblora_rs.storage.targets`), as the model side applies it: every module in the file
    is one the config targets. A config without named targets (``None``, ``"all-linear"``) targets the file's
    modules."""
    config = adapter.config
    if not targets.targets_named(config):
        return
    for module in adapter.shapes:
        name = _stripped(module)
        if targets.module_status(config, name) != targets.TARGETED:
            raise VBLoRAError(
                f"{adapter.path}: module {name} is in the file but the config does not target it: "
                f"{targets.untargeted_reason(config, name)} (PEFT would not merge it)"
            )


def _check_all_present(adapter: Adapter, names: _Names, mapped: dict[str, str]) -> None:
    """When the file's module names are the base's own: every base module the config targets is in the file (the
    model side refuses a file that lacks one). ``mapped``: base tensor -> the file's module merged into it."""
    config = adapter.config
    if not targets.targets_named(config):
        return
    if not all(f"{_stripped(module)}.weight" in names.names for module in adapter.shapes):
        return  # the base names modules with another prefix: the rule cannot be applied to its names
    for tensor in sorted(names.names):
        module = tensor[: -len(".weight")]
        if (
            tensor.endswith(".weight")
            and tensor not in mapped
            and targets.module_status(config, module) == targets.TARGETED
        ):
            raise VBLoRAError(
                f"{adapter.path}: the config targets module {module} (base tensor {tensor}) but the file holds no "
                "tensors for it"
            )


def _stripped(module: str) -> str:
    return module[len(MODEL_PREFIX) :] if module.startswith(MODEL_PREFIX) else module


def _check_mergeable(config_path: str, config: dict) -> None:
    if config["bias"] != "none":
        raise VBLoRAError(f"{config_path}: bias={config['bias']!r}: merging trained biases is not supported")
    if config.get("modules_to_save"):
        raise VBLoRAError(f"{config_path}: modules_to_save is set: merging those modules is not supported")


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
    stripped = _stripped(module)
    target = f"{stripped}.weight"
    found = names.match(target)
    if not found:
        raise VBLoRAError(f"{adapter.path}: module {stripped} has no weight {target} in the base model")
    if len(found) > 1:
        raise VBLoRAError(
            f"{adapter.path}: module {stripped} matches several base tensors ({', '.join(sorted(found))})"
        )
    return found[0]


def transposed_layer(model_type: str, tensor: str) -> bool:
    """Whether the base stores the layer of weight ``tensor`` as ``(in, out)`` (a Conv1D), as PEFT decides
    ``fan_in_fan_out`` from the layer class."""
    parts = tensor.split(".")
    layer = parts[-2] if len(parts) >= 2 else ""
    return layer in CONV1D_LAYERS.get(model_type, frozenset())


def _check_tensor(shard: Shard, name: str, part: Part, out_dtype: Optional[str]) -> None:
    _, fan_in, fan_out = part.adapter.shapes[part.module]
    expected = (fan_in, fan_out) if part.transposed else (fan_out, fan_in)
    dtype, shape = shard.tensors[name]
    if tuple(shape) != expected:
        layout = "(in, out), a Conv1D layer" if part.transposed else "(out, in), a Linear layer"
        raise VBLoRAError(
            f"{shard.path}: tensor {name} has shape {tuple(shape)}, but module {part.module} of "
            f"{part.adapter.path} needs {expected}, {layout}"
        )
    effective = DTYPES[out_dtype] if out_dtype and dtype in FLOAT_SIZES else dtype
    if effective not in MERGEABLE:
        raise VBLoRAError(
            f"{shard.path}: tensor {name} has dtype {dtype}; merging needs F32, F16 or BF16 (see --dtype)"
        )


def stack(tensor: str, parts: list[tuple[Part, Factors]]) -> Factors:
    """``(u, v)`` with ``u @ v = sum_i w_i * delta_i`` in the base tensor's layout."""
    us, vs = [], []
    for part, (a, b) in parts:
        weight = part.adapter.weight
        with np.errstate(over="ignore", invalid="ignore"):
            scaled_b = b if weight == 1.0 else b * np.float32(weight)
        problem = finite.overflow_problem(scaled_b)
        if problem:
            raise VBLoRAError(f"{part.adapter.path}: module {part.module}: B scaled by --weights {weight} {problem}")
        if part.transposed:  # W is (in, out): W += A^T @ B^T
            us.append(a.T)
            vs.append(scaled_b.T)
        else:  # W is (out, in): W += B @ A
            us.append(scaled_b)
            vs.append(a)
    u = np.ascontiguousarray(np.concatenate(us, axis=1), dtype=np.float32)
    v = np.ascontiguousarray(np.concatenate(vs, axis=0), dtype=np.float32)
    return u, v


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _link_allowed(base_path: str, real: str) -> bool:
    """A symlinked file of the base may point inside BASE, or (a Hugging Face cache snapshot,
    ``.../models--X/snapshots/REV``) into the same repository's ``blobs`` folder; nowhere else."""
    base_real = os.path.realpath(base_path)
    if _inside(real, base_real):
        return True
    snapshots = os.path.dirname(base_real)
    if os.path.basename(snapshots) == "snapshots":
        return _inside(real, os.path.join(os.path.dirname(snapshots), "blobs"))
    return False


def _extra_files(base: Base) -> tuple[list[str], list[str]]:
    """Files of the base copied to the output (what a model folder needs), and notes on what is left out."""
    shard_names = {s.name for s in base.shards}
    files, notes = [], []
    for name in sorted(os.listdir(base.path)):
        path = os.path.join(base.path, name)
        if name in shard_names or name == INDEX_FILE:
            continue
        if name.startswith("."):
            notes.append(f"not copied (a hidden file): {path}")
        elif os.path.islink(path) and not _link_allowed(base.path, os.path.realpath(path)):
            notes.append(f"not copied (a link out of BASE): {path}")
        elif not os.path.isfile(path):
            notes.append(f"not copied (not a regular file): {path}")
        elif name.endswith(OTHER_WEIGHTS) or name.endswith(".index.json"):
            notes.append(f"not copied (weights in another format, unmerged): {path}")
        elif not (name.endswith(MODEL_FILE_SUFFIXES) or name.startswith(MODEL_FILE_PREFIXES)):
            notes.append(f"not copied (not a model, tokenizer or processor file): {path}")
        elif not os.access(path, os.R_OK):
            raise VBLoRAError(f"{path}: not readable")
        else:
            files.append(name)
    return files, notes


def _float32_weight(weight: float) -> None:
    if not math.isfinite(weight) or abs(weight) > FLOAT32_MAX:
        raise VBLoRAError(f"--weights must be finite float32 values (at most {FLOAT32_MAX:.4g}), got {weight}")


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
    for w in weights:
        _float32_weight(w)
    if out_dtype is not None and out_dtype not in DTYPES:
        raise VBLoRAError(f"dtype must be one of {', '.join(DTYPES)}, got {out_dtype!r}")
    base = read_base(base_dir)
    adapters = [read_adapter(d, w, num_threads) for d, w in zip(adapter_dirs, weights)]
    names = _Names(list(base.where))
    per_tensor: dict[str, list[Part]] = {}
    notes: list[str] = []
    for adapter in adapters:
        _check_rank(adapter)
        _check_targeted(adapter)
        seen: dict[str, str] = {}
        said = adapter.config["fan_in_fan_out"]
        for module in adapter.shapes:
            target = _target(module, names, adapter)
            if target in seen:
                raise VBLoRAError(f"{adapter.path}: modules {seen[target]} and {module} both map to {target}")
            seen[target] = module
            part = Part(adapter, module, transposed_layer(base.model_type, target))
            if part.transposed != said and not any(adapter.path in n for n in notes):
                notes.append(
                    f"{adapter.path}: fan_in_fan_out={str(said).lower()} in its config is ignored: the layer type "
                    f"decides, as in PEFT ({target} is stored {'(in, out)' if part.transposed else '(out, in)'})"
                )
            _check_tensor(base.where[target], target, part, out_dtype)
            per_tensor.setdefault(target, []).append(part)
        _check_all_present(adapter, names, seen)
    updates: dict[str, dict[str, list[Part]]] = {}
    for target, parts in per_tensor.items():
        updates.setdefault(base.where[target].name, {})[target] = parts
    files, file_notes = _extra_files(base)
    return Plan(base, adapters, out_dtype, updates, files, notes + file_notes)
