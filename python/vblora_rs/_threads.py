"""Run the Rust kernels on torch's own OpenMP threads.

After each parallel torch op, libgomp's idle workers spin for a few milliseconds before sleeping. A kernel on
separate threads started in that window shares the cores with the spinners (on 2 cores a merge right after a
``copy_`` took 7-9 ms instead of 4.4 ms); on torch's team the spinning workers take the work. So when torch's
parallel backend is OpenMP, the kernels bind to the runtime torch loaded, found among the libraries mapped into
this process. ``VBLORA_RS_THREADS=rayon`` keeps the crate's own rayon pools (as without torch, e.g. in the
torch-free ``vblora merge``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

import torch

from . import _native
from .errors import VBLoRAError

# GNU libgomp, LLVM libomp, Intel libiomp5; wheels may rename them with a hash (libgomp-a34b3233.so.1).
_OPENMP_NAME = re.compile(r"^lib(gomp|omp|iomp5)([-.].*)?\.(so|dylib)(\..*)?$")


def _loaded_libraries() -> list[str]:
    """Paths of the shared libraries mapped into this process (Linux /proc; empty elsewhere)."""
    try:
        text = Path("/proc/self/maps").read_text()
    except OSError:
        return []
    fields = (line.split(maxsplit=5) for line in text.splitlines())
    return list(dict.fromkeys(f[5].strip() for f in fields if len(f) == 6 and f[5].startswith("/")))


def torch_openmp_library() -> Optional[str]:
    """The OpenMP runtime torch's CPU ops run on, if its parallel backend is OpenMP and the library can be
    found: one shipped in torch's package (``torch/lib``, ``torch.libs``), else the only one loaded."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    runtimes = [p for p in _loaded_libraries() if _OPENMP_NAME.match(os.path.basename(p))]
    torch_dir = Path(torch.__file__).resolve().parent
    shipped = [p for p in runtimes if Path(p).parent in (torch_dir / "lib", torch_dir.parent / "torch.libs")]
    if shipped:
        return shipped[0]
    return runtimes[0] if len(runtimes) == 1 else None


def bind_torch_threads() -> str:
    """Bind the kernels to torch's OpenMP team where possible; returns the backend now in use."""
    if os.environ.get("VBLORA_RS_THREADS", "").lower() != "rayon":
        path = torch_openmp_library()
        if path is not None:
            try:
                _native.use_openmp(path)
            except VBLoRAError:
                pass  # e.g. a runtime without GOMP_parallel: the rayon pools are as correct, only slower here
    return _native.thread_backend()
