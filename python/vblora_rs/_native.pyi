"""Type stub for the private Rust extension ``vblora_rs._native``.

Conventions shared by every function:

* Arrays are C-contiguous numpy views of torch CPU tensors (``tensor.numpy()``), never copies.
* Floating arrays may be float32, float16, or uint16; uint16 always means the raw bits of
  bfloat16 (torch's ``tensor.view(torch.uint16)``), because numpy has no bfloat16.
* ``num_threads``: how many threads the kernel may use; 0 means all cores.
* The GIL is released while a kernel runs. Bad input raises :class:`VBLoRAError` (a
  ``ValueError``) whose message names the argument and, for data errors, the row at fault.
* A failure of the operating system while reading or writing a file (missing file, permission,
  full disk, name too long) raises ``OSError(errno, strerror, filename)``, which Python makes the
  matching subclass (``FileNotFoundError``, ``PermissionError``, ...), never ``VBLoRAError``.

Checked against the built module by ``python -m mypy.stubtest vblora_rs._native`` (``make lint``).
"""

import os
from collections.abc import Callable, Mapping
from typing import TypeAlias

import numpy as np
import numpy.typing as npt

__all__ = [
    "__version__",
    "TORCH_SOFTMAX_MAX_K",
    "VBLoRAError",
    "load_numpy_api",
    "topk_softmax",
    "topk_many",
    "low_rank_from_logits",
    "low_rank_from_topk",
    "rank_update_",
    "low_rank_product",
    "simd_level",
    "simd_levels",
    "topk_prefetch",
    "use_openmp",
    "thread_backend",
    "encode_packed",
    "decode_packed",
    "unpack_packed",
    "packed_modules_outside",
    "index_bits",
    "safetensors_header",
    "adapter_shapes",
    "adapter_factors",
    "packed_adapter_shapes",
    "packed_adapter_factors",
    "check_topk_rows",
    "merge_safetensors",
]

__version__: str
# The largest k whose weights :func:`topk_softmax` / :func:`topk_many` compute as torch's softmax kernel does
# (``vblora_rs.ops`` still compares them with torch.softmax once per process before it trusts them).
TORCH_SOFTMAX_MAX_K: int

# Stub-only: the float dtypes every "float array" argument accepts (uint16 = bfloat16 bits).
_FloatArray: TypeAlias = npt.NDArray[np.float32] | npt.NDArray[np.float16] | npt.NDArray[np.uint16]

class VBLoRAError(ValueError): ...

def load_numpy_api() -> None:
    """Load NumPy's C API now (it is otherwise loaded on first use, where an interruption cannot be reported):
    a failure raises here, a Ctrl-C as ``KeyboardInterrupt``."""

