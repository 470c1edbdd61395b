"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for PEFT models with vblora_rs's VB-LoRA.

Every VB-LoRA layer builds A and B from one vector bank per adapter, owned by the tuner
(``base_model.vblora_vector_bank``) and held, not registered, by the layers (see ``tuner.shared_bank``). So the plain
FSDP2 recipe works as it does for LoRA::

    for layer in model.base_model.model.model.layers:   # each decoder layer: its base weights and logits
        fully_shard(layer)
    fully_shard(model)                                  # the PeftModel: embeddings, head, and the bank

The root's group owns the bank: it is gathered once before the forward, stays whole through the backward (FSDP2
does not reshard the root after forward), collects the gradient of every layer through autograd, and is
reduce-scattered over the ranks once. This module adds what the recipe leaves to the user:

- :func:`fully_shard_model`: that recipe, decoder layers found from transformers' ``_no_split_modules``;
- :func:`check_sharding`: the bank is sharded by a module whose forward encloses every layer (not left out with
  ``ignored_params``, not given a group of its own); named ``VBLoRAError`` otherwise;
- :func:`save_pretrained`: PEFT's adapter folder from the sharded model, gathered and written on rank 0 only.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from ..errors import VBLoRAError
from ..tuner import bnb_weights
from ..tuner.model import VBLoRAModel
from ..tuner.sharding import is_fsdp_module, is_shard, rank


