"""Cached A and B of no-grad forwards.

PEFT rebuilds A and B (top-K, softmax, gather) on every forward, even under no_grad: for GPT-2 small that is
most of VB-LoRA's decoding overhead. A layer keeps the A and B of its most recently used adapters while no
gradient flows to them, stamped with the tensors they come from; any change of those tensors (optimizer step,
load_state_dict's copy_, in-place edits, .to(), a new Parameter) makes the stamp stale.

Fused and foreach optimizers (``AdamW(fused=True)``, transformers' default ``adamw_torch_fused``) write the
parameters in place without bumping their version counters, so every entry also records how many optimizer
steps the process had taken (one global post-step hook on ``torch.optim.Optimizer``): any step invalidates it.
"""

from __future__ import annotations

import weakref
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

_lora_cache_size = 32
_optimizer_steps = 0


def _count_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


register_optimizer_step_post_hook(_count_step)


def optimizer_steps() -> int:
    """Optimizer steps taken in this process so far (any optimizer, any parameters)."""
    return _optimizer_steps


def set_lora_cache_size(n: int) -> None:
    """Set how many adapters' A and B each layer keeps for no-grad forwards (least recently used dropped first).

    Args:
        n: entries per layer (each holds ``r * (in + out)`` values); 0 turns caching off.

    Raises:
        ValueError: ``n`` is not a non-negative int.
    """
    global _lora_cache_size
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"the cache size must be a non-negative int, got {n!r}")
    _lora_cache_size = n


def get_lora_cache_size() -> int:
    """Returns how many adapters' A and B each layer keeps (see :func:`set_lora_cache_size`)."""
    return _lora_cache_size


def stamp(t: torch.Tensor) -> tuple[Any, int, int]:
    # The storage itself (its Python object is kept alive with the tensor's storage, and dies with it), the
    # version counter (bumped by every in-place op, copy_ included) and the address (views, offsets). The storage
    # is what catches `param.data = new` twice in a row (`.half().float()`), where the address may repeat and the
    # version does not change.
    return weakref.ref(t.untyped_storage()), t._version, t.data_ptr()


def _same(stamp: tuple[Any, int, int], t: torch.Tensor) -> bool:
    return stamp[0]() is t.untyped_storage() and stamp[1] == t._version and stamp[2] == t.data_ptr()


class CachedLoRA(NamedTuple):
    sources: tuple[tuple[Any, int, int], ...]
    extra: Any  # what else A and B depend on (a compact adapter's first row)
    inference: bool  # made under inference_mode: such tensors cannot be saved for backward outside of it
    steps: int  # optimizer_steps() when made
    A: torch.Tensor
    B: torch.Tensor

    def valid(self, sources: tuple[torch.Tensor, ...], extra: Any) -> bool:
        if self.extra != extra or len(self.sources) != len(sources) or self.steps != _optimizer_steps:
            return False
        if self.inference and torch.is_grad_enabled() and not torch.is_inference_mode_enabled():
            return False
        return all(_same(s, t) for s, t in zip(self.sources, sources))


def param_of(holder: nn.ParameterDict, key: str) -> torch.Tensor:
    """``holder[key]`` without nn.Module's attribute lookup, which costs microseconds per call, per layer and
    forward; anything unusual (e.g. LogitsDict building a compact adapter's logits) takes the public path."""
    value = holder._parameters.get(key)
    return value if value is not None else holder[key]


def evict(cache: dict[str, CachedLoRA], keep: int) -> None:
    """Drop the oldest entries until at most ``keep`` remain. Forwards may run in several threads at once (the
    kernels release the GIL), so an entry may vanish under us: every step tolerates that."""
    while len(cache) > max(keep, 0):
        try:
            cache.pop(next(iter(cache)), None)
        except (StopIteration, RuntimeError):  # emptied, or resized by another thread mid-iteration
            return
