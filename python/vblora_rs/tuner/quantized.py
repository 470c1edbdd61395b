"""VB-LoRA over bitsandbytes quantized layers: ``Linear4bit`` (NF4 / FP4, QLoRA's base) and ``Linear8bitLt``.

Training and inference need nothing new: the forward is the base layer's own (bitsandbytes dequantizes as it
multiplies) plus the adapter term, exactly as over ``nn.Linear``. What differs is merging, since the weight holds
codes, not values:

- merge: the weight is read in float32, every adapter being merged (and any merged before) is added in float32 in
  one pass, and the sum is quantized once with the layer's own settings. The quantized weight from before the
  first merge is kept (it is the size of the quantized layer), so later merges start again from it: a merged
  weight is within one quantization step of (original + all merged deltas), however many merges led there.
- unmerge: the kept weight is put back as it was, bit for bit (PEFT's LoRA subtracts the delta from the merged,
  quantized weight and quantizes again, which drifts). If the weight was replaced since the merge (a
  ``load_state_dict``), the deltas are subtracted from it in float32 and it is quantized again.
- a merged weight that is not finite is refused whether or not ``safe_merge`` is asked for (one non-finite value
  would spoil the scale of its whole block or row); nothing is written then.

Layers whose weights bitsandbytes has not quantized (built in float and not moved to a device yet, or 8-bit with
``has_fp16_weights=True``) merge as plain ``nn.Linear`` layers do.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from .. import ops
from ..errors import VBLoRAError
from . import bnb_weights
from .layer import Linear
from .sharding import rank

SUPPORTED = "bitsandbytes Linear4bit (NF4, FP4) and Linear8bitLt"
# PEFT's LoRA warns in the same case; each merged layer is within one quantization step of the exact sum, but
# rounding a whole layer again can change what the model generates. One text per kind, so Python shows it once.
MERGE_WARNING = (
    "Merge VB-LoRA module to {kind} linear may get different generations due to rounding errors (the whole "
    "layer is quantized again). For a merged model that answers as the adapter does, merge into the "
    "full-precision base: `vblora merge BASE ADAPTER -o OUT`, or merge_and_unload on the base loaded in float, "
    "then quantize the result"
)


class QuantizedLinear(Linear):
    """VB-LoRA over a bitsandbytes layer; merges quantize again (see the module's docstring)."""

    def __init__(self, base_layer: nn.Module, *args: Any, **kwargs: Any) -> None:
        super().__init__(base_layer, *args, **kwargs)
        # (quantized weight before the first merge, the weight that merge installed); None while unmerged
        self._pre_merge: Optional[tuple[bnb_weights.Snapshot, bnb_weights.Snapshot]] = None

    @property
    def pre_merge_weight(self) -> Optional[bnb_weights.Snapshot]:
        """The quantized weight ``unmerge`` puts back (None while nothing is merged into a quantized weight)."""
        return None if self._pre_merge is None else self._pre_merge[0]

    def _quantized_base(self) -> Optional[nn.Module]:
        base = self.get_base_layer()
        return base if bnb_weights.is_quantized(base) else None

    def _merged_weight(self, original: torch.Tensor, adapters: list[str], scale: float) -> torch.Tensor:
        """``original + scale * sum(delta)`` over ``adapters`` in float32, in place; one Rust pass on CPU."""
        if not adapters:
            return original
        if ops.native_ok(original) and all(self._native_merge_ok(a) for a in adapters):
            return ops.merge_(original, self._merge_terms(adapters, scale), self.fan_in_fan_out)
        with torch.no_grad():
            for adapter in adapters:
                original += scale * self.get_delta_weight(adapter).to(original.device, torch.float32)
        return original

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Merge the active adapters (or ``adapter_names``) into the quantized weight: one float32 sum, one
        quantization. A non-finite result raises ValueError and leaves the weight as it was."""
        base = self._quantized_base()
        if base is None:
            super().merge(safe_merge=safe_merge, adapter_names=adapter_names)
            return
        adapters = [a for a in check_adapters_to_merge(self, adapter_names) if self.has_adapter(a)]
        if not adapters:
            return
        kind = bnb_weights.kind_of(base)
        warnings.warn(MERGE_WARNING.format(kind=kind.replace("bit", "-bit") if kind else "quantized"), stacklevel=2)
        earlier = [a for a in self.merged_adapters if self.has_adapter(a)]
        if self._pre_merge is not None and bnb_weights.is_installed(base, self._pre_merge[1]):
            original = self._pre_merge[0]
        else:
            original = bnb_weights.snapshot(base)  # first merge: the weight as it is
            if earlier:  # merged, but the weight was replaced since: take the earlier adapters out first
                unmerged = self._merged_weight(bnb_weights.dequantize(original), earlier[::-1], -1.0)
                if not torch.isfinite(unmerged).all():
                    raise ValueError(f"unmerging {','.join(earlier)} gives non-finite weights")
                original = bnb_weights.quantize(base, unmerged)
        merged = self._merged_weight(bnb_weights.dequantize(original), earlier + adapters, 1.0)
        if not torch.isfinite(merged).all():
            names = ",".join(adapters)
            raise ValueError(f"NaNs detected in the merged weights. The adapter {names} seems to be broken")
        new = bnb_weights.quantize(base, merged)
        bnb_weights.install(base, new)
        self._pre_merge = (original, new)
        self.merged_adapters.extend(adapters)

    def unmerge(self) -> None:
        """Put back the quantized weight from before the first merge, bit for bit."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        base = self._quantized_base()
        pre_merge = self._pre_merge
        if base is None:
            self._pre_merge = None
            super().unmerge()
            return
        adapters = [a for a in reversed(self.merged_adapters) if self.has_adapter(a)]
        if pre_merge is not None and bnb_weights.is_installed(base, pre_merge[1]):
            bnb_weights.install(base, pre_merge[0])
        else:  # the weight was replaced while merged: subtract what was merged and quantize again
            weight = self._merged_weight(bnb_weights.dequantize(bnb_weights.snapshot(base)), adapters, -1.0)
            if not torch.isfinite(weight).all():
                raise ValueError(f"unmerging {','.join(adapters)} gives non-finite weights")
            bnb_weights.install(base, bnb_weights.quantize(base, weight))
        self._pre_merge = None
        self.merged_adapters = []

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        base = self.get_base_layer()
        if bnb_weights.lost_quantization(base):
            raise VBLoRAError(
                f"rank {rank()}: the bitsandbytes {bnb_weights.kind_of(base)} layer under this VB-LoRA layer "
                f"({self.in_features} -> {self.out_features}) holds a {type(base.weight).__name__} weight without its "
                "quantization state: FSDP's fully_shard over a quantized base is not supported (bitsandbytes would "
                "compute with wrong weights); train on a quantized base in one process per model copy (DDP)"
            )
        return super().forward(x, *args, **kwargs)


class Linear4bit(QuantizedLinear):
    """VB-LoRA over ``bnb.nn.Linear4bit`` (NF4 or FP4, with or without double quantization)."""


class Linear8bitLt(QuantizedLinear):
    """VB-LoRA over ``bnb.nn.Linear8bitLt`` (LLM.int8())."""


LAYER_CLASSES: dict[str, type[QuantizedLinear]] = {"4bit": Linear4bit, "8bit": Linear8bitLt}


def layer_class_for(base: nn.Module) -> Optional[type[QuantizedLinear]]:
    """Our layer class for a quantized base layer; None for a float layer. Raises TypeError for a layer whose
    weight is quantized in a way we cannot merge into (anything but bitsandbytes 4-bit and 8-bit)."""
    kind = bnb_weights.kind_of(base)
    if kind is not None:
        return LAYER_CLASSES[kind]
    weight = getattr(base, "weight", None)
    if isinstance(weight, torch.Tensor) and (
        not weight.dtype.is_floating_point or weight.dtype.itemsize < 2  # integer codes, float8
    ):
        cls = type(base)
        raise TypeError(
            f"{cls.__module__}.{cls.__qualname__} holds its weight as {weight.dtype} (quantized); VB-LoRA supports "
            f"these quantized layers: {SUPPORTED}"
        )
    return None
