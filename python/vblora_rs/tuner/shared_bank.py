"""How a VB-LoRA layer holds the vector bank its tuner owns.

The tuner's bank dict (adapter -> ``(num_vectors, vector_length)`` Parameter) is the only module that registers the
bank. Each layer registers the dict's one :class:`BankView` instead (shared by the layers, as PEFT's layers share
the dict): a child module with no parameters of its own. Module walks that claim parameters subtree by subtree
(FSDP2's ``fully_shard`` on each decoder layer, then on the root) find no bank under a layer, so the first layer's
group cannot take the one bank away from all the others; through the tuner it is still one parameter of the model
(``named_parameters``, DDP, optimizers, ``.to()``), and every layer sees each change of it because the dict object
is shared.

The view keeps what PEFT's layers look like from outside: ``layer.vblora_vector_bank[adapter]``, ``in``,
``items()``; ``state_dict()`` keys ``<layer>.vblora_vector_bank.<adapter>`` (the tuner's tensor; PEFT's layers
register the bank, so their state dicts repeat it there), so state dicts load strictly into models of either kind
(the view skips its keys on load: the tuner's own key fills the bank); and PEFT's structural key helpers
(``get_base_model_state_dict``) see ``vblora_vector_bank`` as a child of the layer.

A bank dict no tuner owns (a layer built by hand, ``Linear(base, bank, ...)``) is registered in the layer itself,
so the layer's ``parameters()`` and ``.to()`` still reach it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

ATTRIBUTE = "vblora_vector_bank"
# set on the tuner's bank dict: layers register a view of it (a plain attribute, kept by copies and pickles)
OWNED_BY_TUNER = "vblora_owned_by_tuner"
_VIEW = "vblora_view"  # the owned dict's one BankView, shared by its layers


def mark_owned(bank: nn.ParameterDict) -> None:
    """Mark ``bank`` as the tuner's: layers given it register a :class:`BankView` of it."""
    setattr(bank, OWNED_BY_TUNER, True)


class BankView(nn.Module):
    """A layer's view of the tuner's bank dict: reads, writes and state-dict entries go to that dict; the view
    registers no parameter, so nothing walking the layer's subtree reaches the bank."""

    def __init__(self, bank: nn.ParameterDict) -> None:
        super().__init__()
        self.__dict__["bank"] = bank  # not registered

    def __getitem__(self, key: str) -> nn.Parameter:
        return self.__dict__["bank"][key]

    def __setitem__(self, key: str, value: nn.Parameter) -> None:
        self.__dict__["bank"][key] = value

    def __delitem__(self, key: str) -> None:
        del self.__dict__["bank"][key]

    def __contains__(self, key: object) -> bool:
        return key in self.__dict__["bank"]

    def __iter__(self) -> Iterator[str]:
        return iter(self.__dict__["bank"])

    def __len__(self) -> int:
        return len(self.__dict__["bank"])

    def keys(self) -> Iterable[str]:
        return self.__dict__["bank"].keys()

    def values(self) -> Iterable[nn.Parameter]:
        return self.__dict__["bank"].values()

    def items(self) -> Iterable[tuple[str, nn.Parameter]]:
        return self.__dict__["bank"].items()

    def get(self, key: str, default: Any = None) -> Any:
        return self.__dict__["bank"].get(key, default)

    def __getattr__(self, name: str) -> Any:
        # `layer.vblora_vector_bank.<adapter>`, as state-dict key walkers (torch.distributed.checkpoint) resolve it
        bank = self.__dict__.get("bank")
        if bank is not None and name in bank._parameters:
            return bank._parameters[name]
        return super().__getattr__(name)

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        for name, param in self.__dict__["bank"].items():
            destination[prefix + name] = param if keep_vars else param.detach()

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # the layer's copies of the tuner's entry: the tuner's key fills the bank, these are neither loaded here nor
        # unexpected
        return

    def extra_repr(self) -> str:
        return f"the tuner's bank: {list(self.__dict__['bank'].keys())}"


def hold(layer: nn.Module, bank: nn.ParameterDict) -> None:
    """Make ``bank`` the layer's ``vblora_vector_bank``: the tuner's one view if a tuner owns it, else the dict
    itself. One view serves every layer, as PEFT's layers share one bank dict: a view per layer would be 224 more
    modules on a 7B model (about half a MiB, most of what a compact load adds over the checkpoint)."""
    if not getattr(bank, OWNED_BY_TUNER, False):
        layer._modules[ATTRIBUTE] = bank
        return
    view = bank.__dict__.get(_VIEW)
    if view is None:
        view = bank.__dict__[_VIEW] = BankView(bank)  # a plain attribute: not a submodule of the dict
    layer._modules[ATTRIBUTE] = view


def of(layer: nn.Module) -> nn.ParameterDict:
    """The bank dict ``layer`` uses (plain dict reads: no nn.Module attribute lookup on the per-token path)."""
    held = layer._modules[ATTRIBUTE]
    return held.__dict__["bank"] if type(held) is BankView else held


def follow_adapter_dtype(bank: nn.ParameterDict, adapter: str, layers: Iterable[nn.Module], autocast: bool) -> None:
    """After PEFT's ``_cast_adapter_dtype`` (which casts the ParameterDicts it finds under the layers, where the bank
    no longer is): give the bank of ``adapter`` the dtype PEFT gave the adapter's logits, as it did when each layer
    registered the bank. A compact adapter has no logits to follow: its half-precision bank is upcast to float32
    under ``autocast``."""
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
