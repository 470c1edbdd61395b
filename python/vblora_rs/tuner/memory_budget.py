"""What one adapter's injection may allocate, checked before it is allocated.

PEFT's config takes any sizes, and a VB-LoRA layer allocates ``r x (in + out) / vector_length x num_vectors`` dense
logits (and the adapter one ``num_vectors x vector_length`` bank) the moment it is built: an edited
adapter_config.json made torch try to allocate 293 GB and fail with an allocator message naming nothing. Each
allocation is taken from a budget of the memory the machine has available when the injection starts; one that does
not fit is a VBLoRAError naming the config and the tensor, raised before anything of that size exists.
"""

from __future__ import annotations

import math
import os
from typing import Optional

from ..errors import VBLoRAError

_MEMINFO = "/proc/meminfo"
_PROC_STATUS = "/proc/self/status"
_PROC_CGROUP = "/proc/self/cgroup"
_CGROUP_ROOT = "/sys/fs/cgroup"
# a cgroup v1 "no limit" is a huge number (PAGE_COUNTER_MAX pages in bytes), not "max" as in v2
_UNLIMITED = 2**62


def _machine_bytes() -> Optional[int]:
    """MemAvailable plus free swap, or None where /proc/meminfo cannot be read."""
    try:
        with open(_MEMINFO) as fh:
            fields = dict(line.split(":", 1) for line in fh if ":" in line)
        return sum(int(fields[name].split()[0]) * 1024 for name in ("MemAvailable", "SwapFree") if name in fields)
    except (OSError, ValueError):
        return None


def _read_int(path: str) -> Optional[int]:
    try:
        with open(path) as fh:
            text = fh.read().strip()
    except OSError:
        return None
    if text == "max" or not text.isdigit():
        return None
    value = int(text)
    return None if value >= _UNLIMITED else value


def _address_space_bytes() -> Optional[int]:
    """Room under ``ulimit -v`` (RLIMIT_AS, soft): the limit less the process's address space (VmSize)."""
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    except (ImportError, OSError, ValueError):
        return None
    if limit == resource.RLIM_INFINITY or limit < 0:
        return None
    try:
        with open(_PROC_STATUS) as fh:
            size = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmSize:"))
    except (OSError, ValueError, StopIteration):
        return None
    return max(0, limit - size)


def _cgroup_bytes() -> Optional[int]:
    """Room under the memory limit of this process's cgroup and its parents (v2 ``memory.max`` less
    ``memory.current``, v1 ``memory.limit_in_bytes`` less ``memory.usage_in_bytes``), the tightest; None without
    a limit. Containers set these: a load beyond them is killed or fails in torch's allocator."""
    try:
        with open(_PROC_CGROUP) as fh:
            lines = [line.rstrip("\n").split(":", 2) for line in fh if line.count(":") >= 2]
    except OSError:
        return None
    rooms = []
    for _, controllers, path in lines:
        if controllers == "":
            root, files = _CGROUP_ROOT, ("memory.max", "memory.current")
        elif "memory" in controllers.split(","):
            root, files = os.path.join(_CGROUP_ROOT, "memory"), ("memory.limit_in_bytes", "memory.usage_in_bytes")
        else:
            continue
        folder = os.path.normpath(os.path.join(root, path.lstrip("/")))
        while folder.startswith(root):
            limit, used = _read_int(os.path.join(folder, files[0])), _read_int(os.path.join(folder, files[1]))
            if limit is not None and used is not None:
                rooms.append(max(0, limit - used))
            if folder == root:
                break
            folder = os.path.dirname(folder)
    return min(rooms) if rooms else None


def available_bytes() -> Optional[int]:
    """What an allocation may take: the least of the machine's MemAvailable plus free swap, the room under
    ``ulimit -v`` and the room under the cgroup's memory limit; None where none of them can be read (then nothing
    is checked)."""
    known = [b for b in (_machine_bytes(), _address_space_bytes(), _cgroup_bytes()) if b is not None]
    return min(known) if known else None


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
                f"{_size(self.left)} of memory left for the adapter (the machine's, under ulimit -v and the "
                "cgroup's limit)"
            )
        self.left -= nbytes
