"""Whose threads run the kernels: torch's OpenMP team where torch uses OpenMP, the extension's rayon pools
otherwise (VBLORA_RS_THREADS=rayon, a forked child). Both must give the same results and the same errors."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import threading

import pytest
import torch
from support import tolerances
from support.child_process import child_env
from vblora_rs import _native, ops
from vblora_rs._threads import torch_openmp_library
from vblora_rs.errors import VBLoRAError

TORCH_OPENMP = torch_openmp_library()
needs_openmp = pytest.mark.skipif(TORCH_OPENMP is None, reason="torch's parallel backend is not a findable OpenMP")
# W + (0.5 B) @ A against torch's addmm: rank-4 products and the weight (randn values, sums of |terms| below ~50)
MERGE_TOL = tolerances.reordered(torch.float32, 5, scale=50.0)


def _work(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k of a logits matrix and a merge: results of both kernel families on 2 threads."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3000, 512, generator=g)
    idx, w = ops.topk_softmax(logits, 2)
    W = torch.randn(700, 300, generator=g)
    ops.merge_(W, [ops.MergeTerm(torch.randn(4, 300, generator=g), torch.randn(700, 4, generator=g), 0.5)])
    return idx, w, W


def _expected(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3000, 512, generator=g)
    top, idx = logits.topk(2, dim=-1)
    W = torch.randn(700, 300, generator=g)
    A, B = torch.randn(4, 300, generator=g), torch.randn(700, 4, generator=g)
    return idx, torch.softmax(top, dim=-1), W + (B * 0.5) @ A


@needs_openmp
def test_torch_openmp_team_is_used_by_default() -> None:
    if os.environ.get("VBLORA_RS_THREADS", "").lower() == "rayon":
        pytest.skip("VBLORA_RS_THREADS=rayon is set for this run")
    assert ops.thread_backend() == "openmp"
    assert os.path.basename(TORCH_OPENMP).startswith(("libgomp", "libomp", "libiomp5"))


def test_results_equal_torch_on_either_backend() -> None:
    got, want = _work(), _expected()
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    torch.testing.assert_close(got[2], want[2], **MERGE_TOL)


def test_rayon_backend_on_request_gives_identical_bits() -> None:
    code = (
        "import sys, torch; from vblora_rs import ops\n"
        "g = torch.Generator().manual_seed(0); x = torch.randn(3000, 512, generator=g)\n"
        "W = torch.randn(700, 300, generator=g); A = torch.randn(4, 300, generator=g); "
        "B = torch.randn(700, 4, generator=g)\n"
        "ops.merge_(W, [ops.MergeTerm(A, B, 0.5)]); i, w = ops.topk_softmax(x, 2)\n"
        "torch.save({'backend': ops.thread_backend(), 'i': i, 'w': w, 'W': W}, sys.argv[1])\n"
    )
    results = {}
    for backend in ("rayon", ""):
        path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"vblora_thread_team_{os.getpid()}_{backend}.pt")
        env = child_env(VBLORA_RS_THREADS=backend)
        subprocess.run([sys.executable, "-c", code, path], env=env, check=True, timeout=300)
        results[backend] = torch.load(path)
        os.remove(path)
    assert results["rayon"]["backend"] == "rayon"
    assert results[""]["backend"] == ("openmp" if TORCH_OPENMP is not None else "rayon")
    for key in ("i", "w", "W"):
        assert torch.equal(results["rayon"][key], results[""][key]), key


def test_nan_error_raised_from_inside_the_team() -> None:
    logits = torch.randn(5000, 256)
    logits[4321, 17] = float("nan")
    with pytest.raises(VBLoRAError, match="row 4321"):
        ops.topk_softmax(logits, 2, name="layer.vblora_logits_A")


def test_kernels_from_several_python_threads_at_once() -> None:
    out: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    threads = [threading.Thread(target=lambda s=s: out.__setitem__(s, _work(s))) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    for s in range(4):
        want = _expected(s)
        assert torch.equal(out[s][0], want[0]) and torch.equal(out[s][1], want[1])
        torch.testing.assert_close(out[s][2], want[2], **MERGE_TOL)


def _child(queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    # torch's own parallel ops hang in a forked child (libgomp), so torch runs on one thread, as in a
    # DataLoader worker; the kernels are asked for two, which they must take from rayon.
    torch.set_num_threads(1)
    ops.set_num_threads(2)
    try:
        idx, w, W = _work()
        want = _expected()
        ok = torch.equal(idx, want[0]) and torch.equal(w, want[1]) and torch.allclose(W, want[2], **MERGE_TOL)
        queue.put((_native.thread_backend(), ok))
    except BaseException as exc:  # reported to the parent, which fails the test
        queue.put(("error", repr(exc)))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_falls_back_to_rayon_and_does_not_hang() -> None:
    _work()  # the parent has used its team: a child's libgomp would wait for threads it does not have
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child, args=(queue,))
    child.start()
    child.join(timeout=120)
    if child.is_alive():
        child.kill()
        pytest.fail("kernels in a forked child hung")
    backend, ok = queue.get(timeout=10)
    assert ok is True, ok
    assert backend == "rayon"


def test_binding_a_library_that_is_not_loaded_names_it() -> None:
    with pytest.raises(VBLoRAError, match="/nonexistent/libgomp.so.1.*not loaded"):
        _native.use_openmp("/nonexistent/libgomp.so.1")
