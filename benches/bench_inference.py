"""Decoding and training cost of VB-LoRA on a GPT-2 small shaped model: bare model, PEFT LoRA, PEFT VB-LoRA (PEFT's
own classes) and vblora_rs (the same ``peft.get_peft_model`` call after ``vblora_rs.apply_to_peft()``), all
unmerged, in one process on identical base weights.

    python benches/bench_inference.py                # full run
    python benches/bench_inference.py --quick        # short run
    python benches/bench_inference.py --markdown table.md

Decoding: one token at batch 1 x 1, eval mode, under no_grad. Each round times every model in turn (interleaved,
so load from other processes hits all of them alike), keeping the fastest of a few calls; the overhead of a model
is the median over rounds of (its time - the bare model's time in the same round). Targets: our overhead at most
1.2x PEFT LoRA's, and at least 3x smaller than PEFT VB-LoRA's. Training: forward + backward + AdamW step on a
small batch, ours against PEFT VB-LoRA (target: ratio at most 1.05), interleaved the same way.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import warnings
from typing import Callable, Optional

import torch
from torch import nn

warnings.filterwarnings("ignore")

import peft  # noqa: E402
import vblora_rs  # noqa: E402
from peft.tuners.vblora import VBLoRAModel as PeftVBLoRAModel  # noqa: E402
from vblora_rs.demo import mini_models  # noqa: E402
from vblora_rs.training.optim import param_groups  # noqa: E402

TARGETS = ["c_attn", "c_proj", "c_fc"]
R, NUM_VECTORS, TOPK = 4, 256, 2


def vector_length(sizes: list[int]) -> int:
    """The largest of 256, 128, 64 dividing every adapted dimension."""
    for length in (256, 128, 64):
        if all(size % length == 0 for size in sizes):
            return length
    raise SystemExit(f"no vector_length in (256, 128, 64) divides {sizes}")


def gpt2_small(seed: int) -> nn.Module:
    return mini_models.build("gpt2-small", seed)  # n_embd 768, 12 layers, 12 heads, vocab 50257


def build_models(seed: int) -> dict[str, nn.Module]:
    base = gpt2_small(seed)
    cfg = base.config
    length = vector_length([cfg.n_embd, 3 * cfg.n_embd, 4 * cfg.n_embd])
    common = {"r": R, "target_modules": TARGETS, "fan_in_fan_out": True}
    vb = {**common, "num_vectors": NUM_VECTORS, "vector_length": length, "topk": TOPK}
    lora = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**common))
    vblora_rs.remove_from_peft()  # PEFT's own VB-LoRA classes
    peft_vb = peft.get_peft_model(copy.deepcopy(base), peft.VBLoRAConfig(**vb))
    vblora_rs.apply_to_peft()  # the same PEFT calls, served by vblora_rs
    ours = peft.get_peft_model(copy.deepcopy(base), peft.VBLoRAConfig(**vb))
    if type(peft_vb.base_model) is not PeftVBLoRAModel or not isinstance(ours.base_model, vblora_rs.VBLoRAModel):
        raise SystemExit("the PEFT and vblora_rs sides do not use the classes they should")
    # identical adapters: ours gets PEFT's logits and bank, and must give PEFT's outputs
    adapter = {k: v for k, v in peft_vb.state_dict().items() if "vblora_" in k}
    missing = ours.load_state_dict(adapter, strict=False)
    if missing.unexpected_keys:
        raise SystemExit(f"state dict layouts differ: {missing.unexpected_keys[:3]}")
    return {"bare": base, "peft_lora": lora, "peft_vblora": peft_vb, "ours": ours}


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def bench_decode(models: dict[str, nn.Module], rounds: int, calls: int) -> dict[str, list[float]]:
    """Per round and model: the fastest of ``calls`` forwards of one token (ms). On a machine shared with other
    busy processes the fastest call is the one least disturbed, so the round's minimum tracks the model's own cost
    far better than a mean."""
    ids = torch.tensor([[464]])
    runs: dict[str, Callable[[], object]] = {}
    for name, model in models.items():
        model.eval()

        def run(model: nn.Module = model) -> None:
            model(input_ids=ids, use_cache=False)

        runs[name] = run
    with torch.no_grad():
        for run in runs.values():  # warm up (first calls allocate, ours fills its cache)
            run()
            run()
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(rounds):
            for name, run in runs.items():
                times[name].append(min(timed(run) for _ in range(calls)))
    return times


def check_outputs(models: dict[str, nn.Module]) -> float:
    """Largest |ours - PEFT VB-LoRA| over the logits of a short sequence (eval, no_grad)."""
    ids = torch.arange(8)[None] * 97 % 50257
    with torch.no_grad():
        a = models["ours"](input_ids=ids).logits
        b = models["peft_vblora"](input_ids=ids).logits
    return (a - b).abs().max().item()


def bench_train(models: dict[str, nn.Module], rounds: int, batch: int, seq: int) -> dict[str, list[float]]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50257, (batch, seq), generator=generator)
    steps: dict[str, Callable[[], object]] = {}
    for name in ("peft_vblora", "ours"):
        model = models[name]
        model.train()
        optimizer = torch.optim.AdamW(param_groups(model))

        def step(model: nn.Module = model, optimizer: torch.optim.Optimizer = optimizer) -> None:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        steps[name] = step
    for step in steps.values():
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            times[name].append(timed(step))
    return times


def paired_overhead(times: dict[str, list[float]], name: str) -> float:
    return statistics.median(t - b for t, b in zip(times[name], times["bare"]))


def spread(values: list[float]) -> str:
    q = statistics.quantiles(values, n=4)
    return f"{q[0]:.2f}-{q[2]:.2f}"


def markdown(decode: dict[str, list[float]], train: dict[str, list[float]], max_diff: float, args) -> str:  # type: ignore[no-untyped-def]
    labels = {"bare": "bare model", "peft_lora": "PEFT LoRA", "peft_vblora": "PEFT VB-LoRA", "ours": "vblora_rs"}
    lines = [
        f"GPT-2 small (random weights), targets {', '.join(TARGETS)}, r={R}, num_vectors={NUM_VECTORS}, "
        f"torch threads {torch.get_num_threads()}; ours vs PEFT VB-LoRA max |diff| of logits {max_diff:.2e}",
        "",
        f"Decoding one token, batch 1 x 1, eval, no_grad ({args.rounds} interleaved rounds, fastest of {args.calls} "
        "calls per round and model):",
        "",
        "| model | median ms | IQR ms | overhead over bare (paired median) ms |",
        "|---|---:|---:|---:|",
    ]
    for name, label in labels.items():
        overhead = "" if name == "bare" else f"{paired_overhead(decode, name):.3f}"
        lines.append(f"| {label} | {statistics.median(decode[name]):.3f} | {spread(decode[name])} | {overhead} |")
    ours, lora, peft_vb = (paired_overhead(decode, n) for n in ("ours", "peft_lora", "peft_vblora"))
    lines += [
        "",
        f"- ours overhead / PEFT LoRA overhead: {ours / lora:.2f} (target <= 1.2)",
        f"- PEFT VB-LoRA overhead / ours overhead: {peft_vb / ours:.2f} (target >= 3)",
        "",
        f"Training step, forward + backward + AdamW, batch {args.batch} x {args.seq} ({args.train_rounds} interleaved "
        "rounds):",
        "",
        "| model | median ms | IQR ms |",
        "|---|---:|---:|",
    ]
    for name in ("peft_vblora", "ours"):
        lines.append(f"| {labels[name]} | {statistics.median(train[name]):.1f} | {spread(train[name])} |")
    paired = statistics.median(o / p for o, p in zip(train["ours"], train["peft_vblora"]))
    lines += ["", f"- ours / PEFT VB-LoRA step time (paired median): {paired:.3f} (target <= 1.05)"]
    noisy = [labels[n] for n, t in {**decode, **train}.items() if noise(t) > 0.25]
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    lines += [
        f"- machine load average at the end (1, 5, 15 min): {load} on {os.cpu_count()} CPUs"
        + (f"; noisy (IQR over 25% of the median): {', '.join(sorted(set(noisy)))}" if noisy else "")
    ]
    return "\n".join(lines)


def noise(values: list[float]) -> float:
    q = statistics.quantiles(values, n=4)
    return (q[2] - q[0]) / statistics.median(values)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--threads", type=int, default=2, help="torch (and vblora_rs) threads (default 2)")
    parser.add_argument("--rounds", type=int, default=None, help="decoding rounds (default 200, quick 30)")
    parser.add_argument("--calls", type=int, default=5, help="forwards per model per round, fastest kept (default 5)")
    parser.add_argument("--train-rounds", type=int, default=None, help="training rounds (default 30, quick 5)")
    parser.add_argument("--batch", type=int, default=2, help="training batch (default 2)")
    parser.add_argument("--seq", type=int, default=32, help="training sequence length (default 32)")
    parser.add_argument("--markdown", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (30 if args.quick else 200)
    args.train_rounds = args.train_rounds or (5 if args.quick else 30)
    torch.set_num_threads(args.threads)

    models = build_models(seed=0)
    max_diff = check_outputs(models)
    decode = bench_decode(models, args.rounds, args.calls)
    train = bench_train(models, args.train_rounds, args.batch, args.seq)
    table = markdown(decode, train, max_diff, args)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(table + "\n")


if __name__ == "__main__":
    sys.exit(main())
