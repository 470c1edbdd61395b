"""``modules_to_save``: a trainable copy per adapter of a module that is saved whole (e.g. a classifier head)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class ModulesToSaveWrapper(nn.Module):
    """Holds ``original_module`` and one trainable copy per adapter in ``modules_to_save`` (PEFT's layout, so
    state-dict keys read ``<name>.modules_to_save.<adapter>.weight``)."""

    def __init__(self, module_to_save: nn.Module, adapter_name: str) -> None:
        super().__init__()
        self.original_module = module_to_save
        self.modules_to_save = nn.ModuleDict({})
        self._active_adapter = adapter_name
        self._disable_adapters = False
        self.update(adapter_name)
        self.original_module.requires_grad_(False)

    @property
    def active_adapter(self) -> str:
        return self._active_adapter

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    def update(self, adapter_name: str) -> None:
        copied = copy.deepcopy(self.original_module)
        copied.requires_grad_(True)
        self.modules_to_save[adapter_name] = copied

    def _active_module(self) -> nn.Module:
        if self._disable_adapters or self._active_adapter not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[self._active_adapter]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._active_module()(*args, **kwargs)

    def set_adapter(self, adapter_name: str, inference_mode: bool = False) -> None:
        for name, module in self.modules_to_save.items():
            module.requires_grad_(name == adapter_name and not inference_mode)
        self.original_module.requires_grad_(False)
        self._active_adapter = adapter_name

    def enable_adapters(self, enabled: bool) -> None:
        self._disable_adapters = not enabled
        if not enabled:
            self.modules_to_save.requires_grad_(False)
        elif self._active_adapter in self.modules_to_save:
            self.modules_to_save[self._active_adapter].requires_grad_(True)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.modules_to_save:
            del self.modules_to_save[adapter_name]

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            # attributes such as ``weight`` resolve on the module in use, as they would unwrapped
            if name in ("original_module", "modules_to_save", "_active_adapter", "_disable_adapters"):
                raise
            return getattr(self._active_module(), name)


def wrap_modules_to_save(model: nn.Module, names: list[str], adapter_name: str) -> list[str]:
    """Wrap (or add ``adapter_name`` to) every module whose name equals or ends with one of ``names``."""
    wrapped = []
    for key, _ in list(model.named_modules()):
        if not any(key == n or key.endswith(f".{n}") for n in names):
            continue
        if ".modules_to_save." in key or key.endswith(".original_module") or ".original_module." in key:
            continue
        target = model.get_submodule(key)
        if isinstance(target, ModulesToSaveWrapper):
            target.update(adapter_name)
            target.set_adapter(target.active_adapter)
        else:
            parent_name, _, child_name = key.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            wrapper = ModulesToSaveWrapper(target, adapter_name)
            setattr(parent, child_name, wrapper)
        wrapped.append(key)
    return wrapped


@torch.no_grad()
def unwrap_modules_to_save(model: nn.Module) -> None:
    """Replace every wrapper by the copy of its active adapter (as ``merge_and_unload`` does)."""
    for key, module in list(model.named_modules()):
        if isinstance(module, ModulesToSaveWrapper):
            parent_name, _, child_name = key.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child_name, module._active_module())
