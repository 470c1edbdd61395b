"""``VBLoRAModel``: what ``get_peft_model`` returns, with PEFT's ``PeftModel`` interface (``PeftModel`` is an
alias). Layout as in PEFT: ``wrapper.base_model`` is the tuner, ``wrapper.base_model.model`` the user's
model with its targets replaced, so state-dict keys read ``base_model.model.<path>...``."""

from __future__ import annotations

import copy
import functools
import inspect
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Optional, Union

import torch
from torch import nn

from . import checkpoint
from .config import CONFIG_NAME, VBLoRAConfig
from .errors import VBLoRAError
from .layer import BASE_ADAPTER, RowGroups, VBLoRALayer
from .modules_to_save import ModulesToSaveWrapper
from .tuner import VBLoRATuner


class _BoundForward:
    """``model.forward`` of one VBLoRAModel: calls the forward, and shows the wrapped model's signature plus
    ``adapter_names``. Tools choose batch keys from ``inspect.signature(model.forward)`` (transformers' Trainer
    drops every column not named there, and only unwraps PEFT's own classes), and a bare ``*args, **kwargs``
    would make them drop ``input_ids``."""

    __slots__ = ("__func__", "__self__")

    def __init__(self, func: Any, owner: VBLoRAModel) -> None:
        self.__func__ = func
        self.__self__ = owner

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.__func__(self.__self__, *args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        try:
            base = inspect.signature(self.__self__.get_base_model().forward)
        except (TypeError, ValueError):  # a forward without a readable signature: ours, less `self`
            own = inspect.signature(self.__func__)
            return own.replace(parameters=list(own.parameters.values())[1:])
        params = [p for p in base.parameters.values() if p.name != "adapter_names"]
        extra = inspect.Parameter("adapter_names", inspect.Parameter.KEYWORD_ONLY, default=None)
        tail = [p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD]
        params = [p for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD] + [extra] + tail
        return base.replace(parameters=params)

    @property
    def __doc__(self) -> Optional[str]:  # type: ignore[override]
        return self.__func__.__doc__


class _ForwardDescriptor:
    """Makes ``VBLoRAModel.forward`` (on the class: the plain function) a :class:`_BoundForward` on instances."""

    def __init__(self, func: Any) -> None:
        self.func = func
        functools.update_wrapper(self, func)

    def __get__(self, owner: Optional[VBLoRAModel], owner_type: Optional[type] = None) -> Any:
        return self.func if owner is None else _BoundForward(self.func, owner)


class VBLoRAModel(nn.Module):
    """A model with VB-LoRA adapters. Attributes it does not have fall through to the tuner, then to the model."""

    def __init__(
        self, model: nn.Module, peft_config: VBLoRAConfig, adapter_name: str = "default", *, init_logits: bool = True
    ) -> None:
        super().__init__()
        if not isinstance(peft_config, VBLoRAConfig):
            raise TypeError(f"expected a VBLoRAConfig, got {type(peft_config).__name__}")
        self.base_model = VBLoRATuner(model, peft_config, adapter_name, init_logits=init_logits)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # --- state ----------------------------------------------------------------------------------

    @property
    def peft_config(self) -> dict[str, VBLoRAConfig]:
        return self.base_model.peft_config

    @property
    def active_adapter(self) -> Union[str, list[str]]:
        return self.base_model.active_adapter

    @property
    def active_adapters(self) -> list[str]:
        return self.base_model.active_adapters

    @property
    def active_peft_config(self) -> VBLoRAConfig:
        return self.peft_config[self.active_adapters[0]]

    def get_base_model(self) -> nn.Module:
        return self.base_model.model

    @_ForwardDescriptor
    def forward(self, *args: Any, adapter_names: Optional[Sequence[str]] = None, **kwargs: Any) -> Any:
        """The model's forward; ``adapter_names`` (one adapter name per sample, ``"__base__"`` for none) runs each
        sample with its own adapter, in eval mode and unmerged."""
        if adapter_names is None:
            return self.base_model.model(*args, **kwargs)
        with self._adapter_names_hooks(adapter_names, _batch_size(args, kwargs)):
            return self.base_model.model(*args, **kwargs)

    def generate(self, *args: Any, adapter_names: Optional[Sequence[str]] = None, **kwargs: Any) -> Any:
        """The base model's ``generate``; with ``adapter_names`` each sample (and its beams or returned sequences)
        decodes with its own adapter."""
        model = self.get_base_model()
        if adapter_names is None:
            return model.generate(*args, **kwargs)
        with self._adapter_names_hooks(adapter_names, _batch_size(args, kwargs)):
            return model.generate(*args, **kwargs)

    @contextmanager
    def _adapter_names_hooks(self, adapter_names: Sequence[str], batch_size: Optional[int]) -> Iterator[None]:
        """Check ``adapter_names`` once, then pass its row groups to every adapter layer and modules_to_save
        wrapper through forward pre-hooks (PEFT's mechanism), removed on exit."""
        groups = RowGroups.of(adapter_names)
        if self.training:
            raise VBLoRAError("Cannot pass `adapter_names` when the model is in training mode.")
        unknown = sorted(set(groups.groups) - {BASE_ADAPTER} - set(self.peft_config))
        if unknown:
            raise VBLoRAError(f"Trying to infer with non-existing adapter(s): {', '.join(unknown)}")
        if batch_size is not None and batch_size != len(groups):
            raise VBLoRAError(
                "Length of `adapter_names` should be the same as the number of inputs, but got "
                f"{len(groups)} and {batch_size} respectively."
            )
        modules = [m for m in self.modules() if isinstance(m, (VBLoRALayer, ModulesToSaveWrapper))]
        merged = [m for m in modules if isinstance(m, VBLoRALayer) and m.merged]
        if merged:
            raise VBLoRAError(
                "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first."
            )
        hook = functools.partial(_pass_adapter_names, groups=groups, thread=threading.get_ident())
        handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in modules]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    # --- adapters -------------------------------------------------------------------------------

    def add_adapter(self, adapter_name: str, peft_config: VBLoRAConfig) -> None:
        """Add another adapter (inactive and frozen until ``set_adapter``)."""
        self.base_model.add_adapter(adapter_name, peft_config)

    def set_adapter(self, adapter_name: Union[str, list[str]]) -> None:
        self.base_model.set_adapter(adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        self.base_model.delete_adapter(adapter_name)

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Inside the block the model gives the base model's outputs."""
        self.base_model.enable_adapter_layers(False)
        try:
            yield
        finally:
            self.base_model.enable_adapter_layers(True)

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        self.base_model.merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        self.base_model.unmerge_adapter()

    def merge_and_unload(
        self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False, progressbar: bool = False
    ) -> nn.Module:
        return self.base_model.merge_and_unload(
            adapter_names=adapter_names, safe_merge=safe_merge, progressbar=progressbar
        )

    def unload(self) -> nn.Module:
        return self.base_model.unload()

    def compact_(self, adapter_name: str = "default") -> None:
        """Keep only the top-K indices and weights of ``adapter_name`` (see ``VBLoRATuner.compact_``)."""
        self.base_model.compact_(adapter_name)

    # --- parameter counts -----------------------------------------------------------------------

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = total = 0
        for param in self.parameters():
            total += param.numel()
            if param.requires_grad:
                trainable += param.numel()
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    def get_nb_savable_parameters(self, adapter: str = "default") -> tuple[int, int]:
        return self.base_model.get_nb_savable_parameters(adapter)

    def print_savable_parameters(self) -> None:
        self.base_model.print_savable_parameters()

    # --- checkpoints ----------------------------------------------------------------------------

    def save_pretrained(
        self,
        save_directory: Union[str, os.PathLike],
        selected_adapters: Optional[list[str]] = None,
        format: str = "peft",
        half: Union[bool, torch.dtype] = False,
        **kwargs: Any,
    ) -> Optional[dict[str, Any]]:
        """Save adapters as PEFT does: the ``default`` adapter in ``save_directory``, any other in a subfolder
        named after it.

        ``format="peft"`` writes PEFT's ``adapter_model.safetensors`` (full logits, or top-K with
        ``save_only_topk_weights``). ``format="packed"`` writes the compact single file
        ``adapter_packed.safetensors`` (top-K, indices bit-packed; lossless), and with ``half=True`` (float16) or
        ``half=torch.bfloat16`` the lossy variant whose bank and weights are half precision; it then returns
        ``{adapter: PackReport}`` with the max error of every layer's delta weight."""
        half_dtype = _half_dtype(half)
        if os.path.isfile(save_directory):
            raise VBLoRAError(f"{save_directory}: is a file, expected a directory")
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        for name in names:
            if name not in self.peft_config:
                raise ValueError(f"Adapter {name!r} not found in {sorted(self.peft_config)}")
        reports = {}
        for name in names:
            target = save_directory if name == "default" else os.path.join(save_directory, name)
            reports[name] = checkpoint.save_adapter(self, target, name, format=format, half=half_dtype)
        return reports if format == "packed" else None

    def load_adapter(
        self,
        model_id: Union[str, os.PathLike],
        adapter_name: str,
        is_trainable: bool = False,
        config: Optional[VBLoRAConfig] = None,
    ) -> None:
        """Add adapter ``adapter_name`` from a checkpoint folder (PEFT's or ours). The adapters already there
        keep their trainability; on a bad file nothing changes."""
        config, tensors, weights, config_source = _read_checkpoint(model_id, config, is_trainable)
        requires_grad = {id(p): p.requires_grad for p in self.parameters()}
        with _config_errors(config_source):
            self.base_model.add_adapter(adapter_name, config, init_logits=not checkpoint.is_topk_checkpoint(tensors))
        try:
            checkpoint.load_adapter_weights(self, tensors, adapter_name, weights)
        except Exception:
            self.base_model._forget(adapter_name)
            raise
        finally:
            for param in self.parameters():
                if id(param) in requires_grad:
                    param.requires_grad_(requires_grad[id(param)])
        if is_trainable:  # as PEFT: a loaded trainable adapter trains even while another one is active
            self.base_model._set_requires_grad(adapter_name, True)
        else:
            self.eval()

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: Union[str, os.PathLike],
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: Optional[VBLoRAConfig] = None,
        **kwargs: Any,
    ) -> VBLoRAModel:
        """Load an adapter checkpoint folder (written by PEFT or by us) onto ``model``."""
        config, tensors, weights, config_source = _read_checkpoint(model_id, config, is_trainable)
        # a top-K checkpoint loads in compact form: no dense logits are ever allocated
        with _config_errors(config_source):
            wrapper = cls(model, config, adapter_name, init_logits=not checkpoint.is_topk_checkpoint(tensors))
        try:
            checkpoint.load_adapter_weights(wrapper, tensors, adapter_name, weights)
        except Exception:
            wrapper.unload()  # hand the user's model back as it was
            raise
        if not is_trainable:
            wrapper.eval()
        return wrapper


