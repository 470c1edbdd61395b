"""bitsandbytes quantized weights, as a VB-LoRA merge needs them: read in float32, quantized again with the
layer's own settings, kept and put back unchanged, and the size of one quantization step.

Two kinds of layers (``kind_of``):

* ``"4bit"``: ``bnb.nn.Linear4bit`` (NF4 or FP4, any block size, with or without double quantization of the block
  scales, any ``quant_storage``). A weight is ``code[i] * absmax[block]`` with ``code`` the 16 values of the data
  type and one ``absmax`` per block of ``blocksize`` consecutive elements (row-major); with double quantization
  the block scales are themselves 8-bit values. On CPUs with AVX512-BF16, bitsandbytes' first no-grad inference
  forward repacks the weight into a CPU layout (bfloat16 scales, ``packing_format_for_cpu``); both layouts are read.
* ``"8bit"``: ``bnb.nn.Linear8bitLt`` holding int8 weights (LLM.int8()): a weight is ``CB[row, j] * SCB[row] / 127``.

bitsandbytes is imported only when a layer comes from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from ..errors import VBLoRAError

INT8_LEVELS = 127  # LLM.int8() maps the row absmax to 127


def _bnb() -> Any:
    import bitsandbytes

    return bitsandbytes


def kind_of(module: nn.Module) -> Optional[str]:
    """``"4bit"`` for a bitsandbytes ``Linear4bit``, ``"8bit"`` for a ``Linear8bitLt``, else None."""
    if not type(module).__module__.startswith("bitsandbytes"):
        return None  # no import of bitsandbytes for the layers of a plain model
    bnb = _bnb()
    if isinstance(module, bnb.nn.Linear4bit):
        return "4bit"
    if isinstance(module, bnb.nn.Linear8bitLt):
        return "8bit"
    return None


def is_quantized(module: nn.Module) -> bool:
    """Whether the weight of a bitsandbytes layer holds quantized values (a layer built in float and not moved to a
    device yet, or an 8-bit layer with ``has_fp16_weights=True``, holds float weights)."""
    kind = kind_of(module)
    weight = module.weight
    if kind == "4bit":
        return bool(getattr(weight, "bnb_quantized", False)) and _quant_state(module) is not None
    if kind == "8bit":
        return weight.dtype == torch.int8
    return False


def lost_quantization(module: nn.Module) -> bool:
    """Whether a bitsandbytes layer's weight is no longer bitsandbytes' own parameter: FSDP2 (``fully_shard``)
    swaps in its sharded DTensor, and around a forward the gathered plain tensor, neither carrying the quantization
    state, and bitsandbytes then computes with wrong weights without a word (measured: two ranks fed the same
    batch disagreed with each other and with one process)."""
    kind = kind_of(module)
    if kind is None:
        return False
    bnb = _bnb()
    return not isinstance(module.weight, bnb.nn.Params4bit if kind == "4bit" else bnb.nn.Int8Params)


# --- snapshots: what a quantized weight is made of ---------------------------------------------------------------


@dataclass
class Snapshot4bit:
    data: torch.Tensor  # packed codes, in the layer's storage dtype (or the CPU layout)
    state: Any  # bitsandbytes QuantState: block scales (maybe 8-bit themselves), data type, shape, dtype


@dataclass
class Snapshot8bit:
    CB: torch.Tensor  # int8 (out, in)
    SCB: torch.Tensor  # float32 (out,): each row's absmax


Snapshot = Any  # Snapshot4bit | Snapshot8bit (py39: no `|` between classes at run time)


def _quant_state(module: nn.Module) -> Any:
    # the weight's own state; bitsandbytes keeps a copy on the module for parameters that lost it (FSDP)
    state = getattr(module.weight, "quant_state", None)
    return state if state is not None else getattr(module, "quant_state", None)


def snapshot(module: nn.Module) -> Snapshot:
    """The quantized weight of ``module`` as it is now (references, not copies: merging replaces these objects
    instead of writing into them)."""
    if kind_of(module) == "4bit":
        return Snapshot4bit(module.weight.data, _quant_state(module))
    state = module.state
    SCB = state.SCB if state.SCB is not None else module.weight.SCB
    if SCB is None:
        raise VBLoRAError(f"{type(module).__name__}: int8 weight without its row scales (SCB)")
    return Snapshot8bit(module.weight.data, SCB)


def install(module: nn.Module, snap: Snapshot) -> None:
    """Make ``snap`` the weight of ``module`` (moved to the weight's device), everywhere bitsandbytes looks."""
    device = module.weight.device
    weight = module.weight
    if isinstance(snap, Snapshot4bit):
        if snap.state.absmax.device != device:
            snap.state.to(device)
        weight.data = snap.data.to(device)
        weight.quant_state = snap.state
        if hasattr(module, "quant_state"):
            module.quant_state = snap.state
        return
    CB, SCB = snap.CB.to(device), snap.SCB.to(device)
    weight.data = CB
    # before its first forward the layer reads weight.CB / weight.SCB; after it, state.CB / state.SCB
    if getattr(weight, "CB", None) is not None:
        weight.CB = CB
    if getattr(weight, "SCB", None) is not None:
        weight.SCB = SCB
    state = module.state
    if state.CB is not None:
        state.CB = CB
    if state.SCB is not None:
        state.SCB = SCB
    if weight.CB is None and state.CB is None:  # neither holds it yet: where the layer will look first
        weight.CB, weight.SCB = CB, SCB


def is_installed(module: nn.Module, snap: Snapshot) -> bool:
    """Whether ``module``'s weight is still the one ``snap`` installed (a later forward may have moved a 4-bit
    weight into the CPU layout in place, which keeps its state object)."""
    if isinstance(snap, Snapshot4bit):
        return _quant_state(module) is snap.state
    data = module.weight.data
    return data.dtype == torch.int8 and data.untyped_storage().data_ptr() == snap.CB.untyped_storage().data_ptr()


# --- float32 values --------------------------------------------------------------------------------------------


def _block_absmax(state: Any) -> torch.Tensor:
    """Float32 scale of every 4-bit block, in block order (row-major over the weight)."""
    if getattr(state, "packing_format_for_cpu", False):
        return state.absmax.T.reshape(-1).float()  # stored (in/blocksize, out) in bfloat16
    absmax = state.absmax
    if state.nested:
        absmax = _bnb().functional.dequantize_blockwise(absmax, state.state2).float() + state.offset
    return absmax.float()


def _codes_cpu_layout(data: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Code index (0..15) of every element, from bitsandbytes' CPU layout: rows in groups of 32, column pairs
    interleaved, the first 16 rows of a group in the low nibbles and the last 16 in the high ones."""
    out_features, in_features = shape
    packed = data.reshape(-1, 32)
    nibbles = torch.cat([packed & 0xF, packed >> 4], dim=-1)  # (groups * in/2, 64): rows 0..31 of a group, x2
    nibbles = nibbles.reshape(out_features // 32, in_features // 2, 32, 2).transpose(1, 2)
    return nibbles.reshape(out_features, in_features).long()


def _codes(data: torch.Tensor, state: Any) -> torch.Tensor:
    """Code index of every element, (out, in)."""
    if getattr(state, "packing_format_for_cpu", False):
        return _codes_cpu_layout(data.view(torch.uint8), state.shape)
    flat = data.reshape(-1).view(torch.uint8)
    codes = torch.stack([flat >> 4, flat & 0xF], dim=-1).reshape(-1)  # first element in the high nibble
    return codes[: state.shape.numel()].reshape(state.shape).long()


def dequantize(snap: Snapshot) -> torch.Tensor:
    """The weight ``snap`` holds, in float32 (exactly the values the layer computes with, before any rounding to
    its compute dtype)."""
    if isinstance(snap, Snapshot8bit):
        return snap.CB.float() * (snap.SCB.float() / INT8_LEVELS).unsqueeze(1)
    state = snap.state
    codes = _codes(snap.data, state)
    values = state.code.float().to(codes.device)[codes]
    blocks = _block_absmax(state).to(codes.device)
    per_element = blocks.repeat_interleave(state.blocksize)[: values.numel()].reshape(values.shape)
    return values * per_element


def quantize(module: nn.Module, weight: torch.Tensor) -> Snapshot:
    """``weight`` (float32, the layer's shape) quantized with ``module``'s own settings: for 4-bit its data type,
    block size, double quantization and storage dtype (the standard layout; bitsandbytes repacks it for the CPU
    when it wants), for 8-bit LLM.int8()'s row-wise quantization from float16, as bitsandbytes quantizes."""
    functional = _bnb().functional
    if kind_of(module) == "4bit":
        param = module.weight
        old = _quant_state(module)
        dtype = getattr(old, "original_dtype", None) if getattr(old, "packing_format_for_cpu", False) else None
        data, state = functional.quantize_4bit(
            weight.float().contiguous(),
            blocksize=param.blocksize,
            compress_statistics=param.compress_statistics,
            quant_type=param.quant_type,
            quant_storage=param.quant_storage,
        )
        state.dtype = dtype or old.dtype  # dequantize to the layer's dtype, as before
        return Snapshot4bit(data, state)
    half = weight.to(torch.float16)
    if not torch.isfinite(half).all():
        raise ValueError("a merged weight overflows float16, the dtype LLM.int8() quantizes from")
    CB, SCB, _ = functional.int8_vectorwise_quant(half.contiguous())
    return Snapshot8bit(CB, SCB)


def quantization_step(module: nn.Module) -> torch.Tensor:
    """One quantization step of every weight of ``module`` (float32, the weight's shape): for 4-bit the largest gap
    between adjacent values of the data type times the block's scale (the distance between two neighbouring
    representable values can be no larger), for 8-bit the row's scale / 127 (the gap between adjacent int8 levels).
    Rounding to nearest leaves a weight within half a step of the value quantized."""
    return step_of(snapshot(module))


def step_of(snap: Snapshot) -> torch.Tensor:
    """:func:`quantization_step` of a quantized weight held in ``snap``."""
    if isinstance(snap, Snapshot8bit):
        return (snap.SCB.float() / INT8_LEVELS).unsqueeze(1).expand(snap.CB.shape).contiguous()
    state = snap.state
    gap = float(state.code.float().sort().values.diff().max())
    blocks = _block_absmax(state)
    numel = state.shape.numel()
    return (gap * blocks).repeat_interleave(state.blocksize)[:numel].reshape(state.shape)