def _tuners(model: nn.Module) -> list[tuple[str, VBLoRAModel]]:
    """``(qualified name, tuner)`` of every vblora_rs tuner in ``model`` (a PeftModel, or a module holding one)."""
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, VBLoRAModel)]
    if not found:
        raise VBLoRAError(
            f"{type(model).__name__} holds no vblora_rs VB-LoRA tuner (build it with vblora_rs.apply_to_peft() "
            "applied, e.g. vblora_rs.get_peft_model)"
        )
    return found


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of ``model``'s base model: modules whose class transformers names in
    ``_no_split_modules`` (``LlamaDecoderLayer``...), outermost first."""
    names: set[str] = set()
    for _, tuner in _tuners(model):
        names.update(getattr(tuner.model, "_no_split_modules", None) or ())
    if not names:
        raise VBLoRAError(
            f"{type(model).__name__}: the base model names no decoder layer classes (_no_split_modules); "
            "pass layers=[...] to fully_shard_model"
        )
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    return [m for m in blocks if not any(other is not m and _contains(other, m) for other in blocks)]


def _contains(outer: nn.Module, inner: nn.Module) -> bool:
    return any(m is inner for m in outer.modules())


def fully_shard_model(model: nn.Module, layers: Optional[Iterable[nn.Module]] = None, **fsdp_kwargs: Any) -> nn.Module:
    """Shard a PEFT model with VB-LoRA adapters with FSDP2, the banks kept shared.

    ``fully_shard`` each decoder layer (or each of ``layers``), then ``model`` itself (the root, which owns the
    banks), then :func:`check_sharding`.

    Args:
        model: the PeftModel (every rank builds the same).
        layers: the modules to shard one by one (default: the decoder layers, :func:`decoder_layers`).
        **fsdp_kwargs: passed to every ``fully_shard`` call (``mesh``, ``reshard_after_forward``, ``mp_policy``...).

    Returns:
        ``model``, now an ``FSDPModule``.

    Raises:
        VBLoRAError: naming the module and rank (a bitsandbytes layer, no layers to shard, a bank sharded apart).
    """
    from torch.distributed.fsdp import fully_shard

    blocks = list(layers) if layers is not None else decoder_layers(model)
    if not blocks:
        raise VBLoRAError(f"{type(model).__name__}: no layers to shard")
    refuse_quantized(model)  # before anything is sharded
    for block in blocks:
        fully_shard(block, **fsdp_kwargs)
    fully_shard(model, **fsdp_kwargs)
    check_sharding(model)
    return model


def refuse_quantized(model: nn.Module) -> None:
    """FSDP2 cannot shard bitsandbytes layers: it swaps their packed weight for a DTensor without the quantization
    state, and bitsandbytes then computes with wrong weights without a word. Raise ``VBLoRAError`` naming the first
    such module."""
    for name, module in model.named_modules():
        kind = bnb_weights.kind_of(module)
        if kind is not None:
            raise VBLoRAError(
                f"rank {rank()}: module {name!r} is a bitsandbytes {kind} layer: FSDP2 (fully_shard) over a "
                "quantized base is not supported (the sharded weight loses its quantization state and bitsandbytes "
                "would compute with wrong weights); train on a quantized base in one process per model copy (DDP)"
            )


def check_sharding(model: nn.Module) -> None:
    """Raise ``VBLoRAError`` naming the module when FSDP2 shards a bank in a way that breaks sharing:

    - ``fully_shard`` on the bank dict itself: that module is never called, so the layers would meet its shards;
    - a bank left whole (``ignored_params``, or no ``fully_shard`` on a module above the tuner) while the model is
      sharded: its gradient would not be reduced over the ranks and the ranks' banks would drift apart;
    - a bitsandbytes quantized layer in a sharded model (see :func:`refuse_quantized`).

    Call it between steps (in a forward the root holds its parameters gathered)."""
    sharded_model = any(is_fsdp_module(m) for m in model.modules())
    if sharded_model:
        refuse_quantized(model)
    for name, tuner in _tuners(model):
        bank_dict = tuner.vblora_vector_bank
        where = f"{name}.vblora_vector_bank" if name else "vblora_vector_bank"
        if is_fsdp_module(bank_dict):
            raise VBLoRAError(
                f"rank {rank()}: fully_shard was applied to {where}, the bank dict itself: it is never called, so "
                "every layer would meet its shards; shard the decoder layers and then the root (the PeftModel), "
                "which owns the bank: vblora_rs.training.fsdp.fully_shard_model(model)"
            )
        if not sharded_model:
            continue
        for adapter, bank in bank_dict.items():
            if not is_shard(bank):
                raise VBLoRAError(
                    f"rank {rank()}: the bank {where}.{adapter} is not sharded by any fully_shard group while the "
                    "model is (left out with ignored_params, or no fully_shard on the PeftModel after its layers): "
                    "its gradient would not be reduced over the ranks; call fully_shard(model) on the root, or "
                    "vblora_rs.training.fsdp.fully_shard_model(model)"
                )


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's full (unsharded) state dict on rank 0's CPU, ``{}`` on the other ranks. Collective: every rank
    must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_pretrained(model: nn.Module, save_directory: str, **kwargs: Any) -> None:
    """PEFT's ``save_pretrained`` for a model sharded with FSDP2. Collective: call it on every rank.

    The full tensors are gathered to rank 0's CPU and written there only (PEFT's files, PEFT's keys;
    ``save_only_topk_weights`` adapters in top-K form). Without a process group it is PEFT's ``save_pretrained``.

    Args:
        model: the sharded PeftModel.
        save_directory: the folder PEFT writes.
        **kwargs: other keywords of PEFT's ``save_pretrained`` (not ``state_dict`` or ``is_main_process``).

    Raises:
        VBLoRAError: on every rank when rank 0's write failed, naming the cause.
    """
    for reserved in ("state_dict", "is_main_process"):
        if reserved in kwargs:
            raise VBLoRAError(f"save_pretrained: {reserved!r} is set by vblora_rs.training.fsdp.save_pretrained")
    if not (dist.is_available() and dist.is_initialized()):
        model.save_pretrained(save_directory, **kwargs)
        return
    check_sharding(model)
    state = full_state_dict(model)
    failure: list[Optional[str]] = [None]
    if dist.get_rank() == 0:
        try:
            model.save_pretrained(save_directory, state_dict=state, is_main_process=True, **kwargs)
        except Exception as exc:  # every rank must hear of it, or the others would go on as if it were saved
            failure[0] = f"{type(exc).__name__}: {exc}"
            dist.broadcast_object_list(failure, src=0)
            raise
    dist.broadcast_object_list(failure, src=0)
    if failure[0] is not None:
        raise VBLoRAError(
            f"rank {dist.get_rank()}: rank 0 could not save the adapter to {save_directory}: {failure[0]}"
        )
