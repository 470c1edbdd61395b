"""PEFT's entry points, served with vblora_rs's VB-LoRA classes: ``from vblora_rs import get_peft_model`` is
``peft.get_peft_model`` with :func:`~vblora_rs.apply_to_peft` done first."""

from __future__ import annotations

from typing import Any

import peft
from peft import PeftModel, VBLoRAConfig
from torch import nn

from .tuner.peft_backend import apply_to_peft

__all__ = ["PeftModel", "VBLoRAConfig", "get_peft_model"]


def get_peft_model(model: nn.Module, peft_config: Any, adapter_name: str = "default", **kwargs: Any) -> PeftModel:
    """``peft.get_peft_model`` with PEFT serving VB-LoRA through vblora_rs (other methods are PEFT's alone)."""
    apply_to_peft()
    return peft.get_peft_model(model, peft_config, adapter_name=adapter_name, **kwargs)
