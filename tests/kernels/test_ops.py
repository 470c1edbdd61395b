"""The Rust kernels through ``vblora_rs.ops``: equal to the torch reference, errors by name, GIL released."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from support import tolerances
from vblora_rs import VBLoRAError, _native, ops
from vblora_rs.ops import MergeTerm

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def torch_topk_softmax(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    top, idx = logits.float().topk(k, dim=-1)
    return idx, torch.softmax(top, dim=-1)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 40),
    n=st.integers(1, 300),
    k_frac=st.floats(0.0, 1.0),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
def test_topk_softmax_equals_torch(rows: int, n: int, k_frac: float, dtype: torch.dtype, seed: int) -> None:
    k = max(1, round(k_frac * n))
    g = torch.Generator().manual_seed(seed)
    # distinct values so that the order is unambiguous in every dtype
    logits = torch.stack([torch.randperm(n, generator=g) for _ in range(rows)]).to(dtype) / 8
    idx, w = ops.topk_softmax(logits, k)
    ref_idx, ref_w = torch_topk_softmax(logits, k)
    assert idx.dtype == torch.int64 and w.dtype == torch.float32
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(w, ref_w, **tolerances.reordered(torch.float32, k, depth=3))  # exp, sum, divide


def test_topk_ties_and_infinities() -> None:
    logits = torch.tensor(
        [
            [1.0, 3.0, 3.0, 0.0, 3.0],  # ties: torch's order, whatever libstdc++ makes of them
            [float("-inf"), 2.0, float("-inf"), float("-inf"), 1.0],
            [float("-inf")] * 5,  # all -inf: softmax of the kept -inf is NaN, as in torch
        ]
    )
    idx, w = ops.topk_softmax(logits, 2)
    assert torch.equal(idx, torch.topk(logits, 2).indices)
    assert idx[1].tolist() == [1, 4]
    torch.testing.assert_close(w[:2], torch_topk_softmax(logits[:2], 2)[1], **tolerances.reordered(torch.float32, 2, 3))
    assert torch.isnan(w[2]).all() and torch.isnan(torch_topk_softmax(logits[2:], 2)[1]).all()
    # k = 1 gives weight 1; k = n keeps every entry, in torch's order
    assert torch.equal(ops.topk_softmax(logits[:1], 1)[1], torch.ones(1, 1))
    assert torch.equal(ops.topk_softmax(logits, 5)[0], torch.topk(logits, 5).indices)


def tied_logits(kind: int, rows: int, n: int, g: torch.Generator) -> torch.Tensor:
    """Logits full of equal values, as bf16-trained logits and PEFT's -inf padding are."""
    if kind == 0:
        pool = torch.tensor([float("-inf"), -1.0, 0.0, 0.5, 2.0])
        return pool[torch.randint(0, len(pool), (rows, n), generator=g)]
    if kind == 1:
        return torch.randint(0, 4, (rows, n), generator=g).float()
    if kind == 2:
        return torch.randn(rows, n, generator=g).bfloat16().float()
    if kind == 3:
        return torch.full((rows, n), [0.0, float("-inf"), -3.5][int(torch.randint(0, 3, (), generator=g))])
    return torch.randint(0, 40, (rows, n), generator=g).float() / 4


