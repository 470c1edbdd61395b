"""How a VB-LoRA layer holds the vector bank its tuner owns.

The tuner's bank dict (adapter -> ``(num_vectors, vector_length)`` Parameter) is a submodule of the tuner only.
Each layer keeps a plain reference to that same dict, not a registered submodule: module walks that claim
parameters subtree by subtree (FSDP2's ``fully_shard`` on each decoder layer, then on the root) must not find the
one bank under every layer, or the first layer's group would take it and shard it away from all the others.
Through the tuner the bank is still one parameter of the model (``named_parameters``, DDP, optimizers, ``.to()``),
and the layer sees every change of it because the dict object is shared.

A bank dict no tuner owns (a layer built by hand, ``Linear(base, bank, ...)``) is registered in the layer as
before, so the layer's ``parameters()`` and ``.to()`` still reach it.

PEFT's own classes register the bank under each layer too, so their ``state_dict()`` repeats it as
``<layer>.vblora_vector_bank.<adapter>``. A layer of ours writes the same entries (the same tensor as the tuner's
``base_model.vblora_vector_bank.<adapter>``), so state dicts of both kinds of model have the same keys and load
strictly into either; loading skips the layer copies (the tuner's own key is the one that fills the bank).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

ATTRIBUTE = "vblora_vector_bank"
# set on the tuner's bank dict: layers hold it by reference (plain attribute of the dict, kept by copies and pickles)
OWNED_BY_TUNER = "vblora_owned_by_tuner"


def mark_owned(bank: nn.ParameterDict) -> None:
    """Mark ``bank`` as the tuner's: layers given it hold it without registering it."""
    setattr(bank, OWNED_BY_TUNER, True)


def register_hooks(layer: nn.Module) -> None:
    """The state-dict hooks below, on ``layer`` (public hook APIs where torch has them, else their older forms)."""
    if hasattr(layer, "register_load_state_dict_pre_hook"):
        layer.register_load_state_dict_pre_hook(skip_layer_copies)
    else:  # torch < 2.5
        layer._register_load_state_dict_pre_hook(skip_layer_copies, with_module=True)
    if hasattr(layer, "register_state_dict_post_hook"):
        layer.register_state_dict_post_hook(add_layer_copies)
    else:  # torch < 2.5: the older hook may also return a new dict; this one edits in place and returns None
        layer._register_state_dict_hook(add_layer_copies)


def hold(layer: nn.Module, bank: nn.ParameterDict) -> None:
    """Make ``bank`` the layer's ``vblora_vector_bank``: a reference if a tuner owns it, else a submodule."""
    layer._modules.pop(ATTRIBUTE, None)
    layer.__dict__.pop(ATTRIBUTE, None)
    if getattr(bank, OWNED_BY_TUNER, False):
        layer.__dict__[ATTRIBUTE] = bank
    else:
        layer._modules[ATTRIBUTE] = bank


def of(layer: nn.Module) -> nn.ParameterDict:
    """The bank dict ``layer`` holds (plain dict reads: no nn.Module attribute lookup on the per-token path)."""
    bank = layer.__dict__.get(ATTRIBUTE)
    return bank if bank is not None else layer._modules[ATTRIBUTE]


def is_reference(layer: nn.Module) -> bool:
    """Whether ``layer`` holds a tuner's bank by reference (not registered)."""
    return ATTRIBUTE in layer.__dict__


def skip_layer_copies(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
) -> None:
    """``load_state_dict`` pre-hook of a layer: drop ``<prefix>vblora_vector_bank.*`` (PEFT's per-layer copies of
    the tuner's bank), which would otherwise be unexpected keys of a layer that does not register the bank."""
    if not is_reference(module):  # a registered bank loads as any submodule
        return
    for key in [k for k in state_dict if k.startswith(f"{prefix}{ATTRIBUTE}.")]:
        del state_dict[key]


def follow_adapter_dtype(bank: nn.ParameterDict, adapter: str, layers: Iterable[nn.Module], autocast: bool) -> None:
    """After PEFT's ``_cast_adapter_dtype`` (which walks the layers' submodules, where the bank no longer is): give
    the bank of ``adapter`` the dtype PEFT gave the adapter's logits, as it did when each layer registered the bank.
    A compact adapter has no logits to follow: its half-precision bank is upcast to float32 under ``autocast``."""
    if adapter not in bank:
        return
    current = bank[adapter]
    target = next(
        (
            logits.dtype
            for layer in layers
            for logits in (getattr(layer, "vblora_logits_A", {}).get(adapter),)
            if isinstance(logits, torch.Tensor) and logits.is_floating_point()
        ),
        torch.float32 if autocast and current.dtype in (torch.float16, torch.bfloat16) else current.dtype,
    )
    if current.dtype != target:
        bank[adapter] = nn.Parameter(current.detach().to(target), requires_grad=current.requires_grad)


def add_layer_copies(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """``state_dict`` post-hook of a layer: the bank entries PEFT's layers have (``<prefix>vblora_vector_bank.<a>``,
    after the layer's other entries, where a registered bank would put them), the tuner's tensors themselves."""
    if not is_reference(module):  # a registered bank is in the state dict already
        return
    bank = of(module)
    keep_vars = isinstance(state_dict.get(f"{prefix}base_layer.weight"), nn.Parameter)
    for name, param in bank.items():
        state_dict[f"{prefix}{ATTRIBUTE}.{name}"] = param if keep_vars else param.detach()
