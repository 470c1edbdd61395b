"""Which modules an adapter replaces: PEFT's target matching rules and default targets per model type."""

from __future__ import annotations

import re
from typing import Optional

from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import VBLoRAConfig

# PEFT's TRANSFORMERS_MODELS_TO_VBLORA_TARGET_MODULES_MAPPING: targets used when the config names none.
DEFAULT_TARGET_MODULES: dict[str, list[str] | str] = {
    "t5": ["q", "k", "v", "o", "wi", "wo"],
    "mt5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gpt2": ["c_attn"],
    "bloom": ["query_key_value"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "gpt_neo": ["q_proj", "v_proj"],
    "llama": ["q_proj", "v_proj"],
    "llama4": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
    "gpt_bigcode": ["c_attn"],
    "deberta": ["in_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
}

ALL_LINEAR = "all-linear"
SEQ_CLS_HEAD_NAMES = ("score", "classifier")


def _model_type(model: nn.Module) -> Optional[str]:
    config = getattr(model, "config", None)
    if config is None:
        return None
    if isinstance(config, dict):
        return config.get("model_type")
    return getattr(config, "model_type", None)


def resolve_target_modules(config: VBLoRAConfig, model: nn.Module) -> None:
    """Fill in ``config.target_modules`` in place: the model type's default when absent, and the set of all
    Linear/Conv1D modules but the output head for ``"all-linear"``."""
    if config.target_modules is None:
        model_type = _model_type(model)
        if model_type not in DEFAULT_TARGET_MODULES:
            raise ValueError(
                f"target_modules is not set and model type {model_type!r} has no default VB-LoRA targets; "
                f"set target_modules (known defaults: {', '.join(sorted(DEFAULT_TARGET_MODULES))})"
            )
        default = DEFAULT_TARGET_MODULES[model_type]
        config.target_modules = set(default) if isinstance(default, list) else default
    if isinstance(config.target_modules, str) and config.target_modules.lower() == ALL_LINEAR:
        config.target_modules = _all_linear_names(model, config)


def _all_linear_names(model: nn.Module, config: VBLoRAConfig) -> set[str]:
    from .layer import VBLoRALayer  # late import: layer imports nothing from here, but keep targets leaf-light

    names = {name for name, module in model.named_modules() if isinstance(module, (nn.Linear, Conv1D))}
    exclude: set[str] = set()
    get_output_embeddings = getattr(model, "get_output_embeddings", None)
    output = get_output_embeddings() if callable(get_output_embeddings) else None
    if output is not None:
        exclude.update(name for name, module in model.named_modules() if module is output)
    elif config.task_type == "SEQ_CLS":
        for head_name in SEQ_CLS_HEAD_NAMES:
            head = getattr(model, head_name, None)
            if head is not None:
                exclude.update(name for name, module in model.named_modules() if module is head)
                break
    # Never nest: modules inside an existing adapter layer are not targets.
    for prefix, module in model.named_modules():
        if isinstance(module, VBLoRALayer):
            exclude.update(f"{prefix}.{suffix}" for suffix, _ in module.named_modules() if suffix)
    return names - exclude


def _is_excluded(config: VBLoRAConfig, key: str) -> bool:
    excl = config.exclude_modules
    if excl:
        if isinstance(excl, str):
            if re.fullmatch(excl, key):
                return True
        elif key in excl or any(key.endswith(f".{e}") for e in excl):
            return True
    # A module kept as a trainable copy is never adapted as well.
    return any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in (config.modules_to_save or ()))


def _layer_index_matches(config: VBLoRAConfig, key: str) -> bool:
    indexes = config.layers_to_transform
    if indexes is None or (isinstance(indexes, list) and len(indexes) == 0):
        return True
    patterns = config.layers_pattern
    match = None
    if not patterns:
        # the first numbered segment is the layer index (not, e.g., an expert index further down)
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == indexes if isinstance(indexes, int) else index in indexes


def is_target(config: VBLoRAConfig, key: str) -> bool:
    """Whether module ``key`` (its dotted name in the model) is adapted under ``config``."""
    if _is_excluded(config, key):
        return False
    targets = config.target_modules
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if key in targets:
        return True
    if not any(key.endswith(f".{t}") for t in targets):
        return False
    return _layer_index_matches(config, key)