@settings(max_examples=150, deadline=None)
@given(
    rows=st.integers(1, 6),
    n=st.integers(1, 3000),
    k_frac=st.floats(0.0, 1.0),
    partial_sort=st.booleans(),
    kind=st.integers(0, 4),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
def test_topk_ties_match_torch_exactly(
    rows: int, n: int, k_frac: float, partial_sort: bool, kind: int, dtype: torch.dtype, seed: int
) -> None:
    # torch's CPU kernel runs std::partial_sort when k * 64 <= n, else std::nth_element + std::sort:
    # draw k for either path.
    k_max = max(1, n // 64) if partial_sort else min(n, 70)
    k = max(1, min(n, round(k_frac * k_max)))
    g = torch.Generator().manual_seed(seed)
    logits = tied_logits(kind, rows, n, g).to(dtype)
    idx, w = ops.topk_softmax(logits, k)
    assert torch.equal(idx, torch.topk(logits, k, dim=-1, largest=True, sorted=True).indices)
    tol = tolerances.reordered(torch.float32, k, depth=3)
    torch.testing.assert_close(w, torch_topk_softmax(logits, k)[1], **tol, equal_nan=True)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 20),
    nv=st.integers(1, 600),
    length=st.integers(1, 40),
    k=st.integers(1, 12),
    kind=st.integers(0, 4),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
def test_low_rank_matrix_with_ties_equals_torch(
    rows: int, nv: int, length: int, k: int, kind: int, dtype: torch.dtype, seed: int
) -> None:
    k = min(k, nv)
    g = torch.Generator().manual_seed(seed)
    logits = tied_logits(kind, rows, nv, g).to(dtype)
    bank = torch.randn(nv, length, generator=g).to(dtype)
    top, idx = logits.topk(k, dim=-1)
    ref = (torch.softmax(top.float(), dim=-1)[..., None] * bank.float()[idx]).sum(-2)
    tol = tolerances.reordered(torch.float32, k, depth=4, scale=float(bank.float().abs().max()))
    torch.testing.assert_close(ops.low_rank_matrix(logits, bank, k), ref, **tol, equal_nan=True)


def test_topk_nan_names_row() -> None:
    logits = torch.zeros(4, 8)
    logits[2, 5] = float("nan")
    with pytest.raises(VBLoRAError, match="row 2"):
        ops.topk_softmax(logits, 2, name="vblora_logits_A")
    with pytest.raises(ValueError, match="vblora_logits_A"):
        ops.topk_softmax(logits, 2, name="vblora_logits_A")


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 30),
    nv=st.integers(2, 64),
    length=st.integers(1, 40),
    k=st.integers(1, 4),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
def test_low_rank_matrix_equals_torch(rows: int, nv: int, length: int, k: int, dtype: torch.dtype, seed: int) -> None:
    k = min(k, nv)
    g = torch.Generator().manual_seed(seed)
    logits = torch.stack([torch.randperm(nv, generator=g) for _ in range(rows)]).float().to(dtype)
    bank = torch.randn(nv, length, generator=g).to(dtype)
    out = ops.low_rank_matrix(logits, bank, k)
    idx, w = torch_topk_softmax(logits, k)
    ref = (w.unsqueeze(-1) * bank.float()[idx]).sum(-2)
    tol = tolerances.reordered(torch.float32, k, depth=4, scale=float(bank.float().abs().max()))
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(ops.low_rank_from_topk(idx, w, bank), ref, **tol)


def test_low_rank_bad_index_and_shapes() -> None:
    bank = torch.randn(10, 4)
    with pytest.raises(VBLoRAError, match="row 1"):
        ops.low_rank_from_topk(torch.tensor([[0, 1], [2, 10]]), torch.full((2, 2), 0.5), bank)
    with pytest.raises(VBLoRAError, match="row 0"):
        ops.low_rank_from_topk(torch.tensor([[-1, 1]]), torch.full((1, 2), 0.5), bank)
    with pytest.raises(VBLoRAError, match="bank holds 10 vectors"):
        ops.low_rank_matrix(torch.randn(3, 11), bank, 2)
    with pytest.raises(VBLoRAError, match="differ in shape"):
        ops.low_rank_from_topk(torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 3), bank)


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(1, 70),
    n=st.integers(1, 90),
    ranks=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    fan_in_fan_out=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
