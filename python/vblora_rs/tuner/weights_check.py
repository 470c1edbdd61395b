"""Checks of a VB-LoRA checkpoint's tensors against the model, run by the load hook before anything changes.

PEFT loads what matches and warns about the rest; a VB-LoRA checkpoint that does not fit (a shape, an index out
of the bank, a weight that is NaN, a missing layer, a non-finite bank) would give wrong outputs, so every such
problem raises :class:`~vblora_rs.VBLoRAError` naming the adapter and tensor, and the model is left as it was.
Checkpoint keys here are PEFT's, without the adapter name (``base_model.model.<module>.vblora_logits_A...``).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from ..convert import topk as topk_codec
from ..errors import VBLoRAError
from ..storage import finite, targets
from ..storage.names import BANK_KEY, MODEL_PREFIX, TOPK_INDICES, TOPK_WEIGHTS
from . import topk_table as compact

LOGITS = ("vblora_logits_A", "vblora_logits_B")


def checkpoint_of(adapter_name: str) -> str:
    """What checkpoint errors blame."""
    return f"checkpoint of adapter {adapter_name!r}"


def is_topk_checkpoint(state_dict: dict[str, torch.Tensor]) -> bool:
    return any(k.endswith((TOPK_INDICES, TOPK_WEIGHTS)) for k in state_dict)


def take_topk_parts(
    layers: list[tuple[str, Any]], config: Any, state_dict: dict[str, torch.Tensor], adapter_name: str
) -> Optional[tuple[compact.TopKTable, list[int]]]:
    """Pop the top-K tensors of every layer of ``adapter_name`` out of ``state_dict`` and check them; returns the
    table holding their ``(indices, weights)`` (A then B per layer) with each matrix's first row, or None for a
    checkpoint without top-K tensors. Values are checked on the whole table at once, then tensor by tensor only
    to name the one at fault."""
    if not is_topk_checkpoint(state_dict):
        return None
    where = checkpoint_of(adapter_name)
    parts: list[tuple[torch.Tensor, torch.Tensor]] = []
    keys: list[str] = []
    for name, layer in layers:
        for key, grid in zip(LOGITS, layer.topk_grids(adapter_name)):
            ckpt = f"{MODEL_PREFIX}{name}.{key}"
            if ckpt in state_dict:
                raise VBLoRAError(f"{where}: tensor {ckpt} holds dense logits in a top-K checkpoint")
            missing = [ckpt + s for s in (TOPK_INDICES, TOPK_WEIGHTS) if ckpt + s not in state_dict]
            if missing:
                raise VBLoRAError(f"{where}: missing tensor {missing[0]}")
            idx, w = state_dict.pop(ckpt + TOPK_INDICES), state_dict.pop(ckpt + TOPK_WEIGHTS)
            if tuple(idx.shape[:-1]) != grid:
                raise VBLoRAError(
                    f"{where}: tensor {ckpt}{TOPK_INDICES} has shape {tuple(idx.shape)}, the model expects "
                    f"{(*grid, config.topk)}"
                )
            topk_codec.check_layout(where, ckpt, idx, w, config.topk)
            if parts and w.dtype != parts[0][1].dtype:
                raise VBLoRAError(
                    f"{where}: tensor {ckpt}{TOPK_WEIGHTS} has dtype {w.dtype}, the others {parts[0][1].dtype}"
                )
            keys.append(ckpt)
            parts.append((idx, w))
    stray = [k for k in state_dict if k.endswith((TOPK_INDICES, TOPK_WEIGHTS))]
    if stray:
        raise _stray(where, stray[0], config, adapter_name)
    for key, (idx, w) in zip(keys, parts):  # before the table narrows them to PEFT's dtype (which would wrap)
        if topk_codec.index_problem(idx, config.num_vectors):
            topk_codec.check_stored(where, key, idx, w, config.num_vectors, config.topk)
    table, starts = compact.table_from_layers(parts, config.num_vectors, config.topk)
    if topk_codec.value_problem(table.indices, table.weights, config.num_vectors):
        for key, (idx, w) in zip(keys, parts):  # name the tensor at fault
            topk_codec.check_stored(where, key, idx, w, config.num_vectors, config.topk)
    return table, starts


def _check_shape(where: str, key: str, value: torch.Tensor, shape: tuple[int, ...]) -> None:
    if not isinstance(value, torch.Tensor):
        raise VBLoRAError(f"{where}: entry {key} is a {type(value).__name__}, not a tensor")
    if not value.dtype.is_floating_point:
        raise VBLoRAError(f"{where}: tensor {key} has dtype {value.dtype}, expected a float dtype")
    if tuple(value.shape) != tuple(shape):
        raise VBLoRAError(f"{where}: tensor {key} has shape {tuple(value.shape)}, the model expects {tuple(shape)}")


def _numpy(value: torch.Tensor) -> np.ndarray:
    t = value.detach().cpu()
    return (t.float() if t.dtype in (torch.bfloat16, torch.float16) else t).numpy()


def _bank_problem(bank: torch.Tensor) -> str:
    """The one finiteness rule for a bank (storage.finite), checked in blocks first: a mask of the whole bank
    would add to the peak memory of a load."""
    if bank.is_meta:
        return ""
    rows = bank.detach().reshape(bank.shape[0], -1)
    step = max(1, (1 << 16) // max(rows.shape[1], 1))
    if all(np.isfinite(_numpy(rows[i : i + step])).all() for i in range(0, rows.shape[0], step)):
        return ""
    return finite.bank_problem(_numpy(bank))


def check_dense_and_bank(
    layers: list[tuple[str, Any]], config: Any, state_dict: dict[str, torch.Tensor], adapter_name: str, dense: bool
) -> None:
    """The bank (present, ``(num_vectors, vector_length)``, finite) and, for a ``dense`` checkpoint, every layer's
    logits (present, the layer's shape, no NaN or +inf: ``-inf`` is what PEFT writes outside the top-K)."""
    where = checkpoint_of(adapter_name)
    bank = state_dict.get(BANK_KEY)
    if bank is None:
        raise VBLoRAError(f"{where}: missing tensor {BANK_KEY}")
    _check_shape(where, BANK_KEY, bank, (config.num_vectors, config.vector_length))
    problem = _bank_problem(bank)
    if problem:
        raise VBLoRAError(f"{where}: tensor {BANK_KEY} {problem}")
    for name, layer in layers if dense else []:
        if layer.is_compact(adapter_name):
            continue
        for key in LOGITS:
            ckpt = f"{MODEL_PREFIX}{name}.{key}"
            value = state_dict.get(ckpt)
            if value is None:
                raise VBLoRAError(f"{where}: missing tensor {ckpt}")
            _check_shape(where, ckpt, value, tuple(layer._modules[key]._parameters[adapter_name].shape))
            problem = "" if value.is_meta else finite.logits_problem(_numpy(value))
            if problem:
                raise VBLoRAError(f"{where}: tensor {ckpt}: {problem}")
    known = {f"{MODEL_PREFIX}{name}.{key}" for name, _ in layers for key in LOGITS}
    stray = [k for k in state_dict if "vblora_logits" in k and k not in known]
    if stray:
        raise _stray(where, stray[0], config, adapter_name)


def _stray(where: str, key: str, config: Any, adapter_name: str) -> VBLoRAError:
    """The error for a checkpoint tensor of no VB-LoRA layer: when THE target rule (storage.targets, which
    ``vblora merge`` applies too) leaves its module out, say which config field does."""
    module = key[len(MODEL_PREFIX) :] if key.startswith(MODEL_PREFIX) else key
    module = module.split(".vblora_logits_")[0]
    fields = vars(config)
    if targets.targets_named(fields) and targets.module_status(fields, module) != targets.TARGETED:
        return VBLoRAError(
            f"{where}: tensor {key} matches no VB-LoRA module of adapter {adapter_name!r}: module {module} is in the "
            f"file but the config does not target it: {targets.untargeted_reason(fields, module)}"
        )
    return VBLoRAError(f"{where}: tensor {key} matches no VB-LoRA module of adapter {adapter_name!r}")
