"""What one adapter's injection may allocate, checked before it is allocated.

PEFT's config takes any sizes, and a VB-LoRA layer allocates ``r x (in + out) / vector_length x num_vectors`` dense
logits (and the adapter one ``num_vectors x vector_length`` bank) the moment it is built: an edited
adapter_config.json made torch try to allocate 293 GB and fail with an allocator message naming nothing. Each
allocation is taken from a budget of the memory the machine has available when the injection starts; one that does
not fit is a VBLoRAError naming the config and the tensor, raised before anything of that size exists.
"""

from __future__ import annotations

import math
from typing import Optional

from ..errors import VBLoRAError

_MEMINFO = "/proc/meminfo"


def available_bytes() -> Optional[int]:
    """Memory the kernel says can be had without swapping out others (MemAvailable), plus free swap; None where
    /proc/meminfo cannot be read (then nothing is checked)."""
    try:
        with open(_MEMINFO) as fh:
            fields = dict(line.split(":", 1) for line in fh if ":" in line)
        return sum(int(fields[name].split()[0]) * 1024 for name in ("MemAvailable", "SwapFree") if name in fields)
    except (OSError, ValueError):
        return None


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} bytes"


class MemoryBudget:
    """The bytes one injection may still allocate; :meth:`take` refuses what does not fit."""

    def __init__(self, source: str, left: Optional[int] = None) -> None:
        self.source = source  # "config of adapter 'x'": what the error blames
        self.left = available_bytes() if left is None else left

    def take(self, what: str, shape: tuple[int, ...], itemsize: int = 4) -> None:
        if self.left is None:
            return
        nbytes = math.prod(shape) * itemsize
        if nbytes > self.left:
            raise VBLoRAError(
                f"{self.source}: {what} of shape {tuple(shape)} needs {_size(nbytes)}, more than the "
                f"{_size(self.left)} of memory this machine has left for the adapter"
            )
        self.left -= nbytes
