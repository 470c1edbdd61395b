"""FSDP2 shards where VB-LoRA needs whole tensors.

``fully_shard`` turns every parameter it manages into a DTensor holding this rank's slice; the whole tensor exists
only between the all-gather before a managed module's forward and the reshard after it (or after backward). The
training forward builds A and B inside that window from plain tensors. Anything that meets a shard instead (a
merge, ``get_delta_weight``, ``compact_`` or a save on the sharded model, or a bank whose owning module is never
called around the layers) would compute with one rank's slice: these checks turn that into a ``VBLoRAError``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..errors import VBLoRAError

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch < 2.4 has no FSDP2; a torch built without torch.distributed shards nothing
    DTensor = None


def is_shard(t: torch.Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def rank() -> int:
    """This process's rank in the default process group (0 without one)."""
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_fsdp_module(module: nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to ``module`` (FSDP2)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(module, FSDPModule)


def require_whole(tensors: Iterable[torch.Tensor], adapter: str, bank_dict: nn.Module, action: str) -> None:
    """Raise if any of an adapter's tensors (logits, bank) is an FSDP shard where ``action`` needs whole ones."""
    if not any(is_shard(t) for t in tensors):
        return
    if is_fsdp_module(bank_dict):
        raise VBLoRAError(
            f"rank {rank()}: adapter {adapter!r}: fully_shard was applied to the vector bank dict itself "
            "(base_model.vblora_vector_bank), which is never called, so its bank is still sharded when the layers "
            "use it; shard the decoder layers and then the PeftModel (the root), which owns the bank: "
            "vblora_rs.training.fsdp.fully_shard_model(model)"
        )
    raise VBLoRAError(
        f"rank {rank()}: adapter {adapter!r} is sharded by FSDP (DTensor shards) where {action} needs its whole "
        "tensors: this runs outside the sharded model's forward, or the module that fully_shard gave them to is "
        "not called around this layer. Gather first (vblora_rs.training.fsdp.save_pretrained, or "
        "torch.distributed.checkpoint.state_dict.get_model_state_dict with full_state_dict=True) and merge or "
        "compact the gathered adapter in one process"
    )


def refuse_sharded_state_dict(state_dict: dict[str, torch.Tensor], adapter: str) -> None:
    """A save of an FSDP-sharded model's own ``state_dict()``: every rank would write its slice to one folder."""
    sharded = [k for k, v in state_dict.items() if "vblora_" in k and is_shard(v)]
    if sharded:
        raise VBLoRAError(
            f"rank {rank()}: adapter {adapter!r} cannot be saved from this rank's FSDP shards ({sharded[0]} is a "
            "DTensor slice); call vblora_rs.training.fsdp.save_pretrained(model, directory) on every rank: it gathers "
            "the full tensors and writes on rank 0 only. No adapter file was written (PEFT may have written its "
            "model card, README.md, before asking for the tensors)"
        )
