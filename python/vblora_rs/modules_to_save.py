"""``modules_to_save``: a trainable copy per adapter of a module that is saved whole (e.g. a classifier head)."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, Optional, Union

import torch
from torch import nn

from .errors import VBLoRAError
from .layer import RowGroups


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

    def forward(
        self, *args: Any, adapter_names: Optional[Union[RowGroups, Sequence[str]]] = None, **kwargs: Any
    ) -> Any:
        if adapter_names is None or self._disable_adapters:
            return self._active_module()(*args, **kwargs)
        return self._mixed_batch_forward(RowGroups.of(adapter_names), *args, **kwargs)

    def _module_for(self, adapter_name: str) -> nn.Module:
        """What a sample of ``adapter_name`` goes through: that adapter's copy, else (``"__base__"`` or an adapter
        without a copy here) the original module, as with that adapter active."""
        copies = self.modules_to_save
        return copies[adapter_name] if adapter_name in copies else self.original_module

    def _mixed_batch_forward(self, groups: RowGroups, *args: Any, **kwargs: Any) -> Any:
        """Each sample through its own adapter's module: one call per distinct module, outputs put back in order.
        The first positional argument is the batched input; dim 0 of input and output is the sample."""
        modules: dict[int, tuple[nn.Module, list[str]]] = {}
        for name in groups.groups:
            module = self._module_for(name)
            modules.setdefault(id(module), (module, []))[1].append(name)
        if len(modules) == 1:
            return next(iter(modules.values()))[0](*args, **kwargs)
        if not args or not isinstance(args[0], torch.Tensor):
            raise VBLoRAError(
                f"modules_to_save {type(self.original_module).__name__}: `adapter_names` needs the batched input "
                "as the first positional argument"
            )
        x, rest = args[0], args[1:]
        per_sample = groups.rows_per_sample(x.shape[0], f"modules_to_save {type(self.original_module).__name__}")
        result: Optional[torch.Tensor] = None
        for module, names in modules.values():
            index = torch.cat([groups.index(n, per_sample, x.device) for n in names])
            out = module(x.index_select(0, index), *rest, **kwargs)
            if not isinstance(out, torch.Tensor) or out.shape[:1] != index.shape:
                raise VBLoRAError(
                    f"modules_to_save {type(self.original_module).__name__}: `adapter_names` needs a tensor output "
                    "with one row per input row"
                )
            if result is None:
                result = out.new_empty((x.shape[0], *out.shape[1:]))
            result.index_copy_(0, index, out.to(result.dtype))
        return result

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
