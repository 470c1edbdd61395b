"""Adapter checkpoints in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys and dtypes are PEFT's in both modes. Full mode stores ``<module>.vblora_logits_A`` / ``_B``; top-K mode
(``save_only_topk_weights``) stores ``<module>.vblora_logits_A_topk_indices`` in the smallest integer dtype
PEFT picks for ``num_vectors`` and ``..._topk_weights`` with the first k-1 softmax weights (the last one is
1 minus their sum). Both store ``base_model.vblora_vector_bank``. Loading maps checkpoint keys back to model
keys, checks every tensor against the model, and only then writes into the parameters, so a bad file
leaves the model untouched. A top-K checkpoint loads in compact form (see :mod:`vblora_rs.compact`): no dense
logits are built.
"""

from __future__ import annotations

import copy
import os
import re
import tempfile
from typing import TYPE_CHECKING, Any, Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import compact
from .compact import TOPK_INDICES, TOPK_WEIGHTS
from .config import WEIGHTS_NAME
from .errors import VBLoRAError

if TYPE_CHECKING:
    from .model import VBLoRAModel
    from .packed import PackReport

BANK_KEY = "base_model.vblora_vector_bank"
MODEL_PREFIX = "base_model.model."
indices_dtype = compact.indices_dtype


def remove_adapter_name(key: str, adapter_name: str) -> str:
    """Model state-dict key -> checkpoint key (PEFT's rule): drop the adapter name where it names a parameter
    (``...vblora_logits_A.default``) or a module (``...modules_to_save.default.weight``)."""
    if "." not in key:
        return key
    if key.endswith(f".{adapter_name}"):
        return key.removesuffix(f".{adapter_name}")
    head, _, suffix = key.rpartition(".")
    head = re.sub(re.escape(f".{adapter_name}") + r"$", "", head)
    return f"{head}.{suffix}"


def _belongs_to(key: str, adapter_name: str) -> bool:
    return f".{adapter_name}." in key or key.endswith(f".{adapter_name}")


def _modules_to_save_prefixes(model: VBLoRAModel) -> list[str]:
    from .modules_to_save import ModulesToSaveWrapper

    return [name for name, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)]


def _checkpoint_to_model_keys(model: VBLoRAModel, adapter_name: str) -> dict[str, str]:
    """Every checkpoint key this adapter may hold, mapped to the model state-dict key it loads into."""
    others = [a for a in model.peft_config if a != adapter_name]
    mapping: dict[str, str] = {}
    for key in model.state_dict(keep_vars=True):
        if any(_belongs_to(key, o) for o in others):
            continue
        mapping.setdefault(remove_adapter_name(key, adapter_name), key)
    for prefix in _modules_to_save_prefixes(model):
        marker = f"{prefix}.modules_to_save.{adapter_name}."
        for key in list(mapping.values()):
            if key.startswith(marker):
                mapping[f"{prefix}.{key[len(marker) :]}"] = key
    return mapping


# --- saving -----------------------------------------------------------------------------------------


def _compact_layer_tensors(model: VBLoRAModel, adapter_name: str, topk_form: bool) -> dict[str, torch.Tensor]:
    """Checkpoint tensors of the layers holding ``adapter_name`` in compact form: the stored top-K tensors as
    they are, or (full mode) the dense logits PEFT would hold."""
    out: dict[str, torch.Tensor] = {}
    for name, layer in model.base_model.vblora_layers():
        if not layer.is_compact(adapter_name):
            continue
        idx_A, w_A, idx_B, w_B = layer.stored_topk(adapter_name)
        num_vectors = layer.vblora_topk[adapter_name].num_vectors
        for key, idx, w in (("vblora_logits_A", idx_A, w_A), ("vblora_logits_B", idx_B, w_B)):
            ckpt = f"{MODEL_PREFIX}{name}.{key}"
            if topk_form:
                out[ckpt + TOPK_INDICES] = idx.to(indices_dtype(num_vectors))
                out[ckpt + TOPK_WEIGHTS] = w
            else:
                out[ckpt] = compact.dense_logits(idx, w, num_vectors)
    return out


