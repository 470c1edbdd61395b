"""``adapter_config.json`` read and checked without torch: every field PEFT's VB-LoRA reads, by type and range,
before anything is built from it. The model side and the command line call the same functions, so one file is
accepted or refused (with the same message) everywhere.
"""

from __future__ import annotations

import math
from typing import Any

from ..errors import VBLoRAError
from .json_file import parse_object, read_object
from .regex_guard import regex_problem

PEFT_TYPE = "VBLORA"
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
    for key in ("r", "num_vectors", "vector_length", "topk"):
        value = config[key]
        if not _is_int(value) or not 1 <= value <= MAX_DIM:
            raise VBLoRAError(f"{source}: {key} must be an integer from 1 to {MAX_DIM}, got {value!r}")
    if config["topk"] > config["num_vectors"]:
        raise VBLoRAError(f"{source}: topk={config['topk']} is above num_vectors={config['num_vectors']}")
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
