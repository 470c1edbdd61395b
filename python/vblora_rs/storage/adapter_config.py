"""``adapter_config.json`` read and checked without torch: every field PEFT's VB-LoRA reads, by type and range,
before anything is built from it. The model side and the command line call the same functions, so one file is
accepted or refused (with the same message) everywhere.

* :func:`size_problem`: THE rule for ``r``, ``num_vectors``, ``vector_length`` and ``topk`` (the layers, the tuner,
  the files and :class:`AdapterConfig` all call it);
* :func:`check_config` / :func:`read_config` / :func:`parse_config`: a whole config object checked, as a dict;
* :class:`AdapterConfig`: the checked fields as a torch-free dataclass, for the readers and writers of files
  (the model side uses PEFT's own ``VBLoRAConfig``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from ..errors import VBLoRAError
from .json_file import parse_object, read_object
from .names import CONFIG_NAME, PEFT_TYPE
from .regex_guard import regex_problem

SIZE_FIELDS = ("r", "num_vectors", "vector_length", "topk")
# PEFT's VBLoRAConfig defaults for the fields that decide shapes and storage.
DEFAULTS: dict[str, Any] = {
    "r": 4,
    "num_vectors": 256,
    "vector_length": 256,
    "topk": 2,
    "fan_in_fan_out": False,
    "save_only_topk_weights": False,
    "vblora_dropout": 0.0,
    "bias": "none",
    "init_vector_bank_bound": 0.02,
    "init_logits_std": 0.1,
}
# Each dimension fits an int32 (torch's index arithmetic on CPU kernels), and the bank (num_vectors x
# vector_length float32 values) stays under 2^31 elements (8 GiB): far above any published VB-LoRA adapter
# (2048 x 256 for Llama-2-7B) and far below what makes torch's allocator fail with a RuntimeError.
MAX_DIM = 2**31 - 1
MAX_BANK_ELEMENTS = 2**31
# Module names are short: a pattern longer than this is not a target list anyone writes.
MAX_PATTERN_LENGTH = 4096


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def size_problem(values: Mapping[str, Any]) -> str:
    """THE rule for the sizes among ``values`` (any of :data:`SIZE_FIELDS`): each a positive integer of at most
    :data:`MAX_DIM`, and ``topk`` not above ``num_vectors``. ``""`` when they hold, else the problem in PEFT's
    wording, for the caller to prefix with what it checks."""
    for name in SIZE_FIELDS:
        if name not in values:
            continue
        value = values[name]
        if not _is_int(value) or value <= 0:
            return f"`{name}` {value!r} should be a positive integer value"
        if value > MAX_DIM:
            return f"`{name}` {value} is above {MAX_DIM}, the largest size a tensor dimension may have"
    topk, num_vectors = values.get("topk"), values.get("num_vectors")
    if _is_int(topk) and _is_int(num_vectors) and topk > num_vectors:
        return f"`topk` {topk} must not exceed `num_vectors` {num_vectors}"
    return ""


def _names(source: str, key: str, value: Any, *, regex: bool) -> None:
    """``None``, a list of names, or (``regex``) one string: a regex PEFT full-matches."""
    if value is None:
        return
    if isinstance(value, str):
        if not regex:
            raise VBLoRAError(f"{source}: {key} must be a list of names, got a string")
        if len(value) > MAX_PATTERN_LENGTH:
            raise VBLoRAError(f"{source}: {key} is a pattern of {len(value)} characters (at most {MAX_PATTERN_LENGTH})")
        problem = regex_problem(value)
        if problem:
            raise VBLoRAError(f"{source}: {key} {value!r} {problem}")
        return
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise VBLoRAError(f"{source}: {key} must be a list of module names{' or a regex' if regex else ''}")


def check_config(data: dict[str, Any], source: str) -> dict[str, Any]:
    """``data`` (an adapter_config.json object) checked, with PEFT's defaults for the fields it leaves out;
    raises VBLoRAError naming ``source`` and the field."""
    config = {**DEFAULTS, **{k: v for k, v in data.items() if v is not None or k not in DEFAULTS}}
    peft_type = config.get("peft_type", PEFT_TYPE)
    if not isinstance(peft_type, str) or peft_type.upper() != PEFT_TYPE:
        raise VBLoRAError(f"{source}: peft_type is {peft_type!r}, not a VB-LoRA adapter")
    problem = size_problem(config)
    if problem:
        raise VBLoRAError(f"{source}: {problem}")
    if config["num_vectors"] * config["vector_length"] > MAX_BANK_ELEMENTS:
        raise VBLoRAError(
            f"{source}: num_vectors x vector_length = {config['num_vectors'] * config['vector_length']} bank "
            f"values, above {MAX_BANK_ELEMENTS}"
        )
    for key in ("fan_in_fan_out", "save_only_topk_weights"):
        if not isinstance(config[key], bool):
            raise VBLoRAError(f"{source}: {key} must be true or false, got {config[key]!r}")
    for key in ("init_vector_bank_bound", "init_logits_std"):
        if not _is_number(config[key]):
            raise VBLoRAError(f"{source}: {key} must be a finite number, got {config[key]!r}")
    dropout = config["vblora_dropout"]
    if not _is_number(dropout) or not 0 <= dropout < 1:
        raise VBLoRAError(f"{source}: vblora_dropout must be a number in [0, 1), got {dropout!r}")
    if not isinstance(config["bias"], str):
        raise VBLoRAError(f"{source}: bias must be a string, got {config['bias']!r}")
    _names(source, "target_modules", config.get("target_modules"), regex=True)
    _names(source, "exclude_modules", config.get("exclude_modules"), regex=True)
    _names(source, "modules_to_save", config.get("modules_to_save"), regex=False)
    for name in config.get("modules_to_save") or []:
        # PEFT places each name inside a regex of its own, matched against every module name (storage.targets)
        problem = regex_problem(rf"(^|.*\.){name}($|\..*)")
        if problem:
            raise VBLoRAError(f"{source}: modules_to_save entry {name!r} makes a regex that {problem}")
    layers = config.get("layers_to_transform")
    if layers is not None and not _is_int(layers):
        if not isinstance(layers, list) or not all(_is_int(v) for v in layers):
            raise VBLoRAError(f"{source}: layers_to_transform must be an integer or a list of integers, got {layers!r}")
    pattern = config.get("layers_pattern")
    if pattern is not None and not isinstance(pattern, str):
        if not isinstance(pattern, list) or not all(isinstance(v, str) for v in pattern):
            raise VBLoRAError(f"{source}: layers_pattern must be a string or a list of strings, got {pattern!r}")
    for part in [pattern] if isinstance(pattern, str) else pattern or []:
        # PEFT places each pattern inside a regex of its own, matched against every module name
        problem = regex_problem(rf".*\.{part}\.(\d+)\.")
        if problem:
            raise VBLoRAError(f"{source}: layers_pattern {part!r} makes a regex that {problem}")
    return config


def read_config(path: str) -> dict[str, Any]:
    """The checked config of the adapter_config.json file at ``path`` (see :func:`check_config`)."""
    return check_config(read_object(path), path)


def parse_config(text: str, source: str) -> dict[str, Any]:
    """The checked config from JSON ``text`` (a packed file's ``config`` metadata); ``source`` names it."""
    return check_config(parse_object(text, source), source)


# Fields PEFT's base ``PeftConfig`` writes next to the VB-LoRA ones; kept so both libraries read each
# other's files, but they do not change how the adapter is built.
_PEFT_BASE_FIELDS = (
    "task_type",
    "peft_type",
    "auto_mapping",
    "peft_version",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
)


@dataclass
class AdapterConfig:
    """A VB-LoRA adapter's ``adapter_config.json`` without torch or peft: the fields, defaults and JSON file of
    PEFT's ``VBLoRAConfig`` (which the model side uses), for the readers and writers of adapter files.

    Every adapted matrix is built from sub-vectors of length ``vector_length``; each sub-vector is a
    softmax-weighted sum of the ``topk`` bank vectors (out of ``num_vectors``) with the largest logits.
    """

    r: int = field(default=4, metadata={"help": "The rank of incremental matrices."})
    num_vectors: int = field(default=256, metadata={"help": "Number of vectors in the vector bank."})
    vector_length: int = field(
        default=256,
        metadata={"help": "Length of each bank vector; must divide in_features and out_features of every target."},
    )
    topk: int = field(default=2, metadata={"help": "K of the top-K selection over the bank."})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Module names (exact or dotted-suffix match), a regex (full match), 'all-linear', or None "
            "for the default of the model type."
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex of modules not to adapt."}
    )
    save_only_topk_weights: bool = field(
        default=False,
        metadata={"help": "Save only top-K indices and weights (inference/merge only, cannot resume training)."},
    )
    vblora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input."})
    fan_in_fan_out: bool = field(
        default=False, metadata={"help": "True if the target stores its weight as (fan_in, fan_out), e.g. Conv1D."}
    )
    bias: str = field(default="none", metadata={"help": "Bias type: 'none', 'all' or 'vblora_only'."})
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Other modules made trainable and saved in the checkpoint."}
    )
    init_vector_bank_bound: float = field(
        default=0.02, metadata={"help": "The bank is drawn uniformly from [-bound, bound]."}
    )
    init_logits_std: float = field(default=0.1, metadata={"help": "Std of the normal init of the logits."})
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Indices of the layers to adapt."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the nn.ModuleList holding the layers, e.g. 'layers' or 'h'."}
    )
    # PEFT's base-config fields, carried through files.
    task_type: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    inference_mode: bool = False

    @property
    def peft_type(self) -> str:
        return PEFT_TYPE

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, (list, tuple)):
            self.exclude_modules = set(self.exclude_modules)
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified.")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a str.")
        if self.bias not in ("none", "all", "vblora_only"):
            raise ValueError(f"`bias` must be 'none', 'all' or 'vblora_only', got {self.bias!r}")
        problem = size_problem({name: getattr(self, name) for name in SIZE_FIELDS})
        if problem:
            raise ValueError(problem)
        if not 0.0 <= self.vblora_dropout < 1.0:
            raise ValueError(f"`vblora_dropout` {self.vblora_dropout} must be in [0, 1)")

    # --- (de)serialisation -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, set):
                value = sorted(value)
            out[f.name] = value
        out["peft_type"] = PEFT_TYPE
        out["auto_mapping"] = None
        return dict(sorted(out.items()))

    def save_pretrained(self, save_directory: Union[str, os.PathLike]) -> None:
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, CONFIG_NAME)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(self.to_dict(), fh, indent=2, sort_keys=True)
            fh.write("\n")
        os.replace(tmp, path)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> AdapterConfig:
        peft_type = data.get("peft_type", PEFT_TYPE)
        if peft_type != PEFT_TYPE:
            raise VBLoRAError(f"{source}: peft_type is {peft_type!r}, expected {PEFT_TYPE!r} (a VB-LoRA adapter)")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        unknown = sorted(k for k in data if k not in names and k not in _PEFT_BASE_FIELDS)
        if unknown:
            warnings.warn(f"{source}: ignoring unknown adapter config fields {unknown}", stacklevel=2)
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise VBLoRAError(f"{source}: invalid VB-LoRA config: {exc}") from exc

    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike]) -> AdapterConfig:
        """Read ``adapter_config.json`` from a folder (or the file itself)."""
        path = os.fspath(path)
        file = os.path.join(path, CONFIG_NAME) if os.path.isdir(path) else path
        return cls.from_dict(read_object(file), source=file)
