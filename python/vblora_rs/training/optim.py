"""Optimizer parameter groups for VB-LoRA: the vector bank and the logits learn at different rates.

The VB-LoRA paper trains the shared bank with a learning rate of 1e-3 and the logits with 1e-2 (both without
weight decay); other trainable parameters (``modules_to_save`` copies, biases) keep the optimizer's defaults.

    optimizer = torch.optim.AdamW(param_groups(model), lr=5e-4)   # lr applies to the "other" group
    optimizer = create_optimizer(model)                             # the same, AdamW by default
    Trainer(model=model, args=args, optimizers=(create_optimizer(model), None), ...)
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ..errors import VBLoRAError

BANK_KEY = "vblora_vector_bank"
LOGITS_KEY = "vblora_logits"


def param_groups(
    model: nn.Module,
    lr_bank: float = 1e-3,
    lr_logits: float = 1e-2,
    weight_decay: float = 0.0,
    lr_other: Optional[float] = None,
) -> list[dict[str, Any]]:
    """Parameter groups for a ``torch.optim`` optimizer over the trainable parameters of ``model``:

    - ``"vblora_logits"``: the logits, ``lr_logits``, no weight decay. First, so the rate transformers' ``Trainer``
      logs as ``learning_rate`` (the first group's, after the schedule) is the logits' rate;
    - ``"vblora_vector_bank"``: the banks, ``lr_bank``, no weight decay. A bank is shared by every adapted layer
      and listed once (``named_parameters`` yields a shared tensor once; identity is checked again here);
    - ``"other"``: anything else trainable, with ``weight_decay`` and ``lr_other`` (``None``: the optimizer's lr).

    Empty groups are left out; each group carries a ``"name"`` key (torch optimizers keep extra keys)."""
    for name, value in (("lr_bank", lr_bank), ("lr_logits", lr_logits), ("lr_other", lr_other)):
        if value is not None and not value >= 0:
            raise VBLoRAError(f"{name} must be a non-negative learning rate, got {value!r}")
    bank: list[nn.Parameter] = []
    logits: list[nn.Parameter] = []
    other: list[nn.Parameter] = []
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        if BANK_KEY in name:
            bank.append(param)
        elif LOGITS_KEY in name:
            logits.append(param)
        else:
            other.append(param)
    groups: list[dict[str, Any]] = []
    # the logits first: transformers' Trainer logs the first group's rate as "learning_rate"
    if logits:
        groups.append({"name": LOGITS_KEY, "params": logits, "lr": lr_logits, "weight_decay": 0.0})
    if bank:
        groups.append({"name": BANK_KEY, "params": bank, "lr": lr_bank, "weight_decay": 0.0})
    if other:
        group: dict[str, Any] = {"name": "other", "params": other, "weight_decay": weight_decay}
        if lr_other is not None:
            group["lr"] = lr_other
        groups.append(group)
    if not groups:
        raise VBLoRAError(f"{type(model).__name__} has no trainable parameters to optimize")
    return groups


def create_optimizer(
    model: nn.Module,
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
    lr_bank: float = 1e-3,
    lr_logits: float = 1e-2,
    weight_decay: float = 0.0,
    lr_other: Optional[float] = None,
    **optimizer_kwargs: Any,
) -> torch.optim.Optimizer:
    """An optimizer over :func:`param_groups` of ``model`` (the paper's separate bank and logits learning rates).

    Args:
        model: a model with VB-LoRA adapters (a PeftModel).
        optimizer_cls: the ``torch.optim`` optimizer class.
        lr_bank, lr_logits, weight_decay, lr_other: as :func:`param_groups` takes them.
        **optimizer_kwargs: the optimizer's defaults (e.g. ``lr``, ``betas``) for groups that do not set their own.

    Returns:
        ``optimizer_cls(param_groups(model, ...), **optimizer_kwargs)``.
    """
    groups = param_groups(model, lr_bank=lr_bank, lr_logits=lr_logits, weight_decay=weight_decay, lr_other=lr_other)
    return optimizer_cls(groups, **optimizer_kwargs)
