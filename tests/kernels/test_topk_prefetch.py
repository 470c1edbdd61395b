"""The top-K scan's prefetch variants (``VBLORA_RS_TOPK_PREFETCH=on|off|auto``, read once per process, so one
child process each) give the same bits on every SIMD level this CPU has: top-K indices and weights (torch's,
ties included), the kept logits, and the fused gather; and the process reports which variant ran and how it was
chosen (``auto`` measures on the first call of 32 MiB or more of logits)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from support.child_process import child_env
from vblora_rs import _native

CHILD = r"""
import hashlib, json, sys
import numpy as np
import torch
from vblora_rs import _native, ops

assert _native.simd_level() == sys.argv[1], (_native.simd_level(), sys.argv[1])
before = _native.topk_prefetch()
g = torch.Generator().manual_seed(5)
digest = hashlib.sha256()
# 4,096 x 2,048 f32 is 32 MiB: large enough for "auto" to measure; ties (rounded rows, a shared maximum) take
# the exact fallback, 2,047 columns the heap select without the fast path
big = torch.randn(4096, 2048, generator=g)
big[::5] = big[::5].round()
big[1::9, 7] = big[1::9].max(dim=-1).values
odd = torch.randn(300, 2047, generator=g)
bank = torch.randn(2048, 16, generator=g)
for logits in (big, odd, big.to(torch.bfloat16)):
    for k in (1, 2, 3, 8):
        idx, w = ops.topk_softmax(logits, k)
        top, ref = logits.float().topk(k, dim=-1)
        assert torch.equal(idx, ref), ("indices", k)
        assert torch.equal(w, torch.softmax(top, dim=-1)), ("weights", k)
        i, kept = _native.topk_many([ops.float_view(logits, "logits")], k, True, 0)
        digest.update(i.tobytes()); digest.update(kept.tobytes())
        i, w = _native.topk_softmax(ops.float_view(logits, "logits"), k, 0)
        digest.update(i.tobytes()); digest.update(w.tobytes())
fused = _native.low_rank_from_logits(big.numpy(), bank.numpy(), 2, 0)
digest.update(fused.tobytes())
print(json.dumps({"digest": digest.hexdigest(), "before": before, "after": _native.topk_prefetch()}))
"""


def run_child(level: str, variant: str) -> dict:
    env = child_env(VBLORA_RS_SIMD=level, VBLORA_RS_TOPK_PREFETCH=variant)
    out = subprocess.run([sys.executable, "-c", CHILD, level], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("level", _native.simd_levels())
def test_every_variant_gives_the_same_bits_and_says_which_ran(level: str) -> None:
    results = {variant: run_child(level, variant) for variant in ("off", "on", "auto")}
    digests = {variant: r["digest"] for variant, r in results.items()}
    assert len(set(digests.values())) == 1, digests
    for variant in ("off", "on"):
        assert results[variant]["before"] == [variant, "VBLORA_RS_TOPK_PREFETCH"]
        assert results[variant]["after"] == [variant, "VBLORA_RS_TOPK_PREFETCH"]
    assert results["auto"]["before"] == ["undecided", "auto"]
    if level == "portable":  # no prefetching scan there: nothing to measure
        assert results["auto"]["after"] == ["undecided", "auto"]
    else:
        assert results["auto"]["after"][1] == "measured" and results["auto"]["after"][0] in ("on", "off")