def topk_softmax(
    logits: _FloatArray, k: int, num_threads: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """Per row of a 2-D ``(rows, n)`` logits array: indices of the ``k`` largest logits, largest
    first, in exactly torch.topk's CPU order (ties included), and the float32 softmax of those
    ``k`` logits by the steps of torch's CPU kernel (SLEEF's ``expf_u10`` of ``x - max``, the sum left to
    right, times ``1 / sum``): torch's bits for ``k <= TORCH_SOFTMAX_MAX_K`` where torch's kernel is the
    AVX2 / AVX-512 one (an all ``-inf`` row gives NaN).
    Returns ``(indices (rows, k) int64, weights (rows, k) float32)``. A NaN logit is an error
    naming its row; ``k`` must satisfy ``1 <= k <= n``."""

def topk_many(
    logits: list[_FloatArray], k: int, kept_logits: bool, num_threads: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """:func:`topk_softmax` of several 2-D logits arrays of one dtype in one call (one hand-off to the thread
    pool): ``(indices (S, k), weights (S, k))`` over all their rows, in order; with ``kept_logits`` the second
    array holds the kept logits themselves (float32, exact) instead of their softmax. A NaN's row is counted
    across the arrays. Arrays of different dtypes are an error."""

def low_rank_from_logits(logits: _FloatArray, bank: _FloatArray, k: int, num_threads: int) -> npt.NDArray[np.float32]:
    """Fused top-k + softmax + weighted sum of bank rows: ``out[i] = sum_j w[i, j] *
    bank[idx[i, j]]`` for ``logits (rows, num_vectors)`` and ``bank (num_vectors, L)``, summing
    ``j`` in order ``0..k`` in float32. Returns ``(rows, L)`` float32. Nothing of size
    ``rows * num_vectors`` is allocated."""

def low_rank_from_topk(
    indices: npt.NDArray[np.int64],
    weights: npt.NDArray[np.float32],
    bank: _FloatArray,
    num_threads: int,
) -> npt.NDArray[np.float32]:
    """Like :func:`low_rank_from_logits` from precomputed ``indices (rows, k)`` and
    ``weights (rows, k)``. An index outside ``[0, num_vectors)`` is an error naming its row."""

def rank_update_(
    weight: _FloatArray,
    u: npt.NDArray[np.float32],
    v: npt.NDArray[np.float32],
    num_threads: int,
) -> None:
    """In place: ``weight[i, j] = round(float32(weight[i, j]) + delta[i, j])`` with
    ``delta[i, j] = sum_r u[i, r] * v[r, j]`` summed in float32 over ``r`` in order (each step a fused
    multiply-add unless :func:`simd_level` is ``"portable"``, as torch's ``u @ v`` on MKL; else multiply
    then add), rounded once (to nearest even) into the weight's dtype. ``weight (m, n)``, ``u (m, R)``, ``v (R, n)``.
    Several adapters merge in one pass by stacking their factors along ``R``."""

def low_rank_product(
    u: npt.NDArray[np.float32],
    v: npt.NDArray[np.float32],
    num_threads: int,
) -> npt.NDArray[np.float32]:
    """``u (m, R) @ v (R, n)`` as a new float32 ``(m, n)`` array, written once and never read: exactly
    the ``delta`` of :func:`rank_update_` (same order and rounding), so ``round(w + low_rank_product(u,
    v))`` equals what :func:`rank_update_` writes into ``w``. ``R = 0`` gives zeros."""

def simd_level() -> str:
    """The instruction set the kernels were dispatched to at run time: ``"avx512"`` (AVX-512 F/BW/VL),
    ``"avx2+fma"`` or ``"portable"`` (baseline SSE2/NEON build). ``VBLORA_RS_SIMD=portable|avx2|avx512``, read
    once per process, caps it (a level the CPU lacks gives the best one below it; other values are ignored).
    On ``"avx512"`` and ``"avx2+fma"`` each step of the float32 ``delta`` sum is one fused multiply-add, the
    same bits on both and torch's ``u @ v`` on MKL; the portable path multiplies then adds, which may differ
    from torch in the last bit."""

def simd_levels() -> list[str]:
    """Every level this CPU supports, lowest first (names as :func:`simd_level` gives them): what
    ``VBLORA_RS_SIMD`` can select."""

def topk_prefetch() -> tuple[str, str]:
    """Whether the top-k scan prefetches the row after next in this process, and how that was decided:
    ``(variant, how)`` with ``variant`` ``"on"``, ``"off"`` or ``"undecided"`` (no call large enough to measure
    yet: not prefetching) and ``how`` ``"VBLORA_RS_TOPK_PREFETCH"`` (the variable, read once, says ``on`` or
    ``off``), ``"measured"`` (the first call over 32 MiB of logits timed both on its first rows and kept the
    faster) or ``"auto"``. Both variants give the same bits; only the speed differs by CPU."""

def use_openmp(path: str) -> None:
    """Run the kernels on the thread team of the OpenMP runtime at ``path`` (a shared library already loaded in
    this process: torch's libgomp) from now on, in this process; a forked child falls back to rayon. Raises
    :class:`VBLoRAError` if the library is not loaded or has no ``GOMP_parallel``."""

def thread_backend() -> str:
    """Where the kernels' threads come from in this process: ``"openmp"`` (torch's team) or ``"rayon"``."""

# --- packed adapter format (rust/packed, rust/py/packed.rs) ---

def encode_packed(
    path: str,
    metadata: dict[str, str],
    modules: list[tuple[str, int, int, int]],
    indices: npt.NDArray[np.int64],
    weights: _FloatArray,
    bank: _FloatArray,
    extras: list[tuple[str, str, list[int], bytes]],
) -> int:
    """Write a packed adapter file (docs/packed-format.md) atomically; returns the bytes written.

    ``metadata`` must hold ``indices_dtype``, ``key_prefix`` and ``config``; the entries the encoder computes
    (``format``, ``vblora_packed``, ``num_vectors``, ``vector_length``, ``topk``, ``index_bits``, ``modules``) may be
    present only with the computed value. ``modules``: ``(path, r, in_sub, out_sub)`` in file order;
    ``indices (S, k)`` sub-vector-major (each module's A grid then its B grid, C order), every index in
    ``[0, num_vectors)``; ``weights (S, k-1)`` finite, ``>= 0``, each row summing to at most ``1 + 1e-6``;
    ``bank (num_vectors, L)`` finite. ``extras``: ``(name, safetensors dtype such as "F32"/"BF16"/"I64", shape,
    raw little-endian bytes)``. Errors name the argument and, for a bad index or weight row, its module and cell."""

def decode_packed(path: str) -> dict[str, object]:
    """Read and validate a packed adapter file. Returns a dict with ``metadata`` (dict[str, str], every entry),
    ``modules`` (list of ``(path, r, in_sub, out_sub)``), ``num_vectors``, ``vector_length``, ``topk``,
    ``index_bits`` (ints), ``indices`` (int64 ``(S, k)``), ``weights`` ``(S, k-1)`` and ``bank``
    ``(num_vectors, L)`` (float32, float16, or uint16 holding bfloat16 bits) with ``weights_dtype`` /
    ``bank_dtype`` ("float32", "float16", "bfloat16"), and ``extras`` (tuples as for :func:`encode_packed`, by name).
    Any damage (truncation, lying offsets, bad metadata, out-of-range index, NaN, ...) raises :class:`VBLoRAError`
    whose message starts with ``path`` and names the metadata field or tensor at fault."""

def unpack_packed(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> dict[str, object]:
    """Decode and validate the packed file ``src`` (as :func:`decode_packed`) and write PEFT's top-K checkpoint of it
    to ``dst`` (the caller's temporary file), straight from the flat arrays. A checkpoint whose header would exceed
    the 100 MB safetensors readers accept is refused (naming the module count) before anything is written. Returns
    ``metadata``, ``num_vectors``, ``vector_length``, ``topk``, ``modules`` (the count) and ``module_ranks``
    (``(path, r)`` of the first module of each distinct r)."""

def index_bits(num_vectors: int) -> int:
    """Bits per stored index of a packed file for ``num_vectors`` bank vectors: ``max(1, ceil(log2(num_vectors)))``,
    the encoder's own rule."""

def packed_modules_outside(path: str | os.PathLike[str], known: list[str]) -> tuple[int, int, str | None]:
    """``(listed, outside, first)`` from the header of a packed file alone: how many modules its table lists, how
    many are not in ``known``, and the first of those (None when all are known). A file whose header or modules
    table is bad raises :class:`VBLoRAError` naming it."""

# --- streaming safetensors merge (rust/stream, rust/py/stream.rs) ---

def safetensors_header(
    path: str | os.PathLike[str],
) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict[str, str] | None, int]:
    """The header of a safetensors file, read and validated without reading the data: ``({name: (dtype,
    shape)}, __metadata__ or None, bytes of data)``, tensors in data order, dtypes as safetensors names
    (``"F32"``, ``"BF16"``, ...). A damaged file raises :class:`VBLoRAError` naming it."""

def adapter_shapes(
    path: str | os.PathLike[str], topk: int, num_vectors: int, vector_length: int, num_threads: int
) -> dict[str, tuple[int, int, int]]:
    """``{module: (rank, fan_in, fan_out)}`` of a PEFT VB-LoRA ``adapter_model.safetensors`` after validating
    the whole file (shapes against the config, top-K rows by the one rule of ``check_topk_rows``, logits free
    of NaN and +inf, a finite bank, no stray tensors), in time and memory linear in the file; no factor is
    built. Errors name the file and tensor."""

def adapter_factors(
    path: str | os.PathLike[str],
    topk: int,
    num_vectors: int,
    vector_length: int,
    num_threads: int,
    modules: list[str] | None = None,
) -> dict[str, tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]]:
    """Low-rank factors of ``modules`` (every module when None) of a PEFT VB-LoRA ``adapter_model.safetensors``
    (full logits or top-K), keyed by the stored module path (``base_model.model.<module>``):
    ``(A (r, in), B (out, r))`` float32, so that PEFT's delta is ``B @ A``. Top-K rows are decoded as PEFT loads
    them (weights ``[w, 1 - sum(w)]``, their logs ordered largest first, softmax). The file is validated as by
    :func:`adapter_shapes`; check the shapes against the model first, since factors can be far larger than
    the file."""

def packed_adapter_shapes(
    path: str | os.PathLike[str], num_threads: int
) -> tuple[str, dict[str, tuple[int, int, int]]]:
    """Like :func:`adapter_shapes` for a packed adapter file: the ``adapter_config.json`` text the file carries,
    and ``{module: (rank, fan_in, fan_out)}``."""

def packed_adapter_factors(
    path: str | os.PathLike[str], num_threads: int, modules: list[str] | None = None
) -> tuple[str, dict[str, tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]]]:
    """Like :func:`adapter_factors` for a packed adapter file (``adapter_packed.safetensors``, fully checked by
    the packed decoder): the ``adapter_config.json`` text the file carries, and ``{module: (A, B)}``."""