def _half_dtype(half: Union[bool, torch.dtype]) -> Optional[torch.dtype]:
    if half is True:
        return torch.float16
    if half is False or half is None:
        return None
    if half in (torch.float16, torch.bfloat16):
        return half  # type: ignore[return-value]
    raise ValueError(f"half must be a bool, torch.float16 or torch.bfloat16, got {half!r}")


@contextmanager
def _config_errors(source: str) -> Iterator[None]:
    """A config that does not fit the model (e.g. a vector_length that does not divide a layer) is a bad file:
    VBLoRAError naming it (still a ValueError)."""
    try:
        yield
    except VBLoRAError:
        raise
    except ValueError as exc:
        raise VBLoRAError(f"{source}: {exc}") from exc


def _pass_adapter_names(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], groups: RowGroups, thread: int
) -> Optional[tuple[tuple[Any, ...], dict[str, Any]]]:
    # Hooks live on shared modules: a call in another thread (with its own adapter_names, or none) runs this hook
    # too, and must not get these names.
    if threading.get_ident() != thread:
        return None
    kwargs["adapter_names"] = groups
    return args, kwargs


def _batch_size(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Optional[int]:
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


def _read_checkpoint(
    model_id: Union[str, os.PathLike], config: Optional[VBLoRAConfig], is_trainable: bool
) -> tuple[VBLoRAConfig, dict[str, torch.Tensor], str, str]:
    """Config (given or read), tensors (PEFT's layout), weights path and where the config came from, of a
    checkpoint: a folder with PEFT's ``adapter_model.safetensors`` or our packed file, or the packed file
    itself. Read before anything changes."""
    from . import packed

    path = os.fspath(model_id)
    weights = _weights_file(path)
    if os.path.basename(weights) == checkpoint.WEIGHTS_NAME:
        file_config = VBLoRAConfig.from_pretrained(path) if config is None else config
        tensors = checkpoint.read_safetensors(weights)
        source = os.path.join(path, CONFIG_NAME)
    else:
        file_config, tensors = packed.read_packed(weights)
        source = f"{weights} (its config)"
    if config is not None:
        source = "the config given to load the adapter"
    config = copy.deepcopy(config if config is not None else file_config)
    config.inference_mode = not is_trainable
    return config, tensors, weights, source


def _weights_file(path: str) -> str:
    """The adapter weights file of ``path``: PEFT's or the packed one (exactly one of them), or ``path`` itself
    when it is a packed file."""
    from . import packed

    if os.path.isfile(path) and packed.is_packed_file(path):
        return path
    candidates = [os.path.join(path, n) for n in (checkpoint.WEIGHTS_NAME, packed.PACKED_WEIGHTS_NAME)]
    found = [f for f in candidates if os.path.isfile(f)]
    if not found:
        raise VBLoRAError(f"{path}: no {checkpoint.WEIGHTS_NAME} or {packed.PACKED_WEIGHTS_NAME} found")
    if len(found) > 1:
        raise VBLoRAError(f"{path}: holds both {found[0]} and {found[1]}; remove the one that is not the adapter")
    return found[0]


PeftModel = VBLoRAModel


def get_peft_model(model: nn.Module, peft_config: VBLoRAConfig, adapter_name: str = "default") -> VBLoRAModel:
    """Wrap ``model`` with a new VB-LoRA adapter, as ``peft.get_peft_model`` does."""
    return VBLoRAModel(model, peft_config, adapter_name)