def test_merge_equals_torch(
    m: int, n: int, ranks: list[int], fan_in_fan_out: bool, dtype: torch.dtype, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    out_f, in_f = (n, m) if fan_in_fan_out else (m, n)
    terms = [
        MergeTerm(torch.randn(r, in_f, generator=g), torch.randn(out_f, r, generator=g), s)
        for r, s in zip(ranks, (1.0, -0.5, 2.0))
    ]
    weight = torch.randn(m, n, generator=g).to(dtype)
    delta = sum(t.scale * (t.B @ t.A) for t in terms)
    if fan_in_fan_out:
        delta = delta.T
    expected = (weight.float() + delta).to(dtype)
    got = ops.merge_(weight.clone(), terms, fan_in_fan_out)
    # the float32 sums may differ in order: the terms' products and the weight
    scale = float(weight.float().abs().max() + sum((t.B.abs() @ t.A.abs()).max() * abs(t.scale) for t in terms))
    tol = tolerances.reordered(torch.float32, sum(ranks) + 1, scale=scale)
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, **tol)
    else:  # rounded once from float32: one unit in the last place, plus the float32 difference (cancellation)
        ulp = torch.finfo(dtype).eps * expected.float().abs().clamp_min(torch.finfo(dtype).tiny)
        assert ((got.float() - expected.float()).abs() <= ulp * 1.01 + tol["atol"]).all()


def test_merge_single_rounding_in_bf16() -> None:
    weight = torch.randn(64, 48).bfloat16()
    A, B = torch.randn(4, 48), torch.randn(64, 4)
    expected = weight.clone()
    expected += B @ A  # what PEFT's merge does: bf16 += fp32, computed in fp32, rounded once
    got = ops.merge_(weight.clone(), [MergeTerm(A, B)])
    assert (got.float() - expected.float()).abs().max() <= torch.finfo(
        torch.bfloat16
    ).eps * expected.float().abs().max()


def test_merge_errors() -> None:
    A, B = torch.randn(2, 8), torch.randn(4, 2)
    with pytest.raises(VBLoRAError, match=r"weight has shape \(4, 7\)"):
        ops.merge_(torch.zeros(4, 7), [MergeTerm(A, B)])
    with pytest.raises(VBLoRAError, match="float64"):
        ops.merge_(torch.zeros(4, 8, dtype=torch.float64), [MergeTerm(A, B)])
    with pytest.raises(VBLoRAError, match="not contiguous"):
        ops.merge_(torch.zeros(8, 4).T, [MergeTerm(A, B)])
    with pytest.raises(VBLoRAError, match="are not"):
        ops.merge_(torch.zeros(4, 8), [MergeTerm(A, torch.randn(4, 3))])


def test_native_rejects_bad_arrays_directly() -> None:
    x = np.zeros((4, 8), dtype=np.float32)
    with pytest.raises(VBLoRAError):
        _native.topk_softmax(x[:, ::2], 2, 1)
    with pytest.raises((VBLoRAError, TypeError)):
        _native.topk_softmax(x.astype(np.float64), 2, 1)
    with pytest.raises(VBLoRAError):
        _native.topk_softmax(x, 0, 1)
    with pytest.raises(VBLoRAError):
        _native.topk_softmax(x, 9, 1)
    ro = np.zeros((4, 8), dtype=np.float32)
    ro.setflags(write=False)
    with pytest.raises((VBLoRAError, ValueError, TypeError)):
        _native.rank_update_(ro, np.zeros((4, 1), np.float32), np.zeros((1, 8), np.float32), 1)


def test_delta_weight_and_threads() -> None:
    A, B = torch.randn(3, 40), torch.randn(24, 3)
    for n in (1, 2):
        ops.set_num_threads(n)
        try:
            tol = tolerances.reordered(torch.float32, 3, scale=float((B.abs() @ A.abs()).max()))
            torch.testing.assert_close(ops.delta_weight(A, B), B @ A, **tol)
            torch.testing.assert_close(ops.delta_weight(A, B, True), (B @ A).T, **tol)
        finally:
            ops.set_num_threads(None)
    assert ops.get_num_threads() == torch.get_num_threads()
    with pytest.raises(ValueError):
        ops.set_num_threads(0)