def check_topk_rows(
    indices: npt.NDArray[np.int64], weights: npt.NDArray[np.float32], num_vectors: int
) -> tuple[int, str, str] | None:
    """The first bad row of stored top-K ``indices (rows, k)`` and ``weights (rows, k - 1)`` (C-contiguous)
    as ``(row, "indices" | "weights", reason)``, or None: every index in ``[0, num_vectors)``, none repeated
    within a row, every weight finite and >= 0, a row's weights summing (in float64) to at most 1 + 1e-6."""

def merge_safetensors(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    updates: Mapping[str, tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]],
    out_dtype: str | None = None,
    num_threads: int = 0,
    progress: Callable[[int], object] | None = None,
) -> None:
    """Write ``dst`` (which must not exist) as the safetensors file ``src`` with, for each ``name: (u, v)``
    of ``updates``, ``W += u @ v`` (``W (rows, cols)``, ``u (rows, R)``, ``v (R, cols)``; the same float32
    sum and single rounding as :func:`rank_update_`). Same tensor names, order and ``__metadata__``; with
    ``out_dtype`` (``"float32"``, ``"float16"``, ``"bfloat16"``) every float tensor is converted first.
    Streams in chunks with bounded memory; ``progress(n)`` gets the bytes of source data done since its
    previous call. Everything is checked before ``dst`` is created, and ``dst`` is removed on any error;
    Ctrl-C raises ``KeyboardInterrupt``, an exception of ``progress`` propagates."""
