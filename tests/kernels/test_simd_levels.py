"""Every SIMD level this CPU has (``VBLORA_RS_SIMD``, read once per process, so one child process each) gives
torch's results: top-K indices and softmax weights and the bank gather bit for bit on every level, and the
merge and ``B @ A`` bit for bit on the fused (FMA) levels; the portable level within its rounding bound."""

from __future__ import annotations

import subprocess
import sys

import pytest
from support.child_process import child_env
from vblora_rs import _native

ALL_LEVELS = ["portable", "avx2+fma", "avx512"]

CHILD = r"""
import sys
import torch
from vblora_rs import _native, ops
from vblora_rs.ops import MergeTerm

level = sys.argv[1]
assert _native.simd_level() == level, (_native.simd_level(), level)
fused = level != "portable"
g = torch.Generator().manual_seed(11)

# top-K: wide rows (the fast path), ties for first place and at the k-th (the exact fallback), short rows
# (torch's nth_element path); indices and softmax weights bit for bit
wide = torch.randn(300, 2048, generator=g)
wide[::3] = wide[::3].round()
wide[1::7, 100] = wide[1::7].max(dim=-1).values
short = torch.randn(50, 40, generator=g).round()
for logits, ks in ((wide, (1, 2, 5, 17)), (short, (1, 7, 40))):
    for k in ks:
        idx, w = ops.topk_softmax(logits, k)
        top, ref = logits.topk(k, dim=-1)
        assert torch.equal(idx, ref), ("topk indices", k)
        assert torch.equal(w, torch.softmax(top, dim=-1)), ("topk weights", k)
bf = wide.bfloat16()
assert torch.equal(ops.topk_softmax(bf, 2)[0], bf.topk(2, dim=-1).indices), "bf16 topk"

# the gather, PEFT's (w.unsqueeze(-1) * bank[idx]).sum(-2) on the upcast bank: plain mul + add on every level
bank = torch.randn(2048, 256, generator=g)
top, idx = wide.topk(2, dim=-1)
for b in (bank, bank.bfloat16()):
    ref = (torch.softmax(top, dim=-1).unsqueeze(-1) * b.float()[idx]).sum(-2)
    assert torch.equal(ops.low_rank_matrix(wide, b, 2), ref), ("gather", b.dtype)

# the merge, as PEFT does it: delta = B @ A in float32, then weight += delta (rounded once)
eps32 = torch.finfo(torch.float32).eps
for m, n, r in ((300, 520, 4), (64, 1000, 64), (37, 300, 3), (1, 17, 1)):
    A = torch.randn(r, n, generator=g) * 0.1
    B = torch.randn(m, r, generator=g) * 0.1
    delta = B @ A
    got = ops.delta_weight(A, B)
    # portable: multiply then add, r roundings where torch fuses; bounded by r * eps * (|B| @ |A|)
    bound = r * eps32 * (B.abs() @ A.abs())
    assert torch.equal(got, delta) if fused else bool(((got - delta).abs() <= bound).all()), ("B @ A", m, n, r)
    for dtype in (torch.float32, torch.bfloat16):
        weight = torch.randn(m, n, generator=g).to(dtype)
        expected = weight.clone()
        expected += delta
        merged = ops.merge_(weight.clone(), [MergeTerm(A, B)])
        if fused:
            assert torch.equal(merged, expected), ("merge", dtype, m, n, r)
        else:  # the delta's bound, plus one unit in the last place of the rounding into dtype
            ulp = torch.finfo(dtype).eps * expected.float().abs()
            assert ((merged.float() - expected.float()).abs() <= bound + ulp).all(), ("merge", dtype, m, n, r)
print("ok", level)
"""


def run_child(env_value: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = child_env(VBLORA_RS_SIMD=env_value)
    return subprocess.run(
        [sys.executable, "-c", *args], env=env, capture_output=True, text=True, timeout=600, check=False
    )


def test_levels_are_reported() -> None:
    levels = _native.simd_levels()
    assert levels[0] == "portable"
    assert set(levels) <= set(ALL_LEVELS)
    assert levels == [lv for lv in ALL_LEVELS if lv in levels]  # lowest first
    assert _native.simd_level() in levels


@pytest.mark.parametrize("level", ALL_LEVELS)
def test_level_matches_torch(level: str) -> None:
    if level not in _native.simd_levels():
        pytest.skip(f"this CPU lacks {level}")
    done = run_child(level, CHILD, level)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.split() == ["ok", level]


@pytest.mark.parametrize(("value", "index"), [("portable", 0), ("avx2", 1), ("avx512", 2), ("no-such-level", 2)])
def test_environment_caps_the_level(value: str, index: int) -> None:
    """A level the CPU lacks gives the best one below it; an unknown value is ignored (the best level)."""
    levels = _native.simd_levels()
    want = levels[min(index, len(levels) - 1)]
    done = run_child(value, "from vblora_rs import _native; print(_native.simd_level())")
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.strip() == want
