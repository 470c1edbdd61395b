"""VB-LoRA configuration: the fields and defaults of PEFT's ``VBLoRAConfig``, stored as PEFT stores it."""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from .errors import VBLoRAError

CONFIG_NAME = "adapter_config.json"
# The adapter's weights file: PEFT's, or our packed single file. Defined here, in a module without torch, so the
# torch-free readers (vblora merge) and the torch side spell them once.
WEIGHTS_NAME = "adapter_model.safetensors"
PACKED_WEIGHTS_NAME = "adapter_packed.safetensors"
# suffixes of a top-K checkpoint's tensors (PEFT's names)
TOPK_INDICES = "_topk_indices"
TOPK_WEIGHTS = "_topk_weights"
# where PEFT puts a module's keys, and the bank's key, in a checkpoint (the adapter name removed)
MODEL_PREFIX = "base_model.model."
BANK_KEY = "base_model.vblora_vector_bank"
PEFT_TYPE = "VBLORA"

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
class VBLoRAConfig:
    """Configuration of a VB-LoRA adapter (same fields, defaults and JSON file as PEFT's).

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
        for name in ("r", "num_vectors", "vector_length", "topk"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"`{name}` {value!r} should be a positive integer value")
        if self.topk > self.num_vectors:
            raise ValueError(f"`topk` {self.topk} must not exceed `num_vectors` {self.num_vectors}")
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
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> VBLoRAConfig:
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
    def from_pretrained(cls, path: Union[str, os.PathLike]) -> VBLoRAConfig:
        """Read ``adapter_config.json`` from a folder (or the file itself)."""
        path = os.fspath(path)
        file = os.path.join(path, CONFIG_NAME) if os.path.isdir(path) else path
        try:
            with open(file, encoding="utf-8") as fh:
                data = json.load(fh)
        except FileNotFoundError as exc:
            raise VBLoRAError(f"{file}: no adapter config found") from exc
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise VBLoRAError(f"{file}: not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise VBLoRAError(f"{file}: expected a JSON object")
        return cls.from_dict(data, source=file)
