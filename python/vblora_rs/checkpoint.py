"""Adapter checkpoints in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys and dtypes are PEFT's in both modes. Full mode stores ``<module>.vblora_logits_A`` / ``_B``; top-K mode
(``save_only_topk_weights``) stores ``<module>.vblora_logits_A_topk_indices`` in the smallest integer dtype
PEFT picks for ``num_vectors`` and ``..._topk_weights`` with the first k-1 softmax weights (the last one is
1 minus their sum). Both store ``base_model.vblora_vector_bank``. Loading maps checkpoint keys back to model
keys, checks every tensor against the model, and only then writes into the parameters, so a bad file
leaves the model untouched.
"""

from __future__ import annotations

import os
import re
import tempfile
from typing import TYPE_CHECKING, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import ops
from .errors import VBLoRAError

if TYPE_CHECKING:
    from .model import VBLoRAModel

WEIGHTS_NAME = "adapter_model.safetensors"
BANK_KEY = "base_model.vblora_vector_bank"
TOPK_INDICES = "_topk_indices"
TOPK_WEIGHTS = "_topk_weights"


def indices_dtype(num_vectors: int) -> torch.dtype:
    """The integer dtype PEFT stores top-K indices in."""
    if num_vectors < 2**8:
        return torch.uint8
    if num_vectors < 2**15:
        return torch.int16
    if num_vectors < 2**31:
        return torch.int32
    return torch.int64


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


def _topk_encode(logits: torch.Tensor, k: int, num_vectors: int) -> tuple[torch.Tensor, torch.Tensor]:
    logits = logits.detach()
    if ops.native_ok(logits):
        idx, weights = ops.topk_softmax(logits, k)
        weights = weights.to(logits.dtype)
    else:
        top, idx = logits.topk(k)
        weights = torch.softmax(top, dim=-1)
    return idx.to(indices_dtype(num_vectors)), weights[..., :-1].contiguous()


def adapter_state_dict(model: VBLoRAModel, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The tensors PEFT would save for ``adapter_name``, under PEFT's keys."""
    config = model.peft_config[adapter_name]
    others = [a for a in model.peft_config if a != adapter_name]
    state = {k: v for k, v in model.state_dict().items() if not any(_belongs_to(k, o) for o in others)}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if "vblora_logits" in key and key.endswith(f".{adapter_name}"):
            ckpt = remove_adapter_name(key, adapter_name)
            if config.save_only_topk_weights:
                idx, weights = _topk_encode(value, config.topk, config.num_vectors)
                out[ckpt + TOPK_INDICES] = idx
                out[ckpt + TOPK_WEIGHTS] = weights
            else:
                out[ckpt] = value
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
    """safetensors refuses tensors that share memory (e.g. a modules_to_save bias saved under two keys with
    bias="all", as PEFT does): copy every repeat, keep the first as it is."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for key, value in tensors.items():
        ident = (value.untyped_storage().data_ptr(), value.storage_offset())
        out[key] = value.clone() if ident in seen and value.numel() else value
        seen.add(ident)
    return out


def save_adapter(model: VBLoRAModel, directory: Union[str, os.PathLike], adapter_name: str = "default") -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors``; each file appears whole or not at all."""
    os.makedirs(directory, exist_ok=True)
    tensors = adapter_state_dict(model, adapter_name)
    target = os.path.join(directory, WEIGHTS_NAME)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".adapter_model.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    config = model.peft_config[adapter_name]
    inference_mode = config.inference_mode
    config.inference_mode = True  # as PEFT writes it: a saved adapter loads for inference unless asked otherwise
    try:
        config.save_pretrained(directory)
    finally:
        config.inference_mode = inference_mode


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


def _decode_topk(
    path: str, key: str, indices: torch.Tensor, weights: torch.Tensor, num_vectors: int, topk: int
) -> torch.Tensor:
    """Dense logits from top-K indices and k-1 weights, with the very ops PEFT uses (bit-identical logits)."""
    if indices.dtype.is_floating_point or indices.dtype == torch.bool:
        raise VBLoRAError(f"{path}: tensor {key}{TOPK_INDICES} has dtype {indices.dtype}, expected an integer dtype")
    if not weights.dtype.is_floating_point:
        raise VBLoRAError(f"{path}: tensor {key}{TOPK_WEIGHTS} has dtype {weights.dtype}, expected a float dtype")
    if indices.shape[-1:] != (topk,) or weights.shape != (*indices.shape[:-1], topk - 1):
        raise VBLoRAError(
            f"{path}: tensors {key}{TOPK_INDICES} {tuple(indices.shape)} and {key}{TOPK_WEIGHTS} "
            f"{tuple(weights.shape)} do not hold topk={topk} entries per sub-vector"
        )
    idx = indices.to(torch.long)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= num_vectors):
        raise VBLoRAError(f"{path}: tensor {key}{TOPK_INDICES} holds indices outside [0, {num_vectors})")
    if not torch.isfinite(weights).all() or (weights < 0).any():
        raise VBLoRAError(f"{path}: tensor {key}{TOPK_WEIGHTS} holds NaN, infinite or negative weights")
    full = torch.cat([weights, 1 - weights.sum(-1, keepdim=True)], dim=-1)
    if (full[..., -1] < -1e-6).any():
        raise VBLoRAError(f"{path}: tensor {key}{TOPK_WEIGHTS} has weights summing above 1")
    logits = torch.log(full)
    return torch.zeros([*logits.shape[:-1], num_vectors]).fill_(float("-inf")).scatter(-1, idx, logits)


