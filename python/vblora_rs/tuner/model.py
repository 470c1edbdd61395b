"""The VB-LoRA tuner: a subclass of PEFT's ``peft.tuners.vblora.VBLoRAModel`` (what ``peft_model.base_model`` is).

PEFT's tuner does target matching, injection, adapter management, ``modules_to_save`` and unloading; this subclass
changes what is VB-LoRA's own:

- the bank of an adapter is drawn once (PEFT draws it again for every target module and keeps the last draw);
- layers are our :class:`~vblora_rs.tuner.layer.Linear` (Rust no-grad paths, compact top-K form, A/B cache);
- PEFT's state-dict hooks: saving encodes top-K with one Rust call over every layer and writes compact adapters as
  stored; loading a top-K checkpoint checks every tensor first and keeps the compact form (no dense logits);
- ``adapter_names`` mixed batches (PEFT's ``_enable_peft_forward_hooks``), ``compact_``.
"""

from __future__ import annotations

import functools
import gc
import os
import sys
import threading
import warnings
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists
from peft.tuners.vblora import model as peft_model
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn
from transformers.pytorch_utils import Conv1D

from .._gc_pause import collector_paused
from ..convert import topk as topk_codec
from ..errors import VBLoRAError
from ..storage import targets
from ..storage.adapter_config import SIZE_FIELDS, check_config, size_problem
from ..storage.names import BANK_KEY, MODEL_PREFIX, TOPK_INDICES, TOPK_WEIGHTS
from . import sharding, shared_bank, weights_check
from . import topk_table as compact
from .batches import BASE_ADAPTER, RowGroups
from .layer import Linear, VBLoRALayer
from .memory_budget import MemoryBudget
from .quantized import layer_class_for

# config fields a VB-LoRA layer cannot do without (PEFT's config accepts null for each)
REQUIRED_CONFIG_FIELDS = (
    "r",
    "num_vectors",
    "vector_length",
    "topk",
    "vblora_dropout",
    "init_logits_std",
    "init_vector_bank_bound",
    "fan_in_fan_out",
    "save_only_topk_weights",
)

# every tuner of ours alive in the process (see peft_backend.remove_from_peft)
_LIVE_TUNERS: weakref.WeakSet[VBLoRAModel] = weakref.WeakSet()


def compact_adapters_alive() -> list[str]:
    """``"<adapter> (<tuner id>)"`` for every compact adapter held by a live tuner of ours. A model dropped inside
    a reference cycle (torch.compile's traces leave such cycles) stays in the weak set until the cycle collector
    runs, so collect first: garbage is not alive."""
    gc.collect()
    return [f"{name!r} (tuner {id(t):#x})" for t in list(_LIVE_TUNERS) for name in t.vblora_topk]


