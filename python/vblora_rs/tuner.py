"""``VBLoRATuner``: injects VB-LoRA layers into a model and manages its adapters (PEFT's ``VBLoRAModel``
tuner, reached as ``wrapper.base_model``). It owns the shared vector banks, one per adapter."""

from __future__ import annotations

import copy
import warnings
from typing import Any, Optional, Union

import torch
from torch import nn
from tqdm import tqdm
from transformers.pytorch_utils import Conv1D

from . import compact
from .config import VBLoRAConfig
from .layer import Linear, VBLoRALayer
from .modules_to_save import ModulesToSaveWrapper, unwrap_modules_to_save, wrap_modules_to_save
from .targets import is_target, resolve_target_modules


class VBLoRATuner(nn.Module):
    prefix = "vblora_"

    def __init__(
        self, model: nn.Module, config: VBLoRAConfig, adapter_name: str = "default", *, init_logits: bool = True
    ) -> None:
        super().__init__()
        self.model = model
        self.peft_config: dict[str, VBLoRAConfig] = {}
        self.active_adapter: Union[str, list[str]] = adapter_name
        self.vblora_vector_bank = nn.ParameterDict({})
        # Compact adapters' top-K tables (one per adapter, shared by its layers like the bank).
        self.vblora_topk = nn.ModuleDict({})
        self.inject_adapter(config, adapter_name, init_logits=init_logits)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    @property
    def active_adapters(self) -> list[str]:
        active = self.active_adapter
        return [active] if isinstance(active, str) else list(active)

    # --- injection ------------------------------------------------------------------------------

    def vblora_layers(self) -> list[tuple[str, Linear]]:
        return [(name, m) for name, m in self.model.named_modules() if isinstance(m, VBLoRALayer)]

    def _init_vector_bank(self, config: VBLoRAConfig, adapter_name: str) -> None:
        # Drawn once per adapter (PEFT redraws it for every target module and keeps the last draw).
        device = next((p.device for p in self.model.parameters() if p.device.type != "meta"), torch.device("cpu"))
        bank = torch.empty(config.num_vectors, config.vector_length, device=device)
        nn.init.uniform_(bank, -config.init_vector_bank_bound, config.init_vector_bank_bound)
        self.vblora_vector_bank[adapter_name] = nn.Parameter(bank)

    def _check_new_adapter_config(self, config: VBLoRAConfig) -> None:
        biased = [name for name, c in self.peft_config.items() if c.bias != "none"]
        if len(biased) > 1 or (biased and config.bias != "none"):
            raise ValueError(
                f"{self.__class__.__name__} supports only 1 adapter with bias. When using multiple adapters, set "
                "bias to 'none' for all adapters."
            )

    def inject_adapter(self, config: VBLoRAConfig, adapter_name: str, *, init_logits: bool = True) -> None:
        """Add adapter ``adapter_name`` to every target module. ``init_logits=False`` allocates no logits: the
        caller fills the adapter in compact top-K form (loading a top-K checkpoint)."""
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists")
        config = copy.deepcopy(config)
        self._check_new_adapter_config(config)
        resolve_target_modules(config, self.model)
        self.peft_config[adapter_name] = config
        self._init_vector_bank(config, adapter_name)
        try:
            matched = self._replace_targets(config, adapter_name, init_logits)
            if not matched:
                raise ValueError(
                    f"Target modules {config.target_modules} not found in the base model. Please check the target "
                    "modules and try again."
                )
            if config.modules_to_save:
                wrap_modules_to_save(self.model, list(config.modules_to_save), adapter_name)
        except Exception:
            self._forget(adapter_name)
            raise
        self._mark_only_adapters_as_trainable(config)
        if config.inference_mode:
            self._set_requires_grad(adapter_name, False)

    def _forget(self, adapter_name: str) -> None:
        """Undo a failed injection: drop the adapter, and put back base layers left with no adapter at all."""
        self.peft_config.pop(adapter_name, None)
        for key, layer in self.vblora_layers():
            layer.delete_adapter(adapter_name)
            if not any(layer.has_adapter(a) for a in layer._all_available_adapter_names()):
                self._replace_with_base(key, layer)
        if adapter_name in self.vblora_vector_bank:
            del self.vblora_vector_bank[adapter_name]
        if adapter_name in self.vblora_topk:
            del self.vblora_topk[adapter_name]

    def _replace_with_base(self, key: str, layer: VBLoRALayer) -> None:
        parent_name, _, child_name = key.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        setattr(parent, child_name, layer.get_base_layer())

    def _candidate_keys(self) -> list[str]:
        """Module names that may be targets: not the root, nothing inside an adapter layer or wrapper."""
        inside: set[str] = set()  # adapter layers and wrappers, and everything under them
        keys = []
        for key, module in self.model.named_modules():  # pre-order: a parent comes before its children
            if not key:
                continue
            if key.rpartition(".")[0] in inside:
                inside.add(key)
                continue
            keys.append(key)
            if isinstance(module, (VBLoRALayer, ModulesToSaveWrapper)):
                inside.add(key)
        return keys

    def _replace_targets(self, config: VBLoRAConfig, adapter_name: str, init_logits: bool = True) -> list[str]:
        matched = []
        for key in self._candidate_keys():
            if not is_target(config, key):
                continue
            target = self.model.get_submodule(key)
            parent_name, _, child_name = key.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            try:
                self._create_and_replace(config, adapter_name, target, child_name, parent, init_logits)
            except (ValueError, TypeError) as exc:
                raise type(exc)(f"module {key!r}: {exc}") from exc
            matched.append(key)
        return matched

    def _create_and_replace(
        self,
        config: VBLoRAConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        init_logits: bool = True,
    ) -> None:
        layer_args = {
            "init_logits": init_logits,
            "r": config.r,
            "topk": config.topk,
            "num_vectors": config.num_vectors,
            "vector_length": config.vector_length,
            "vblora_dropout": config.vblora_dropout,
            "init_logits_std": config.init_logits_std,
        }
        if isinstance(target, Linear):
            target.update_layer(adapter_name, self.vblora_vector_bank, **layer_args)
            return
        is_conv1d = False
        if isinstance(target, nn.Linear):
            if config.fan_in_fan_out:
                warnings.warn(
                    "fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. "
                    "Setting fan_in_fan_out to False.",
                    stacklevel=4,
                )
                config.fan_in_fan_out = False
        elif isinstance(target, Conv1D):
            is_conv1d = True
            if not config.fan_in_fan_out:
                warnings.warn(
                    "fan_in_fan_out is set to False but the target module is `Conv1D`. Setting fan_in_fan_out to True.",
                    stacklevel=4,
                )
                config.fan_in_fan_out = True
        else:
            raise TypeError(
                f"Target module {target.__class__.__name__} is not supported. Currently, only the following modules "
                "are supported: `torch.nn.Linear`, `transformers.pytorch_utils.Conv1D`."
            )
        new_module = Linear(
            target,
            self.vblora_vector_bank,
            adapter_name,
            fan_in_fan_out=config.fan_in_fan_out,
            is_target_conv_1d_layer=is_conv1d,
            **layer_args,
        )
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        setattr(parent, target_name, new_module)

    def _mark_only_adapters_as_trainable(self, config: VBLoRAConfig) -> None:
        for name, param in self.model.named_parameters():
            if self.prefix not in name and ".modules_to_save." not in name:
                param.requires_grad = False
        for adapter in self.active_adapters:
            bias = self.peft_config[adapter].bias
            if bias == "all":
                for name, param in self.model.named_parameters():
                    if "bias" in name:
                        param.requires_grad = True
            elif bias == "vblora_only":
                for _, layer in self.vblora_layers():
                    base_bias = layer.get_base_layer().bias
                    if base_bias is not None:
                        base_bias.requires_grad = True
        # The bank of an inactive adapter is not trained either.
        for name, bank in self.vblora_vector_bank.items():
            bank.requires_grad_(name in self.active_adapters)

    def _set_requires_grad(self, adapter_name: str, requires_grad: bool) -> None:
        for _, layer in self.vblora_layers():
            for attr in layer.adapter_layer_names:
                holder = getattr(layer, attr)
                if adapter_name in holder:
                    holder[adapter_name].requires_grad_(requires_grad)
        for _, module in self.model.named_modules():
            if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
                module.modules_to_save[adapter_name].requires_grad_(requires_grad)

    # --- adapters -------------------------------------------------------------------------------

    def add_adapter(self, adapter_name: str, config: VBLoRAConfig, *, init_logits: bool = True) -> None:
        self.inject_adapter(config, adapter_name, init_logits=init_logits)

    def set_adapter(self, adapter_name: Union[str, list[str]], inference_mode: bool = False) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for name in names:
            if name not in self.peft_config:
                raise ValueError(f"Adapter {name!r} not found in {sorted(self.peft_config)}")
        for _, layer in self.vblora_layers():
            if layer.merged:
                warnings.warn(
                    "Adapter cannot be set when the model is merged. Unmerging the model first.", stacklevel=2
                )
                layer.unmerge()
            layer.set_adapter(adapter_name, inference_mode=inference_mode)
        for _, module in self.model.named_modules():
            if isinstance(module, ModulesToSaveWrapper):
                module.set_adapter(names[0], inference_mode=inference_mode)
        self.active_adapter = adapter_name

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name!r} does not exist")
        if any(adapter_name in layer.merged_adapters for _, layer in self.vblora_layers()):
            raise ValueError(
                f"Cannot delete adapter(s) {[adapter_name]} while they are merged. Please unmerge them first."
            )
        del self.peft_config[adapter_name]
        remaining = [a for a in self.active_adapters if a != adapter_name] or list(self.peft_config)[:1]
        for _, layer in self.vblora_layers():
            layer.delete_adapter(adapter_name)
        if adapter_name in self.vblora_vector_bank:
            del self.vblora_vector_bank[adapter_name]
        if adapter_name in self.vblora_topk:
            del self.vblora_topk[adapter_name]
        for _, module in self.model.named_modules():
            if isinstance(module, ModulesToSaveWrapper):
                module.delete_adapter(adapter_name)
        self.active_adapter = (remaining[0] if len(remaining) == 1 else remaining) if remaining else []
        if remaining:
            self.set_adapter(self.active_adapter)

    def enable_adapter_layers(self, enabled: bool = True) -> None:
        for _, module in self.model.named_modules():
            if isinstance(module, (VBLoRALayer, ModulesToSaveWrapper)):
                module.enable_adapters(enabled)

    # --- merging --------------------------------------------------------------------------------

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        for _, layer in self.vblora_layers():
            layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)

    def unmerge_adapter(self) -> None:
        for _, layer in self.vblora_layers():
            if layer.merged:
                layer.unmerge()

    # --- compact top-K form ---------------------------------------------------------------------

    def set_compact_adapter(
        self, adapter_name: str, layers: list[tuple[str, Linear]], table: compact.TopKTable, starts: list[int]
    ) -> None:
        """Store ``adapter_name`` in compact form: ``table`` holds the stored top-K rows of A then B of each of
        ``layers``, in order (already checked); ``starts[2 * i]`` is the first row of layer ``i``."""
        self.vblora_topk[adapter_name] = table
        for i, (_, layer) in enumerate(layers):
            layer.set_compact(adapter_name, self.vblora_topk, starts[2 * i])

    def compact_(self, adapter_name: str = "default") -> None:
        """Convert ``adapter_name`` in place to compact top-K form for deployment: per sub-vector only the top-K
        indices and weights PEFT's ``save_only_topk_weights`` would save are kept, the dense logits are freed,
        and forward / merge / ``get_delta_weight`` give what PEFT gives after loading that top-K checkpoint.
        The adapter can no longer be trained, and saves in top-K form from now on."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name!r} not found in {sorted(self.peft_config)}")
        layers = [(key, layer) for key, layer in self.vblora_layers() if layer.has_adapter(adapter_name)]
        merged = [key for key, layer in layers if adapter_name in layer.merged_adapters]
        if merged:
            raise ValueError(f"adapter {adapter_name!r} is merged into {merged[0]}; unmerge it before compact_")
        config = self.peft_config[adapter_name]
        dense = [
            logits
            for _, layer in layers
            if not layer.is_compact(adapter_name)
            for logits in (layer.vblora_logits_A[adapter_name], layer.vblora_logits_B[adapter_name])
        ]
        with torch.no_grad():
            encoded = iter(compact.encode_many(dense, config.topk, config.num_vectors))
        parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        for _, layer in layers:
            if layer.is_compact(adapter_name):
                idx_A, w_A, idx_B, w_B = layer.stored_topk(adapter_name)
                parts += [(idx_A, w_A), (idx_B, w_B)]
            else:
                parts += [next(encoded), next(encoded)]
        table, starts = compact.table_from_layers(parts, config.num_vectors, config.topk)
        self.set_compact_adapter(adapter_name, layers, table, starts)
        config.save_only_topk_weights = True

    def _unload(
        self,
        merge: bool,
        safe_merge: bool = False,
        adapter_names: Optional[list[str]] = None,
        progressbar: bool = False,
    ) -> nn.Module:
        layers = self.vblora_layers()
        desc = "Unloading and merging model" if merge else "Unloading model"
        for key, layer in tqdm(layers, disable=not progressbar, desc=desc):
            if merge:
                layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)
            self._replace_with_base(key, layer)
        unwrap_modules_to_save(self.model)
        return self.model

    def merge_and_unload(
        self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False, progressbar: bool = False
    ) -> nn.Module:
        """Merge the adapters into the base weights (one pass per weight, in Rust on CPU) and return the base model."""
        return self._unload(merge=True, safe_merge=safe_merge, adapter_names=adapter_names, progressbar=progressbar)

    def unload(self) -> nn.Module:
        """Return the base model with the adapter layers removed, without merging."""
        return self._unload(merge=False)

    # --- parameter counts -----------------------------------------------------------------------

    def get_nb_savable_parameters(self, adapter: str = "default") -> tuple[int, int]:
        """(VB-LoRA parameters to be saved, in float32 equivalents; other savable parameters), as PEFT counts."""
        logits_params = vector_bank_params = other_params = 0
        for _, layer in self.vblora_layers():  # compact adapters count as the dense logits PEFT would hold
            for name in layer.vblora_topk_rows:
                grid_A, grid_B = layer.topk_grids(name)
                rows = grid_A[0] * grid_A[1] + grid_B[0] * grid_B[1]
                logits_params += rows * self.vblora_topk[name].num_vectors
        for name, param in self.named_parameters():
            if "vblora_logits" in name:
                logits_params += param.numel()
            elif "vblora_vector_bank" in name:
                vector_bank_params += param.numel()
            elif param.requires_grad:
                other_params += param.numel()
        config = self.peft_config[adapter]
        if config.save_only_topk_weights:
            nv = config.num_vectors
            factor = 0.25 if nv < 2**8 else 0.5 if nv < 2**15 else 1 if nv < 2**31 else 2
            topk_weight_params = logits_params / nv * (config.topk - 1)
            topk_indices_params = logits_params / nv * config.topk * factor
            return int(vector_bank_params + topk_weight_params + topk_indices_params), other_params
        return vector_bank_params + logits_params, other_params

    def print_savable_parameters(self) -> None:
        vblora_params, other_params = self.get_nb_savable_parameters()
        print(
            f"VB-LoRA params to-be-saved (float32-equivalent): {vblora_params:,d} "
            f"|| total params to-be-saved: {(vblora_params + other_params):,d}"
        )