def load_adapter_weights(model: VBLoRAModel, tensors: dict[str, torch.Tensor], adapter_name: str, path: str) -> None:
    """Check ``tensors`` (a checkpoint of PEFT's layout) against the model, then copy them into ``adapter_name``."""
    config = model.peft_config[adapter_name]
    mapping = _checkpoint_to_model_keys(model, adapter_name)
    params = model.state_dict(keep_vars=True)
    tensors = dict(tensors)
    for key in [k for k in tensors if k.endswith(TOPK_INDICES)]:
        base = key[: -len(TOPK_INDICES)]
        if base + TOPK_WEIGHTS not in tensors:
            raise VBLoRAError(f"{path}: tensor {key} has no matching {base}{TOPK_WEIGHTS}")
        tensors[base] = _decode_topk(
            path, base, tensors.pop(key), tensors.pop(base + TOPK_WEIGHTS), config.num_vectors, config.topk
        )
    stray = [k for k in tensors if k.endswith(TOPK_WEIGHTS)]
    if stray:
        raise VBLoRAError(f"{path}: tensor {stray[0]} has no matching {TOPK_INDICES} tensor")

    plan: list[tuple[torch.Tensor, torch.Tensor]] = []
    for key, value in tensors.items():
        model_key = mapping.get(key)
        if model_key is None:
            raise VBLoRAError(f"{path}: tensor {key} matches no parameter of adapter {adapter_name!r} in this model")
        target = params[model_key]
        if tuple(value.shape) != tuple(target.shape):
            raise VBLoRAError(
                f"{path}: tensor {key} has shape {tuple(value.shape)}, the model expects {tuple(target.shape)}"
            )
        if value.dtype.is_floating_point != target.dtype.is_floating_point:
            raise VBLoRAError(f"{path}: tensor {key} has dtype {value.dtype}, the model expects {target.dtype}")
        plan.append((target, value))

    required = [BANK_KEY] + [
        remove_adapter_name(k, adapter_name) for k in params if "vblora_logits" in k and k.endswith(f".{adapter_name}")
    ]
    missing = [k for k in required if k not in tensors]
    if missing:
        raise VBLoRAError(
            f"{path}: missing tensor {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    with torch.no_grad():
        for target, value in plan:
            target.copy_(value)