class VBLoRAModel(peft_model.VBLoRAModel):
    """PEFT's VB-LoRA tuner, with the layers, bank and checkpoint hooks of vblora_rs."""

    tuner_layer_cls = VBLoRALayer

    # --- injection ------------------------------------------------------------------------------

    def _pre_injection_hook(self, model: nn.Module, config: Any, adapter_name: str) -> None:
        # One bank dict for the tuner's life: layers hold a reference to it, and PEFT's hook would replace it with
        # an empty one whenever another adapter is added.
        if "vblora_vector_bank" not in self._modules:
            self.vblora_vector_bank = nn.ParameterDict({})
            shared_bank.mark_owned(self.vblora_vector_bank)  # layers hold it by reference (FSDP: one owner)
        if "vblora_topk" not in self._modules:
            # Compact adapters' top-K tables (one per adapter, shared by its layers like the bank).
            self.vblora_topk = nn.ModuleDict({})
        _LIVE_TUNERS.add(self)

    @staticmethod
    def check_new_adapter(config: Any, adapter_name: str) -> None:
        """Refuse a config or adapter name no layer can be built from, before anything is allocated: PEFT's config
        takes any values (a 2^31 x 2^31 bank, a regex that never finishes), and an adapter name is a folder name
        when saving. Runs for every injection (PEFT's ``add_adapter``/``load_adapter`` skip the pre-injection
        hook)."""
        if (
            not isinstance(adapter_name, str)
            or adapter_name in ("", ".", "..")
            or any(sep in adapter_name for sep in ("/", "\\", os.sep))
        ):
            raise VBLoRAError(f"adapter name {adapter_name!r} must be a single folder name (it names the save folder)")
        source = f"config of adapter {adapter_name!r}"
        unset = [f for f in REQUIRED_CONFIG_FIELDS if getattr(config, f, None) is None]
        if unset:  # PEFT's config takes null for any field; the layers need these
            raise VBLoRAError(f"{source}: {unset[0]} must be set, got null")
        problem = size_problem({name: getattr(config, name) for name in SIZE_FIELDS})
        if problem:
            raise VBLoRAError(f"{source}: {problem}")
        # PEFT keeps name lists as sets; as the JSON file would hold them (mixed types in a hostile file too)
        as_json = {k: list(v) if isinstance(v, (set, frozenset)) else v for k, v in config.to_dict().items()}
        check_config(as_json, source)

    @staticmethod
    def _check_target_module_exists(peft_config: Any, key: str) -> Any:
        """THE target rule (:mod:`vblora_rs.storage.targets`, PEFT's semantics) that ``vblora merge`` applies too,
        so a file the model side refuses for its targets is refused by the command line as well."""
        status = targets.module_status(vars(peft_config), key)
        if status == targets.EXCLUDED:
            # PEFT's own sentinel, from its public rule (the two agree: tests/test_edges_cli.py): PEFT counts
            # excluded modules apart in its "no module matched" message
            return check_target_module_exists(peft_config, key)
        return status == targets.TARGETED

    def _init_vblora_vector_bank(self, config: Any, adapter_name: str, draw: bool = True) -> None:
        """Draw the bank of ``adapter_name`` (a new one each call, as PEFT's; injection calls it once per adapter).
        ``draw=False`` only reserves it, unwritten, for a checkpoint to fill (its pages are not touched)."""
        device = next((p.device for p in self.model.parameters() if p.device.type != "meta"), torch.device("cpu"))
        bank = torch.empty(config.num_vectors, config.vector_length, device=device)
        if draw:
            nn.init.uniform_(bank, -config.init_vector_bank_bound, config.init_vector_bank_bound)
        self.vblora_vector_bank[adapter_name] = nn.Parameter(bank)

    def _create_and_replace(
        self,
        vblora_config: Any,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: Optional[str],
    ) -> None:
        if current_key is None:
            raise ValueError("Current Key shouldn't be `None`")
        try:
            self._create_and_replace_module(vblora_config, adapter_name, target, target_name, parent)
        except (ValueError, TypeError) as exc:  # name the module at fault
            raise type(exc)(f"module {current_key!r}: {exc}") from exc

    def _create_and_replace_module(
        self, vblora_config: Any, adapter_name: str, target: nn.Module, target_name: str, parent: nn.Module
    ) -> None:
        # An adapter created for inference (what from_pretrained / load_adapter build to load a checkpoint into)
        # gets its logits on the meta device and an undrawn bank: the load hook checks the file's shapes first and
        # only then gives dense logits memory, or keeps a top-K file compact (PEFT allocates and draws num_vectors
        # floats per sub-vector here, before it reads the file), and it refuses a checkpoint without a bank.
        init_logits = not vblora_config.inference_mode
        budget = self.__dict__.get("_memory_budget") or MemoryBudget(f"config of adapter {adapter_name!r}")
        if adapter_name not in self.vblora_vector_bank:  # drawn once per adapter, not once per target module
            budget.take("the vector bank", (vblora_config.num_vectors, vblora_config.vector_length))
            self._init_vblora_vector_bank(vblora_config, adapter_name, draw=init_logits)
        if init_logits:
            in_out = _in_out_features(target)
            if in_out is not None:
                r, length = vblora_config.r, vblora_config.vector_length
                budget.take("logits A", (r, in_out[0] // length, vblora_config.num_vectors))
                budget.take("logits B", (in_out[1] // length, r, vblora_config.num_vectors))
        if isinstance(target, Linear):
            target.update_layer(
                adapter_name, self.vblora_vector_bank, vblora_config.r, config=vblora_config, init_logits=init_logits
            )
            return
        new_module = self._create_new_module(
            vblora_config, self.vblora_vector_bank, adapter_name, target, init_logits=init_logits
        )
        if adapter_name not in self.active_adapter:
            new_module.requires_grad_(False)  # an additional adapter is not trainable until set_adapter
        self._replace_module(parent, target_name, new_module, target)

    @staticmethod
    def _create_new_module(  # type: ignore[override]
        vblora_config: Any, vblora_vector_bank: nn.ParameterDict, adapter_name: str, target: nn.Module, **kwargs: Any
    ) -> Linear:
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        layer_class = layer_class_for(base) or Linear  # bitsandbytes 4-bit / 8-bit; other quantized layers refused
        if isinstance(base, nn.Linear):
            if vblora_config.fan_in_fan_out:
                warnings.warn(
                    "fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. "
                    "Setting fan_in_fan_out to False.",
                    stacklevel=2,
                )
                vblora_config.fan_in_fan_out = False
        elif isinstance(base, Conv1D):
            kwargs["is_target_conv_1d_layer"] = True
            if not vblora_config.fan_in_fan_out:
                warnings.warn(
                    "fan_in_fan_out is set to False but the target module is `Conv1D`. Setting fan_in_fan_out to True.",
                    stacklevel=2,
                )
                vblora_config.fan_in_fan_out = True
        else:
            raise TypeError(
                f"Target module {target} is not supported. Currently, only the following modules are supported: "
                "`torch.nn.Linear`, `transformers.pytorch_utils.Conv1D`."
            )
        return layer_class(target, vblora_vector_bank, adapter_name, config=vblora_config, r=vblora_config.r, **kwargs)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        """PEFT's injection; if it fails part-way, the adapter is taken out again and modules it alone had wrapped
        get their base layer back, so the model is as it was."""
        # PEFT restores the trainability of the parameters of `model` the injection touched; the banks are the
        # tuner's, outside `model` (see shared_bank), so the other adapters' banks are restored here
        banks = [(bank, bank.requires_grad) for name, bank in self.vblora_vector_bank.items() if name != adapter_name]
        self.check_new_adapter(self.peft_config[adapter_name], adapter_name)
        self.__dict__["_memory_budget"] = MemoryBudget(f"config of adapter {adapter_name!r}")
        try:
            with collector_paused():
                super().inject_adapter(model, adapter_name, *args, **kwargs)
        except Exception:
            self._undo_injection(model, adapter_name)
            raise
        finally:
            del self.__dict__["_memory_budget"]
        for bank, requires_grad in banks:
            bank.requires_grad_(requires_grad)

    def _undo_injection(self, model: nn.Module, adapter_name: str) -> None:
        for key, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, VBLoRALayer)]:
            if adapter_name in layer.r:
                layer.delete_adapter(adapter_name)
            if not layer.r:  # no adapter left: the layer was created for this one
                parent_name, _, child = key.rpartition(".")
                setattr(model.get_submodule(parent_name) if parent_name else model, child, layer.get_base_layer())
        if adapter_name in self.vblora_vector_bank:
            del self.vblora_vector_bank[adapter_name]

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype)
        # the first layer with the adapter's logits decides; a compact adapter has none in any layer, so no walk
        # (this runs twice per load: a full walk of a 7B model each time was ~2 ms of a 170 ms compact load)
        compact_adapter = adapter_name in self.vblora_topk
        layers = () if compact_adapter else (m for m in self.model.modules() if isinstance(m, VBLoRALayer))
        shared_bank.follow_adapter_dtype(self.vblora_vector_bank, adapter_name, layers, autocast_adapter_dtype)

    def vblora_layers(self) -> list[tuple[str, Linear]]:
        """``(module name, layer)`` of every VB-LoRA layer of the model."""
        return [(name, m) for name, m in self.model.named_modules() if isinstance(m, VBLoRALayer)]

    # --- adapters -------------------------------------------------------------------------------

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        if adapter_name in self.vblora_vector_bank:
            del self.vblora_vector_bank[adapter_name]
        if adapter_name in self.vblora_topk:
            del self.vblora_topk[adapter_name]

    # --- many adapters in one batch -------------------------------------------------------------

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """``adapter_names`` (one adapter per sample, ``"__base__"`` for none): checked once, then passed to every
        adapter layer (as row groups shared by all layers) and auxiliary wrapper through forward pre-hooks."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        groups = RowGroups.of(adapter_names)
        if self.training:
            raise VBLoRAError("Cannot pass `adapter_names` when the model is in training mode.")
        unknown = sorted(set(groups.groups) - {BASE_ADAPTER} - set(self.peft_config))
        if unknown:
            raise VBLoRAError(f"Trying to infer with non-existing adapter(s): {', '.join(unknown)}")
        batch_size = _batch_size(args, kwargs)
        if batch_size is not None and batch_size != len(groups):
            raise VBLoRAError(
                "Length of `adapter_names` should be the same as the number of inputs, but got "
                f"{len(groups)} and {batch_size} respectively."
            )
        layers = [m for m in self.model.modules() if isinstance(m, VBLoRALayer)]
        if any(layer.merged for layer in layers):
            raise VBLoRAError(
                "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first."
            )
        thread = threading.get_ident()
        handles = [
            m.register_forward_pre_hook(
                functools.partial(_pass_adapter_names, names=groups, thread=thread), with_kwargs=True
            )
            for m in layers
        ]
        handles += [
            m.register_forward_pre_hook(
                functools.partial(_pass_adapter_names, names=list(groups.names), thread=thread), with_kwargs=True
            )
            for m in self.model.modules()
            if isinstance(m, AuxiliaryTrainingWrapper)
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

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
        bank = self.vblora_vector_bank[adapter_name]
        sharding.require_whole([*dense, bank], adapter_name, self.vblora_vector_bank, "compact_")
        with torch.no_grad():
            encoded = iter(topk_codec.encode_many(dense, config.topk, config.num_vectors))
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

    # --- parameter counts -----------------------------------------------------------------------

    def get_nb_savable_parameters(self, adapter: str = "default") -> tuple[int, int]:
        """(VB-LoRA parameters to be saved, in float32 equivalents; other savable parameters), as PEFT counts;
        compact adapters count as the dense logits PEFT would hold."""
        logits_params = vector_bank_params = other_params = 0
        for _, layer in self.vblora_layers():
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

    # --- PEFT's state-dict hooks ----------------------------------------------------------------

    @classmethod
    def _get_adapter_state_dict(
        cls,
        model: nn.Module,
        config: Any,
        adapter_name: str,
        state_dict: dict[str, torch.Tensor],
        unwanted_adapter_names: list[str],
    ) -> dict[str, torch.Tensor]:
        """What PEFT saves for ``adapter_name`` (its keys and dtypes, adapter name still in the keys): top-K
        encoding of every layer in one Rust call; compact adapters as stored (or as PEFT's dense logits)."""
        if not isinstance(_tuner_or_none(model), VBLoRAModel):  # a model built with PEFT's own classes
            return super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        sharding.refuse_sharded_state_dict(state_dict, adapter_name)
        to_return: dict[str, torch.Tensor] = {}
        logits = {k: v for k, v in state_dict.items() if "vblora_logits" in k}
        if config.save_only_topk_weights and not (logits and _in_trainer_checkpoint()):
            encoded = topk_codec.encode_many(list(logits.values()), config.topk, config.num_vectors)
            for key, (idx, weights) in zip(logits, encoded):
                to_return[f"{key}{TOPK_INDICES}"] = idx
                to_return[f"{key}{TOPK_WEIGHTS}"] = weights
        else:
            to_return.update(logits)
        to_return.update(_compact_layer_tensors(model, adapter_name, config.save_only_topk_weights))
        to_return[f"{BANK_KEY}.{adapter_name}"] = state_dict[f"{BANK_KEY}.{adapter_name}"]
        to_return.update(cls._get_learnable_bias_state_dict(model, state_dict, config))
        return _unaliased(to_return)

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: Any, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Check every VB-LoRA tensor of the checkpoint against the model before anything changes (VBLoRAError
        naming the tensor), then keep a top-K checkpoint in compact form instead of PEFT's dense ``-inf`` logits."""
        tuner = _tuner_or_none(model)
        if not isinstance(tuner, VBLoRAModel):  # a model built with PEFT's own classes
            return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        layers = [(n, layer) for n, layer in tuner.vblora_layers() if adapter_name in layer.r]
        state_dict = dict(state_dict)
        topk = weights_check.take_topk_parts(layers, config, state_dict, adapter_name)
        weights_check.check_dense_and_bank(layers, config, state_dict, adapter_name, dense=topk is None)
        if topk is not None:
            tuner.set_compact_adapter(adapter_name, layers, *topk)
            # the table's buffers are loaded too, as far as load_state_dict can tell (no "missing keys" warning)
            prefix = "base_model." if tuner is not model else ""
            for name, buffer in tuner.vblora_topk[adapter_name].named_buffers():
                state_dict[f"{prefix}vblora_topk.{adapter_name}.{name}"] = buffer
            if set(state_dict) <= {BANK_KEY, *(k for k in state_dict if ".vblora_topk." in f".{k}")}:
                # nothing but the bank left to map: no walk of the whole model's state dict (PEFT's mapping is
                # built from model.state_dict(), a few MiB at the 7B shape, on the peak of a compact load)
                state_dict[f"{prefix}vblora_vector_bank.{adapter_name}"] = state_dict.pop(BANK_KEY)
                return state_dict
        else:  # dense logits left on the meta device (an inference load), their shapes checked: give them memory
            budget = MemoryBudget(weights_check.checkpoint_of(adapter_name))
            for _, layer in layers:
                layer.materialize_meta_logits(adapter_name, budget)
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)


def _in_trainer_checkpoint() -> bool:
    """Whether this save is one of transformers' ``Trainer`` checkpoints (``Trainer._save_checkpoint`` up the
    stack; TRL's trainers are Trainers). Those keep the dense logits even with ``save_only_topk_weights``: a
    top-K file cannot be trained on (PEFT's "Found infinity values" trap), and a run must resume from its
    checkpoints and reload its best one. The user's own saves (``save_pretrained``, ``trainer.save_model()``)
    are top-K as configured."""
    trainer_module = sys.modules.get("transformers.trainer")
    if trainer_module is None:
        return False
    frame: Any = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "_save_checkpoint" and isinstance(
            frame.f_locals.get("self"), trainer_module.Trainer
        ):
            return True
        frame = frame.f_back
    return False


def _in_out_features(target: nn.Module) -> Optional[tuple[int, int]]:
    """``(in, out)`` features of a target layer (nn.Linear and its quantized subclasses, transformers' Conv1D)."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if isinstance(base, Conv1D):
        return int(base.weight.shape[0]), int(base.weight.shape[1])
    if isinstance(base, nn.Linear):
        return int(base.in_features), int(base.out_features)
    return None


def _tuner_or_none(model: nn.Module) -> Optional[nn.Module]:
    """The tuner of a PeftModel (or the tuner itself); None for a model with injected layers and no tuner."""
    return model if isinstance(model, peft_model.VBLoRAModel) else getattr(model, "base_model", None)


def _tuner_of(model: nn.Module) -> VBLoRAModel:
    """vblora_rs's VB-LoRA tuner of a PeftModel (or the tuner itself)."""
    tuner = _tuner_or_none(model)
    if not isinstance(tuner, VBLoRAModel):
        raise TypeError(f"expected a PeftModel with vblora_rs's VB-LoRA tuner, got {type(model).__name__}")
    return tuner


def _compact_layer_tensors(model: nn.Module, adapter_name: str, topk_form: bool) -> dict[str, torch.Tensor]:
    """Checkpoint tensors (model keys) of the layers holding ``adapter_name`` in compact form: the stored top-K
    tensors as they are, or (full mode) the dense logits PEFT would hold."""
    out: dict[str, torch.Tensor] = {}
    tuner = _tuner_of(model)
    for name, layer in tuner.vblora_layers():
        if not layer.is_compact(adapter_name):
            continue
        idx_A, w_A, idx_B, w_B = layer.stored_topk(adapter_name)
        num_vectors = layer.vblora_topk[adapter_name].num_vectors
        for key, idx, w in (("vblora_logits_A", idx_A, w_A), ("vblora_logits_B", idx_B, w_B)):
            model_key = f"{MODEL_PREFIX}{name}.{key}.{adapter_name}"
            if topk_form:
                out[model_key + TOPK_INDICES] = idx.to(topk_codec.indices_dtype(num_vectors))
                out[model_key + TOPK_WEIGHTS] = w
            else:
                out[model_key] = topk_codec.dense_logits(idx, w, num_vectors)
    return out


def _unaliased(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (top-K tensors of several layers encoded together, views of
    one compact table): copy every tensor whose storage another one already uses, keep the first as it is."""
    seen: set[int] = set()
    out = {}
    for key, value in tensors.items():
        value = value.detach()
        storage = value.untyped_storage().data_ptr()
        out[key] = value.clone() if storage in seen and value.numel() else value
        seen.add(storage)
    return out


def _pass_adapter_names(
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: Optional[dict[str, Any]] = None,
    *,
    names: Any,
    thread: int,
) -> Optional[tuple[tuple[Any, ...], dict[str, Any]]]:
    # Hooks live on shared modules: a call in another thread (with its own adapter_names, or none) runs this hook
    # too, and must not get these names. torch puts a hook in `_forward_pre_hooks` a moment before it marks it as
    # taking keywords: another thread's forward in that moment calls it as `hook(module, args)` (no kwargs), and
    # it is never this thread's (its forward starts after the registration).
    if kwargs is None or threading.get_ident() != thread:
        return None
    kwargs["adapter_names"] = names
    return args, kwargs


def _batch_size(args: Sequence[Any], kwargs: dict[str, Any]) -> Optional[int]:
    """Samples in a call's inputs: dim 0 of the first tensor among the positional arguments, else of the usual
    input keywords (None if there is no tensor to tell)."""
    for value in args:
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    for key in ("input_ids", "inputs_embeds", "x", "pixel_values", "input_values", "input_features"):
        value = kwargs.get(key)
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return None