def test_kernels_release_the_gil() -> None:
    """A Python thread keeps running while a long kernel runs in another thread."""
    logits = torch.randn(20000, 2048)
    ops.topk_softmax(logits, 2)  # warm up
    ticks = 0
    done = threading.Event()

    def kernel() -> None:
        for _ in range(3):
            ops.topk_softmax(logits, 2)
        done.set()

    worker = threading.Thread(target=kernel)
    ops.set_num_threads(1)  # leave a core to the ticking thread
    try:
        start = time.perf_counter()
        worker.start()
        while not done.is_set():
            ticks += 1
            time.sleep(0.001)
        worker.join()
        elapsed = time.perf_counter() - start
    finally:
        ops.set_num_threads(None)
    # with the GIL held the loop could not tick at all while a kernel ran
    assert ticks >= max(3, int(elapsed / 0.001 * 0.1)), (ticks, elapsed)


def test_concurrent_calls_are_safe() -> None:
    weight = torch.zeros(256, 512)
    terms = [MergeTerm(torch.randn(2, 512), torch.randn(256, 2))]
    results: list[torch.Tensor] = []

    def work() -> None:
        w = weight.clone()
        ops.merge_(w, terms)
        results.append(w)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        assert torch.equal(r, results[0])


def test_low_rank_product_is_rank_update_delta() -> None:
    """``low_rank_product`` is the delta ``rank_update_`` adds, bit for bit, and on the FMA path
    it is exactly torch's ``u @ v``."""
    g = torch.Generator().manual_seed(7)
    for m, r, n in [(37, 4, 300), (130, 64, 257), (5, 1, 1), (9, 0, 4)]:
        u = torch.randn(m, r, generator=g)
        v = torch.randn(r, n, generator=g) * 1e-2
        for threads in (1, 2):
            delta = torch.from_numpy(_native.low_rank_product(u.numpy(), v.numpy(), threads))
            assert delta.shape == (m, n) and delta.dtype == torch.float32
            for dtype in DTYPES:
                w = torch.randn(m, n, generator=g).to(dtype)
                merged = w.clone()
                view = (merged.view(torch.uint16) if dtype == torch.bfloat16 else merged).numpy()
                _native.rank_update_(view, u.numpy(), v.numpy(), threads)
                assert torch.equal(merged, (w.float() + delta).to(dtype))
            if _native.simd_level() != "portable":  # AVX2 and AVX-512: the same FMA chain
                assert torch.equal(delta, u @ v)
            else:
                scale = float((u.abs() @ v.abs()).max()) if r else 0.0
                torch.testing.assert_close(delta, u @ v, **tolerances.reordered(torch.float32, max(r, 1), scale=scale))
    with pytest.raises(VBLoRAError, match="v has shape"):
        _native.low_rank_product(np.zeros((3, 2), np.float32), np.zeros((3, 4), np.float32), 1)
    with pytest.raises(VBLoRAError):
        _native.low_rank_product(np.zeros((3, 2), np.float64), np.zeros((2, 4), np.float32), 1)


def test_simd_level_is_reported() -> None:
    assert _native.simd_level() in ("avx512", "avx2+fma", "portable")
    assert _native.simd_level() in _native.simd_levels()


