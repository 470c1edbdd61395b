"""Every model-level call the demo makes, in one place.

The demo's other modules never touch the adapter model's API directly: wrapping a model, saving in each
format, loading, merging in memory and PEFT's LoRA loading all go through these small functions, so that
a change of the model level (``get_peft_model`` returning PEFT's own ``PeftModel``, the packed save as a
call of its own) is made here alone.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from peft import VBLoRAConfig
    from torch import nn

# The storage formats the demo writes, in the order its table lists them.
FULL, TOPK, PACKED, PACKED_HALF = "full", "topk", "packed", "packed-half"
FORMATS = (FULL, TOPK, PACKED, PACKED_HALF)


def add_vblora(model: nn.Module, config: VBLoRAConfig) -> nn.Module:
    """``model`` with a new trainable VB-LoRA adapter named ``default``."""
    from ..api import get_peft_model  # PEFT's, served with our classes

    return get_peft_model(model, config)


def print_parameter_counts(model: nn.Module) -> None:
    """PEFT's trainable-parameter line, and what a top-K save stores."""
    model.print_trainable_parameters()
    model.print_savable_parameters()


def save_adapter(model: nn.Module, folder: str, fmt: str) -> None:
    """Save the ``default`` adapter into ``folder`` in one of :data:`FORMATS`: PEFT's file with full logits or
    top-K only, or our packed file (lossless, or with a half-precision bank and weights)."""
    config = model.peft_config["default"]
    if fmt in (FULL, TOPK):
        keep = config.save_only_topk_weights
        config.save_only_topk_weights = fmt == TOPK
        try:
            model.save_pretrained(folder)
        finally:
            config.save_only_topk_weights = keep
    elif fmt in (PACKED, PACKED_HALF):
        from ..tuner.packed_adapters import save_packed

        save_packed(model, folder, half=fmt == PACKED_HALF)
    else:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")


def load_adapter(base: nn.Module, path: str) -> nn.Module:
    """``base`` with the VB-LoRA adapter at ``path`` (a PEFT folder or a packed one), for inference."""
    from ..api import PeftModel
    from ..storage.locate import PACKED, locate
    from ..tuner.packed_adapters import load_packed

    if locate(path).kind == PACKED:
        return load_packed(base, os.fspath(path)).eval()
    return PeftModel.from_pretrained(base, os.fspath(path)).eval()


def merge_in_memory(model: nn.Module) -> nn.Module:
    """The base model with the adapter merged into its weights (the adapter model is used up)."""
    return model.merge_and_unload()


def load_lora_with_peft(base: nn.Module, path: str) -> nn.Module:
    """``base`` with the plain LoRA adapter at ``path``, loaded by PEFT itself."""
    import warnings

    from peft import PeftModel

    with warnings.catch_warnings():  # deprecations between peft and transformers versions: not the demo's matter
        warnings.simplefilter("ignore", FutureWarning)
        return PeftModel.from_pretrained(base, os.fspath(path)).eval()