def adapter_state_dict(
    model: VBLoRAModel, adapter_name: str = "default", topk: Optional[bool] = None
) -> dict[str, torch.Tensor]:
    """The tensors PEFT would save for ``adapter_name``, under PEFT's keys; top-K form if ``topk`` (default: as
    the adapter's ``save_only_topk_weights`` says)."""
    config = copy.copy(model.peft_config[adapter_name])
    if topk is not None:
        config.save_only_topk_weights = topk
    others = [a for a in model.peft_config if a != adapter_name]
    state = {k: v for k, v in model.state_dict().items() if not any(_belongs_to(k, o) for o in others)}
    out: dict[str, torch.Tensor] = {}
    logits = {
        remove_adapter_name(key, adapter_name): value
        for key, value in state.items()
        if "vblora_logits" in key and key.endswith(f".{adapter_name}")
    }
    if config.save_only_topk_weights:
        encoded = compact.encode_many(list(logits.values()), config.topk, config.num_vectors)
        for ckpt, (idx, weights) in zip(logits, encoded):
            out[ckpt + TOPK_INDICES] = idx
            out[ckpt + TOPK_WEIGHTS] = weights
    else:
        out.update(logits)
    out.update(_compact_layer_tensors(model, adapter_name, config.save_only_topk_weights))
    out[BANK_KEY] = state[f"{BANK_KEY}.{adapter_name}"]
    if config.bias == "all":
        out.update({remove_adapter_name(k, adapter_name): v for k, v in state.items() if k.endswith(".bias")})
    elif config.bias == "vblora_only":
        for name, _ in model.base_model.vblora_layers():
            key = f"base_model.model.{name}.base_layer.bias"
            if key in state:
                out[key] = state[key]
    for prefix in _modules_to_save_prefixes(model):
        marker = f"{prefix}.modules_to_save.{adapter_name}."
        out.update({f"{prefix}.{k[len(marker) :]}": v for k, v in state.items() if k.startswith(marker)})
    return _unaliased({k: v.detach().cpu().contiguous() for k, v in out.items()})