def test_topk_fast_path_and_ties_match_torch_on_wide_rows() -> None:
    """Rows wide enough for the distinct-values fast path, with and without ties at the k-th value."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(300, 2048, generator=g)
    logits[::3] = logits[::3].round()  # many ties: the exact fallback
    logits[1::7, 100] = logits[1::7].max(dim=-1).values  # a tie for first place
    logits[2::5] = logits[2::5].bfloat16().float()
    for k in (1, 2, 5, 16, 17):
        idx, w = ops.topk_softmax(logits, k)
        ref_idx, ref_w = torch_topk_softmax(logits, k)
        assert torch.equal(idx, ref_idx), k
        torch.testing.assert_close(w, ref_w, **tolerances.reordered(torch.float32, k, depth=3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_encode_many_equals_encode_one_by_one(dtype: torch.dtype) -> None:
    """One Rust call and one softmax for an adapter's every logits tensor give the very tensors a call each gives."""
    from vblora_rs.convert import topk as compact

    g = torch.Generator().manual_seed(3)
    shapes = [(4, 16, 300), (43, 4, 300), (1, 1, 300), (4, 2, 300), (9, 4, 300)]
    logits = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    logits[2][0, 0, :] = 0.5  # a row of ties
    logits[3] = logits[3].round()  # many ties
    many = compact.encode_many(logits, 3, 300)
    for t, (idx, w) in zip(logits, many):
        want_idx, want_w = compact.encode(t, 3, 300)
        assert idx.dtype == want_idx.dtype and torch.equal(idx, want_idx)
        assert w.dtype == want_w.dtype == dtype and torch.equal(w, want_w)
    bad = [t.clone() for t in logits]
    bad[1].view(-1, 300)[5, 7] = float("nan")
    with pytest.raises(VBLoRAError, match=f"row {4 * 16 + 5} contains NaN"):
        ops.topk_softmax_many(bad, 3)
    with pytest.raises(VBLoRAError, match="same dtype"):
        mixed = [logits[0].float().reshape(-1, 300).numpy(), logits[1].half().reshape(-1, 300).numpy()]
        _native.topk_many(mixed, 3, False, 1)


# --- the selection's own softmax: torch's bits, or torch weighs ------------------------------------------------


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))


@pytest.mark.parametrize("k", [1, 2, 3, 5, _native.TORCH_SOFTMAX_MAX_K, _native.TORCH_SOFTMAX_MAX_K + 1])
@pytest.mark.parametrize("scale", [0.01, 1.0, 30.0])
def test_topk_softmax_weights_are_torchs_bits(k: int, scale: float) -> None:
    logits = torch.randn(3000, 300, generator=torch.Generator().manual_seed(k)) * scale
    idx, w = ops.topk_softmax(logits, k)
    ref_idx, ref_w = torch_topk_softmax(logits, k)
    assert torch.equal(idx, ref_idx)
    assert same_bits(w, ref_w)


def test_the_selection_weighs_rows_itself_where_torch_has_a_simd_kernel() -> None:
    # torch's AVX2 / AVX-512 softmax is the one rust/topk/softmax.rs follows; elsewhere torch may weigh them
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip(f"torch's CPU kernels here are {torch.backends.cpu.get_cpu_capability()}")
    assert all(ops._selection_weights_are_torchs(k) for k in range(1, _native.TORCH_SOFTMAX_MAX_K + 1))
    assert not ops._selection_weights_are_torchs(_native.TORCH_SOFTMAX_MAX_K + 1)


def test_a_torch_whose_softmax_differs_keeps_weighing_the_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    # a softmax rounded another way (as a torch without SIMD kernels, or with another exp, would be)
    def other_softmax(x: torch.Tensor, dim: int) -> torch.Tensor:
        return (
            torch.exp(x.double() - x.double().amax(dim, keepdim=True))
            .div_(torch.exp(x.double() - x.double().amax(dim, keepdim=True)).sum(dim, keepdim=True))
            .float()
        )

    monkeypatch.setattr(ops, "_WEIGHTS_ARE_TORCHS", {})
    monkeypatch.setattr(torch, "softmax", other_softmax)
    assert not ops._selection_weights_are_torchs(2)
    logits = torch.randn(500, 64, generator=torch.Generator().manual_seed(0))
    _, w = ops.topk_softmax(logits, 2)
    top, _ = logits.topk(2, dim=-1)
    assert same_bits(w, other_softmax(top, -1))  # torch's (here: the patched) softmax weighed them
