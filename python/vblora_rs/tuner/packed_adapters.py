"""Packed adapter files (``adapter_packed.safetensors``, see ``docs/packed-format.md``) to and from PEFT models.

PEFT reads and writes its own ``adapter_model.safetensors``; the packed single file is ours, so it has its own two
calls. Both go through PEFT's state-dict functions, so the tensors are exactly those of PEFT's top-K checkpoint and
loading takes the same checks and compact form as ``PeftModel.from_pretrained``.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from typing import Any, Optional, Union

import peft
import torch
from peft import MODEL_TYPE_TO_PEFT_MODEL_MAPPING
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

from ..convert import packed
from ..errors import VBLoRAError
from ..storage.adapter_config import AdapterConfig
from ..storage.locate import PACKED, locate
from ..storage.names import PACKED_WEIGHTS_NAME, WEIGHTS_NAME
from ..storage.packed_arrays import check_modules_known
from .peft_backend import apply_to_peft


def _half_dtype(half: Union[bool, torch.dtype, None]) -> Optional[torch.dtype]:
    if half is True:
        return torch.float16
    if half is False or half is None:
        return None
    if half in (torch.float16, torch.bfloat16):
        return half  # type: ignore[return-value]
    raise ValueError(f"half must be a bool, torch.float16 or torch.bfloat16, got {half!r}")


def _file_config(config: Any) -> AdapterConfig:
    """PEFT's config as the torch-free config the packed file stores."""
    data = config.to_dict()
    return AdapterConfig.from_dict(data, source="the adapter's config")


def _peft_config(stored: AdapterConfig) -> peft.VBLoRAConfig:
    """The torch-free config read from a packed file as PEFT's VBLoRAConfig."""
    names = {f.name for f in dataclasses.fields(peft.VBLoRAConfig)}
    return peft.VBLoRAConfig(**{k: v for k, v in stored.to_dict().items() if k in names and k != "peft_type"})


def save_packed(
    model: nn.Module,
    save_directory: Union[str, os.PathLike],
    adapter_name: str = "default",
    half: Union[bool, torch.dtype] = False,
) -> Optional[packed.PackReport]:
    """Save one adapter of a PeftModel as a packed file: top-K indices bit-packed, lossless unless ``half``.

    Args:
        model: a PeftModel holding VB-LoRA adapter ``adapter_name`` (full logits or compact).
        save_directory: the folder to write ``adapter_config.json`` + ``adapter_packed.safetensors`` into; a PEFT
            weights file already there is removed, so the folder holds one adapter.
        adapter_name: the adapter to save.
        half: ``True`` (float16) or ``torch.bfloat16`` stores the bank and the weights in half precision.

    Returns:
        With ``half``, the report of the error half precision costs per layer; else None.

    Raises:
        VBLoRAError: the adapter cannot be packed (naming the tensor); ValueError: an unknown adapter name.
    """
    half_dtype = _half_dtype(half)
    if adapter_name not in model.peft_config:
        raise ValueError(f"Adapter {adapter_name!r} not found in {sorted(model.peft_config)}")
    directory = os.fspath(save_directory)
    if os.path.isfile(directory):
        raise VBLoRAError(f"{directory}: is a file, expected a directory")
    config = model.peft_config[adapter_name]
    keep = config.save_only_topk_weights
    config.save_only_topk_weights = True  # PEFT's own top-K tensors are what the file packs
    try:
        tensors = get_peft_model_state_dict(model, adapter_name=adapter_name)
        stored = copy.deepcopy(config)
    finally:
        config.save_only_topk_weights = keep
    stored.inference_mode = True  # as PEFT writes it: a saved adapter loads for inference unless asked otherwise
    os.makedirs(directory, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    report = packed.write_packed(
        os.path.join(directory, PACKED_WEIGHTS_NAME), tensors, _file_config(stored), half_dtype
    )
    stored.save_pretrained(directory)
    stale = os.path.join(directory, WEIGHTS_NAME)
    if os.path.isfile(stale):
        os.unlink(stale)
    return report if half_dtype is not None else None


def _module_paths(model: nn.Module) -> list[str]:
    """Paths of the modules of ``model`` as a packed file names them (relative to the base model of a
    PeftModel)."""
    base = model.get_base_model() if isinstance(model, peft.PeftModel) else model
    return [name for name, _ in base.named_modules() if name]


def packed_file_of(path: Union[str, os.PathLike]) -> str:
    """The packed file of ``path`` (the file itself, or the one in the folder), by the one adapter locator."""
    located = locate(path)
    if located.kind != PACKED:
        raise VBLoRAError(
            f"{os.fspath(path)}: holds PEFT's adapter files, not a packed adapter: load it with "
            "PeftModel.from_pretrained(model, path) (and a packed folder with load_packed, never from_pretrained, "
            "which takes it for a Hub repo id)"
        )
    return located.weights_path


def load_packed(
    model: nn.Module,
    path: Union[str, os.PathLike],
    adapter_name: str = "default",
    is_trainable: bool = False,
) -> peft.PeftModel:
    """Load a packed adapter onto a model, in compact form; everything is checked before the model changes.

    Args:
        model: a base model (a new PeftModel of the config's task type is built around it) or a PeftModel
            (``adapter_name`` is added to it, as ``load_adapter`` does).
        path: a folder holding ``adapter_packed.safetensors``, or the file itself. (PEFT's
            ``PeftModel.from_pretrained`` reads PEFT's folders, not packed files.)
        adapter_name: the name the adapter gets.
        is_trainable: load it for training (the compact form cannot train: PEFT's error then).

    Returns:
        The PeftModel holding the adapter.

    Raises:
        VBLoRAError: naming the file and tensor or module at fault.
    """
    apply_to_peft()
    file = packed_file_of(path)
    # the modules table against the model's modules, from the header alone: a small file can list a million
    # modules, and nothing per module (tensors, PEFT's layers) is built for one the model lacks
    check_modules_known(file, _module_paths(model), "the model")
    stored, tensors = packed.read_packed(file)
    config = _peft_config(stored)
    config.inference_mode = not is_trainable
    if isinstance(model, peft.PeftModel):
        if adapter_name in model.peft_config:
            raise ValueError(f"Adapter {adapter_name!r} already exists")
        model.add_adapter(adapter_name, config)
        try:
            set_peft_model_state_dict(model, tensors, adapter_name=adapter_name)
        except Exception:
            model.delete_adapter(adapter_name)
            raise
        if not is_trainable:
            model.eval()
        return model
    cls = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(config.task_type, peft.PeftModel) if config.task_type else peft.PeftModel
    wrapped = cls(model, config, adapter_name)
    try:
        set_peft_model_state_dict(wrapped, tensors, adapter_name=adapter_name)
    except Exception:
        wrapped.base_model.unload()  # hand the user's model back as it was
        raise
    if not is_trainable:
        wrapped.eval()
    return wrapped
