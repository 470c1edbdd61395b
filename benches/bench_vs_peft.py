"""vblora_rs against PEFT on identical tensors, in one process: medians, ratios and the plain-torch floors.

    python benches/bench_vs_peft.py            # full run (Llama-2-7B layer shapes, TinyLlama-1.1B merge)
    python benches/bench_vs_peft.py --quick    # short run
    python benches/bench_vs_peft.py --png ratios.png --markdown table.md

Every row times PEFT and vblora_rs on the same tensors in the same run; "speed-up" is PEFT's median over
ours. Floors are plain-torch references for how fast the operation can be on this machine; where a row has
one, PEFT, ours and the floor run one after the other in every round, and "ours/floor" is the median of the
per-round ratios (on a noisy shared machine the drift between rounds then cancels).
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

warnings.filterwarnings("ignore")

import peft  # noqa: E402
import vblora_rs  # noqa: E402
from peft.tuners.vblora.layer import Linear as PeftLinear  # noqa: E402
from vblora_rs import ops  # noqa: E402

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]  # (in, out) of Llama-2-7B projections
R, NUM_VECTORS, VECTOR_LENGTH, TOPK = 4, 2048, 256, 2


@dataclass
class Row:
    section: str
    name: str
    peft_ms: Optional[float]
    ours_ms: float
    floor_name: str = ""
    floor_ms: Optional[float] = None
    target: str = ""
    extra: dict = field(default_factory=dict)
    # ours / floor as the median of per-round ratios (the two timed back to back in each round), which the
    # machine's drift between rounds does not move; None: the ratio of the two medians.
    paired_vs_floor: Optional[float] = None

    @property
    def vs_floor(self) -> Optional[float]:
        if self.paired_vs_floor is not None:
            return self.paired_vs_floor
        return None if not self.floor_ms else self.ours_ms / self.floor_ms

    @property
    def speedup(self) -> Optional[float]:
        return None if self.peft_ms is None else self.peft_ms / self.ours_ms


def median_ms(
    fn: Callable[[], object], repeats: int, warmup: int = 1, setup: Optional[Callable[[], None]] = None
) -> float:
    times = []
    for i in range(warmup + repeats):
        if setup is not None:
            setup()
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        if i >= warmup:
            times.append(elapsed * 1e3)
    return statistics.median(times)


def interleaved_ms(
    fns: list[tuple[Callable[[], object], Optional[Callable[[], None]]]], repeats: int, warmup: int = 1
) -> list[list[float]]:
    """Times of each ``(fn, setup)`` over ``repeats`` rounds, the functions one after the other in every
    round (setups untimed): a slow spell of the machine hits all of them alike."""
    times: list[list[float]] = [[] for _ in fns]
    for i in range(warmup + repeats):
        for (fn, setup), out in zip(fns, times):
            if setup is not None:
                setup()
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            if i >= warmup:
                out.append(elapsed * 1e3)
    return times


def paired_ratio(ours: list[float], floor: list[float]) -> float:
    return statistics.median(o / f for o, f in zip(ours, floor))


def ordered_bits(t: torch.Tensor) -> torch.Tensor:
    """Half-precision values as integers in the same order as the floats, one apart per ulp."""
    bits = t.contiguous().view(torch.int16).to(torch.int32)
    return torch.where(bits < 0, -(bits & 0x7FFF), bits)


def ulp_check(actual: torch.Tensor, expected: torch.Tensor) -> dict:
    """float32: the largest difference relative to the largest magnitude; half types: the distance in ulps
    (consecutive representable values) and the share of elements at most 1 ulp apart."""
    if expected.dtype == torch.float32:
        diff = (actual - expected).abs().max().item()
        return {"max_abs_rel": diff / max(expected.abs().max().item(), 1e-30)}
    dist = (ordered_bits(actual) - ordered_bits(expected)).abs()
    return {"max_ulp": float(dist.max()), "frac_le_1ulp": (dist <= 1).float().mean().item()}


def peft_config() -> peft.VBLoRAConfig:
    return peft.VBLoRAConfig(r=R, num_vectors=NUM_VECTORS, vector_length=VECTOR_LENGTH, topk=TOPK, target_modules=["x"])


def layer_pair(in_f: int, out_f: int, dtype: torch.dtype, n_adapters: int = 1, seed: int = 0):
    """A PEFT layer and ours over two copies of one weight, holding identical adapters."""
    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(out_f, in_f, generator=g) * 0.02).to(dtype)
    base_t, base_o = nn.Linear(in_f, out_f, bias=False, dtype=dtype), nn.Linear(in_f, out_f, bias=False, dtype=dtype)
    with torch.no_grad():
        base_t.weight.copy_(weight)
        base_o.weight.copy_(weight)
    names = ["default"] + [f"a{i}" for i in range(1, n_adapters)]
    bank_t, bank_o = nn.ParameterDict(), nn.ParameterDict()
    banks = {}
    for name in names:
        banks[name] = torch.rand(NUM_VECTORS, VECTOR_LENGTH, generator=g) * 0.04 - 0.02
        bank_t[name] = nn.Parameter(banks[name].clone())
        bank_o[name] = nn.Parameter(banks[name].clone())
    theirs = PeftLinear(base_t, bank_t, "default", config=peft_config(), r=R)
    ours = vblora_rs.Linear(
        base_o, bank_o, "default", r=R, num_vectors=NUM_VECTORS, vector_length=VECTOR_LENGTH, topk=TOPK
    )
    for name in names[1:]:
        theirs.update_layer(name, bank_t, R, config=peft_config())
        ours.update_layer(name, bank_o, R, topk=TOPK, num_vectors=NUM_VECTORS, vector_length=VECTOR_LENGTH)
    # A layer (PEFT's, and ours like it) takes the base weight's dtype; get_peft_model then casts adapters back to
    # float32 (autocast_adapter_dtype=True), which is how users run them: the same cast here, on both sides.
    with torch.no_grad():
        holders = (theirs.vblora_logits_A, theirs.vblora_logits_B, bank_t, ours.vblora_logits_A, ours.vblora_logits_B)
        for holder in (*holders, bank_o):
            for param in holder.values():
                param.data = param.data.float()
        for name in names:  # the bf16 round trip rounded both banks: give them the drawn values again
            bank_t[name].copy_(banks[name])
            bank_o[name].copy_(banks[name])
    with torch.no_grad():
        for name in names:
            for attr in ("vblora_logits_A", "vblora_logits_B"):
                values = torch.randn(getattr(theirs, attr)[name].shape, generator=g)
                getattr(theirs, attr)[name].copy_(values)
                getattr(ours, attr)[name].copy_(values)
    return theirs, ours, names


def bench_topk(rows: list[Row], quick: bool, repeats: int) -> None:
    n_rows = 39040 if not quick else 8192
    logits = torch.randn(n_rows, NUM_VECTORS)
    t, o, f = interleaved_ms(
        [
            (lambda: torch.softmax(logits.topk(TOPK, dim=-1).values, dim=-1), None),
            (lambda: ops.topk_softmax(logits, TOPK), None),
            (lambda: logits.sum(), None),
        ],
        3 * repeats,
    )
    rows.append(
        Row(
            "top-K",
            f"topk+softmax {n_rows}x{NUM_VECTORS} f32 (torch.topk+softmax)",
            statistics.median(t),
            statistics.median(o),
            "logits.sum()",
            statistics.median(f),
            ">=3x, <=1.1x floor",
            paired_vs_floor=paired_ratio(o, f),
        )
    )
    bank = torch.rand(NUM_VECTORS, VECTOR_LENGTH)

    def torch_fused() -> torch.Tensor:
        top, idx = logits.topk(TOPK, dim=-1)
        return (torch.softmax(top, dim=-1).unsqueeze(-1) * bank[idx]).sum(-2)

    t_ms = median_ms(torch_fused, repeats)
    o_ms = median_ms(lambda: ops.low_rank_matrix(logits, bank, TOPK), repeats)
    rows.append(Row("top-K", f"topk+softmax+gather {n_rows} rows -> L={VECTOR_LENGTH}", t_ms, o_ms))


def reset_merge(layer, w0: torch.Tensor) -> Callable[[], None]:  # type: ignore[no-untyped-def]
    """Untimed set-up: the layer unmerged, its weight back to ``w0``."""

    def fn() -> None:
        layer.merged_adapters = []
        layer.get_base_layer().weight.data.copy_(w0)

    return fn


def bench_layer(rows: list[Row], in_f: int, out_f: int, dtype: torch.dtype, repeats: int) -> None:
    theirs, ours, _ = layer_pair(in_f, out_f, dtype)
    label = f"{'f32' if dtype == torch.float32 else 'bf16'} {in_f}x{out_f}"
    with torch.no_grad():
        t_ms = median_ms(lambda: theirs.get_delta_weight("default"), repeats)
        o_ms = median_ms(lambda: ours.get_delta_weight("default"), repeats)
    rows.append(Row("layer", f"get_delta_weight {label}", t_ms, o_ms, target=">=1x"))

    w0 = theirs.get_base_layer().weight.detach().clone()
    with torch.no_grad():
        A, B = ours._get_lora_matrices("default", cast_to_fp32=True)
    A_d, B_d = A.to(dtype), B.to(dtype)
    W = w0.clone()
    # The floor gets the same untimed reset as the layers (a copy_ of w0 into the weight).
    t, o, f = interleaved_ms(
        [
            (theirs.merge, reset_merge(theirs, w0)),
            (ours.merge, reset_merge(ours, w0)),
            (lambda: W.addmm_(B_d, A_d), lambda: W.copy_(w0)),
        ],
        repeats,
    )
    target = ">=6x, <=1.1x floor" if dtype == torch.float32 else ">=8x, <=1.25x floor"
    check = ulp_check(ours.get_base_layer().weight, theirs.get_base_layer().weight)
    rows.append(
        Row(
            "layer",
            f"merge() {label}",
            statistics.median(t),
            statistics.median(o),
            "W.addmm_(B, A)",
            statistics.median(f),
            target,
            check,
            paired_vs_floor=paired_ratio(o, f),
        )
    )
    t_ms = median_ms(theirs.unmerge, repeats, setup=lambda: theirs.merged_adapters.append("default"))
    o_ms = median_ms(ours.unmerge, repeats, setup=lambda: ours.merged_adapters.append("default"))
    rows.append(Row("layer", f"unmerge() {label}", t_ms, o_ms))


def bench_layers(rows: list[Row], quick: bool, repeats: int) -> None:
    for dtype in (torch.float32, torch.bfloat16):
        for in_f, out_f in SHAPES if not quick else SHAPES[:2]:
            bench_layer(rows, in_f, out_f, dtype, repeats)
            gc.collect()


def bench_many_adapters(rows: list[Row], quick: bool, repeats: int) -> None:
    n = 16 if not quick else 4
    theirs, ours, names = layer_pair(4096, 4096, torch.float32, n_adapters=n)
    w0 = theirs.get_base_layer().weight.detach().clone()

    def peft_in_turn() -> None:
        for name in names:
            theirs.merge(adapter_names=[name])

    t_ms = median_ms(peft_in_turn, max(1, repeats // 2), setup=reset_merge(theirs, w0))
    o_ms = median_ms(lambda: ours.merge(adapter_names=names), max(1, repeats // 2), setup=reset_merge(ours, w0))
    check = ulp_check(ours.get_base_layer().weight, theirs.get_base_layer().weight)
    rows.append(
        Row(
            "multi",
            f"merge {n} adapters into f32 4096x4096 (PEFT: {n} merges in turn)",
            t_ms,
            o_ms,
            target=">=10x",
            extra=check,
        )
    )


def tiny_llama(dtype: torch.dtype, quick: bool) -> nn.Module:
    from vblora_rs.demo import mini_models

    with torch.no_grad():
        model = mini_models.build("tinyllama", num_hidden_layers=22 if not quick else 4)
    return model.to(dtype)


def bench_merge_and_unload(rows: list[Row], quick: bool) -> None:
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    kwargs = dict(r=R, num_vectors=NUM_VECTORS, vector_length=VECTOR_LENGTH, topk=TOPK, target_modules=targets)
    base = tiny_llama(torch.bfloat16, quick)
    torch.manual_seed(1)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.VBLoRAConfig(**kwargs))
    ours = vblora_rs.get_peft_model(base, vblora_rs.VBLoRAConfig(**kwargs))
    ours.load_state_dict(theirs.state_dict())
    start = time.perf_counter()
    merged_t = theirs.merge_and_unload()
    t_ms = (time.perf_counter() - start) * 1e3
    start = time.perf_counter()
    merged_o = ours.merge_and_unload()
    o_ms = (time.perf_counter() - start) * 1e3
    worst = {"max_ulp": 0.0, "frac_le_1ulp": 1.0}
    sd_t = merged_t.state_dict()
    for key, value in merged_o.state_dict().items():
        if key.endswith("proj.weight"):
            c = ulp_check(value, sd_t[key])
            worst = {
                "max_ulp": max(worst["max_ulp"], c["max_ulp"]),
                "frac_le_1ulp": min(worst["frac_le_1ulp"], c["frac_le_1ulp"]),
            }
    n_layers = len(merged_o.model.layers)
    rows.append(
        Row(
            "model",
            f"merge_and_unload TinyLlama-shaped bf16 ({n_layers} layers x 7 projections)",
            t_ms,
            o_ms,
            target=">=4x",
            extra=worst,
        )
    )


def markdown(rows: list[Row]) -> str:
    lines = [
        "| section | measurement | PEFT ms | vblora_rs ms | speed-up | floor | floor ms | ours/floor "
        "| target | check |",
        "|---|---|---:|---:|---:|---|---:|---:|---|---|",
    ]
    for r in rows:
        peft_ms = f"{r.peft_ms:.2f}" if r.peft_ms is not None else ""
        speedup = f"{r.speedup:.2f}x" if r.speedup is not None else ""
        floor_ms = f"{r.floor_ms:.2f}" if r.floor_ms is not None else ""
        vs_floor = f"{r.vs_floor:.2f}" if r.vs_floor is not None else ""
        check = ", ".join(f"{k}={v:.3g}" for k, v in r.extra.items())
        lines.append(
            f"| {r.section} | {r.name} | {peft_ms} | {r.ours_ms:.2f} | {speedup} | {r.floor_name} | "
            f"{floor_ms} | {vs_floor} | {r.target} | {check} |"
        )
    return "\n".join(lines)


def plot(rows: list[Row], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r.speedup is not None]
    fig, ax = plt.subplots(figsize=(10, 0.35 * len(shown) + 1.5))
    ax.barh([r.name for r in shown][::-1], [r.speedup for r in shown][::-1], color="#3b7dd8")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("speed-up over PEFT (PEFT median / vblora_rs median, log scale)")
    ax.set_title("vblora_rs vs PEFT, same tensors, same run")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def cpu_model() -> str:
    """The CPU's model name and its vector extensions that matter here (from /proc/cpuinfo, Linux)."""
    try:
        with open("/proc/cpuinfo") as fh:
            info = fh.read()
    except OSError:
        import platform

        return platform.processor() or platform.machine()
    fields = dict(
        (key.strip(), value.strip()) for key, _, value in (line.partition(":") for line in info.splitlines()) if value
    )
    flags = set(fields.get("flags", "").split())
    wanted = ["avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16"]
    return f"{fields.get('model name', 'unknown CPU')} ({' '.join(f for f in wanted if f in flags) or 'no AVX2'})"


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller shapes and fewer repeats")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (default 7, quick 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch and vblora_rs threads (default 2)")
    parser.add_argument("--skip-model", action="store_true", help="skip the whole-model merge_and_unload section")
    parser.add_argument("--markdown", default=None, help="also write the table to this file")
    parser.add_argument("--png", default=None, help="draw the speed-ups to this PNG (needs matplotlib)")
    args = parser.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 7)
    torch.set_num_threads(args.threads)
    vblora_rs.set_num_threads(args.threads)
    header = (
        f"CPU {cpu_model()}, simd {vblora_rs._native.simd_level()} (of {', '.join(vblora_rs._native.simd_levels())}), "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}, "
        f"kernel threads {ops.thread_backend()}, "
        f"torch {torch.__version__}, peft {peft.__version__}, vblora_rs {vblora_rs.__version__}, "
        f"threads {args.threads}, repeats {repeats}{' (quick)' if args.quick else ''}"
    )
    print(header, file=sys.stderr)
    rows: list[Row] = []
    for step in (bench_topk, bench_layers, bench_many_adapters):
        print(f"running {step.__name__} ...", file=sys.stderr)
        step(rows, args.quick, repeats)
    if not args.skip_model:
        print("running bench_merge_and_unload ...", file=sys.stderr)
        bench_merge_and_unload(rows, args.quick)
    # decided by the first large top-K call (or VBLORA_RS_TOPK_PREFETCH), so read after the runs
    variant, how = vblora_rs._native.topk_prefetch()
    table = f"{header}, top-K prefetch {variant} ({how})\n\n{markdown(rows)}"
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(table + "\n")
    if args.png:
        plot(rows, args.png)


if __name__ == "__main__":
    main()