def _unaliased(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (a modules_to_save bias saved under two keys with
    bias="all", as PEFT does; top-K tensors of several layers encoded together): copy every tensor whose storage
    another one already uses, keep the first as it is."""
    seen: set[int] = set()
    out = {}
    for key, value in tensors.items():
        storage = value.untyped_storage().data_ptr()
        out[key] = value.clone() if storage in seen and value.numel() else value
        seen.add(storage)
    return out


def save_adapter(
    model: VBLoRAModel,
    directory: Union[str, os.PathLike],
    adapter_name: str = "default",
    format: str = "peft",
    half: Optional[torch.dtype] = None,
) -> Optional[PackReport]:
    """Write ``adapter_config.json`` and the weights: PEFT's ``adapter_model.safetensors`` (``format="peft"``)
    or the packed single file (``format="packed"``, top-K; ``half`` stores bank and weights in float16 or
    bfloat16 and returns the report of the error that costs). Each file appears whole or not at all; the
    other format's weights file, if the folder had one, is removed so the folder holds one adapter."""
    from . import packed

    if format not in ("peft", "packed"):
        raise ValueError(f"format must be 'peft' or 'packed', got {format!r}")
    if half is not None and format != "packed":
        raise ValueError("half precision storage needs format='packed'")
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    config = copy.deepcopy(model.peft_config[adapter_name])
    config.inference_mode = True  # as PEFT writes it: a saved adapter loads for inference unless asked otherwise
    report = None
    if format == "packed":
        config.save_only_topk_weights = True
        tensors = adapter_state_dict(model, adapter_name, topk=True)
        report = packed.write_packed(os.path.join(directory, packed.PACKED_WEIGHTS_NAME), tensors, config, half)
        stale = os.path.join(directory, WEIGHTS_NAME)
    else:
        write_safetensors_atomically(adapter_state_dict(model, adapter_name), os.path.join(directory, WEIGHTS_NAME))
        stale = os.path.join(directory, packed.PACKED_WEIGHTS_NAME)
    config.save_pretrained(directory)
    if os.path.isfile(stale):
        os.unlink(stale)
    return report


def write_safetensors_atomically(tensors: dict[str, torch.Tensor], target: str) -> None:
    """``tensors`` saved to ``target`` via a temporary file in the same folder: whole or not at all."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(target)), prefix=".adapter_model.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# --- loading ----------------------------------------------------------------------------------------


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; a damaged file raises VBLoRAError naming it."""
    try:
        with safe_open(path, framework="pt") as fh:
            return {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except FileNotFoundError as exc:
        raise VBLoRAError(f"{path}: file not found") from exc
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise VBLoRAError(f"{path}: not a readable safetensors file: {exc}") from exc


def is_topk_checkpoint(tensors: dict[str, torch.Tensor]) -> bool:
    return any(k.endswith((TOPK_INDICES, TOPK_WEIGHTS)) for k in tensors)


def _take_topk_parts(
    model: VBLoRAModel, tensors: dict[str, torch.Tensor], adapter_name: str, path: str
) -> tuple[list[tuple[str, Any]], tuple[compact.TopKTable, list[int]]]:
    """Pop the top-K tensors of every layer of ``adapter_name`` out of ``tensors`` and check them; returns the
    layers and the table holding their ``(indices, weights)`` (A then B per layer) with each layer's first row.
    Values are checked on the whole table at once, then tensor by tensor only to name the one at fault."""
    config = model.peft_config[adapter_name]
    layers = [(n, layer) for n, layer in model.base_model.vblora_layers() if adapter_name in layer.r]
    parts: list[tuple[torch.Tensor, torch.Tensor]] = []
    keys: list[str] = []
    for name, layer in layers:
        for key, grid in zip(("vblora_logits_A", "vblora_logits_B"), layer.topk_grids(adapter_name)):
            ckpt = f"{MODEL_PREFIX}{name}.{key}"
            if ckpt in tensors:
                raise VBLoRAError(f"{path}: tensor {ckpt} holds dense logits in a top-K checkpoint")
            missing = [ckpt + s for s in (TOPK_INDICES, TOPK_WEIGHTS) if ckpt + s not in tensors]
            if missing:
                raise VBLoRAError(f"{path}: missing tensor {missing[0]}")
            idx, w = tensors.pop(ckpt + TOPK_INDICES), tensors.pop(ckpt + TOPK_WEIGHTS)
            if tuple(idx.shape[:-1]) != grid:
                raise VBLoRAError(
                    f"{path}: tensor {ckpt}{TOPK_INDICES} has shape {tuple(idx.shape)}, the model expects "
                    f"{(*grid, config.topk)}"
                )
            compact.check_layout(path, ckpt, idx, w, config.topk)
            keys.append(ckpt)
            if parts and w.dtype != parts[0][1].dtype:
                raise VBLoRAError(
                    f"{path}: tensor {ckpt}{TOPK_WEIGHTS} has dtype {w.dtype}, the others {parts[0][1].dtype}"
                )
            parts.append((idx, w))
    stray = [k for k in tensors if k.endswith((TOPK_INDICES, TOPK_WEIGHTS))]
    if stray:
        raise VBLoRAError(f"{path}: tensor {stray[0]} matches no VB-LoRA module of adapter {adapter_name!r}")
    for key, (idx, w) in zip(keys, parts):  # before the table narrows them to PEFT's dtype (which would wrap)
        if compact.index_problem(idx, config.num_vectors):
            compact.check_stored(path, key, idx, w, config.num_vectors, config.topk)
    table, starts = compact.table_from_layers(parts, config.num_vectors, config.topk)
    if compact.value_problem(table.indices, table.weights, config.num_vectors):
        for key, (idx, w) in zip(keys, parts):  # name the tensor at fault
            compact.check_stored(path, key, idx, w, config.num_vectors, config.topk)
    return layers, (table, starts)


def _planned_copy(path: str, key: str, value: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if tuple(value.shape) != tuple(target.shape):
        raise VBLoRAError(
            f"{path}: tensor {key} has shape {tuple(value.shape)}, the model expects {tuple(target.shape)}"
        )
    if value.dtype.is_floating_point != target.dtype.is_floating_point:
        raise VBLoRAError(f"{path}: tensor {key} has dtype {value.dtype}, the model expects {target.dtype}")
    return target, value


def load_adapter_weights(model: VBLoRAModel, tensors: dict[str, torch.Tensor], adapter_name: str, path: str) -> None:
    """Check ``tensors`` (a checkpoint of PEFT's layout) against the model, then copy them into ``adapter_name``
    (top-K tensors: into a compact table, see :mod:`vblora_rs.compact`)."""
    tensors = dict(tensors)
    topk_layers: list[tuple[str, Any]] = []
    topk_parts: Optional[tuple[compact.TopKTable, list[int]]] = None
    if is_topk_checkpoint(tensors):
        topk_layers, topk_parts = _take_topk_parts(model, tensors, adapter_name, path)
    if BANK_KEY not in tensors:
        raise VBLoRAError(f"{path}: missing tensor {BANK_KEY}")
    plan = [_planned_copy(path, BANK_KEY, tensors.pop(BANK_KEY), model.base_model.vblora_vector_bank[adapter_name])]

    if tensors or not topk_layers:
        # Dense logits, biases, modules_to_save: found through the state dict (skipped for a bare top-K
        # checkpoint, whose cost would otherwise grow with the number of adapters already loaded).
        mapping = _checkpoint_to_model_keys(model, adapter_name)
        params = model.state_dict(keep_vars=True)
        for key, value in tensors.items():
            model_key = mapping.get(key)
            if model_key is None:
                raise VBLoRAError(
                    f"{path}: tensor {key} matches no parameter of adapter {adapter_name!r} in this model"
                )
            plan.append(_planned_copy(path, key, value, params[model_key]))
        required = [
            remove_adapter_name(k, adapter_name)
            for k in params
            if "vblora_logits" in k and k.endswith(f".{adapter_name}")
        ]
        missing = [k for k in required if k not in tensors]
        if missing:
            raise VBLoRAError(
                f"{path}: missing tensor {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            )
    with torch.no_grad():
        for target, value in plan:
            target.copy_(value)
    if topk_parts is not None:
        model.base_model.set_compact_adapter(adapter_name, topk_layers, *topk_parts)
