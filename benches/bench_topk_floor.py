"""The top-K selection, the gather and a layer's merge against their plain-torch floors, per SIMD level and top-K
prefetch variant (issue 24's table): one child process per row, since both are chosen once per process.

    python benches/bench_topk_floor.py                       # every level of this CPU x off/on/auto
    python benches/bench_topk_floor.py --levels avx2 --variants auto --pairs 5

Each measure times ours and its floor back to back, ``--pairs`` times after a warm-up, and reports the median of
the per-pair ratios (a slow spell of a shared machine hits both alike); two rounds per row, printed ``a / b``:

- top-K: ``ops.topk_softmax(logits, k)`` / ``logits.sum()`` (39,040 x 2,048 float32 logits, k = 2, as issue 24).
- gather: ``ops.low_rank_matrix(logits, bank, k)`` / ``logits.sum()``, and / (``logits.sum()`` plus writing a fresh
  ``(rows, L)`` output, which the gather must also do: 40 MB here).
- merge: a VB-LoRA layer's ``merge()`` (4096 x 4096 float32, r = 4, L = 256, 2,048 vectors, A and B built from the
  logits inside it) / ``W.addmm_(B, A)`` on precomputed A and B, and / (reading both logits tensors, then the same
  ``addmm_``), every timed call after the same untimed reset of the weight.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Callable, Optional

import torch
from torch import nn

ROWS, NUM_VECTORS, VECTOR_LENGTH, TOPK, R, WIDTH = 39040, 2048, 256, 2, 4, 4096


def paired_ratios(
    ours: Callable[[], object],
    floors: list[Callable[[], object]],
    pairs: int,
    setup: Optional[Callable[[], None]] = None,
) -> list[float]:
    """Ours against each floor (a floor of several calls times them together): bench_vs_peft's rounds, one warm-up
    (which also lets "auto" measure its variants), every call after ``setup``."""
    from bench_vs_peft import interleaved_ms, paired_ratio

    times = interleaved_ms([(fn, setup) for fn in (ours, *floors)], pairs)
    return [paired_ratio(times[0], floor) for floor in times[1:]]


def merge_layer():  # type: ignore[no-untyped-def]
    import vblora_rs

    gen = torch.Generator().manual_seed(0)
    base = nn.Linear(WIDTH, WIDTH, bias=False)
    values = torch.rand(NUM_VECTORS, VECTOR_LENGTH, generator=gen) * 0.04 - 0.02
    bank = nn.ParameterDict({"default": nn.Parameter(values)})
    layer = vblora_rs.Linear(
        base, bank, "default", r=R, num_vectors=NUM_VECTORS, vector_length=VECTOR_LENGTH, topk=TOPK
    )
    with torch.no_grad():
        for holder in (layer.vblora_logits_A, layer.vblora_logits_B):
            holder["default"].copy_(torch.randn(holder["default"].shape, generator=gen))
    return layer


def child(pairs: int, rounds: int) -> dict:
    from vblora_rs import _native, ops

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(ROWS, NUM_VECTORS, generator=gen)
    bank = torch.rand(NUM_VECTORS, VECTOR_LENGTH, generator=gen)
    layer = merge_layer()
    weight = layer.get_base_layer().weight
    w0 = weight.detach().clone()
    scratch = w0.clone()
    logits_A, logits_B = layer.vblora_logits_A["default"], layer.vblora_logits_B["default"]
    A, B = ops.low_rank_matrices(
        logits_A.detach(), logits_B.detach(), layer.vblora_vector_bank["default"].detach(), TOPK
    )

    def reset() -> None:
        layer.merged_adapters = []
        weight.data.copy_(w0)
        scratch.copy_(w0)

    def sum_and_write() -> None:
        logits.sum()
        torch.empty(ROWS, VECTOR_LENGTH).fill_(0.0)

    def read_logits_then_addmm() -> None:
        logits_A.sum()
        logits_B.sum()
        scratch.addmm_(B, A)

    out: dict = {"topk": [], "gather": [], "gather_write": [], "merge": [], "merge_read": []}
    with torch.no_grad():
        for _ in range(rounds):
            out["topk"] += paired_ratios(lambda: ops.topk_softmax(logits, TOPK), [logits.sum], pairs)
            gather = paired_ratios(lambda: ops.low_rank_matrix(logits, bank, TOPK), [logits.sum, sum_and_write], pairs)
            out["gather"].append(gather[0])
            out["gather_write"].append(gather[1])
            merge = paired_ratios(layer.merge, [lambda: scratch.addmm_(B, A), read_logits_then_addmm], pairs, reset)
            out["merge"].append(merge[0])
            out["merge_read"].append(merge[1])
    out["prefetch"] = "/".join(_native.topk_prefetch())
    out["simd"] = _native.simd_level()
    return out


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--levels", default=None, help="comma-separated SIMD levels (default: this CPU's, portable aside)"
    )
    parser.add_argument("--variants", default="off,on,auto", help="top-K prefetch variants (default off,on,auto)")
    parser.add_argument("--pairs", type=int, default=11, help="timed pairs per measure (default 11)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per row (default 2)")
    parser.add_argument("--threads", type=int, default=2, help="torch and vblora_rs threads (default 2)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(args.pairs, args.rounds)))
        return

    import vblora_rs
    from bench_vs_peft import cpu_model

    levels = (
        args.levels.split(",") if args.levels else [lv for lv in vblora_rs._native.simd_levels() if lv != "portable"]
    )
    print(f"CPU {cpu_model()}, {args.threads} threads, torch {torch.__version__}, vblora_rs {vblora_rs.__version__}")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(
        f"{ROWS} x {NUM_VECTORS} float32 logits, k = {TOPK}; merge: {WIDTH} x {WIDTH} float32, r = {R}, "
        f"L = {VECTOR_LENGTH}; medians of {args.pairs} per-pair ratios, {args.rounds} rounds"
    )
    print()
    print(
        "| level | variant (chosen) | top-K+softmax / sum | gather / sum | gather / (sum + output write) "
        "| merge() / addmm_ | merge() / (logits read + addmm_) |"
    )
    print("|---|---|---|---|---|---|---|")
    for level in levels:
        for variant in args.variants.split(","):
            env = {**os.environ, "VBLORA_RS_SIMD": level, "VBLORA_RS_TOPK_PREFETCH": variant}
            done = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    "--pairs",
                    str(args.pairs),
                    "--rounds",
                    str(args.rounds),
                    "--threads",
                    str(args.threads),
                ],
                env=env,
                capture_output=True,
                text=True,
                check=False,
            )
            if done.returncode != 0:
                raise SystemExit(f"{level}/{variant}: child failed:\n{done.stderr[-2000:]}")
            got = json.loads(done.stdout.strip().splitlines()[-1])
            cells = [
                " / ".join(f"{x:.2f}x" for x in got[key])
                for key in ("topk", "gather", "gather_write", "merge", "merge_read")
            ]
            print(f"| {got['simd']} | {variant} ({got['prefetch']}) | " + " | ".join(cells) + " |")
    print()
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
