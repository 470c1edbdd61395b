"""``vblora merge`` against the PEFT pipeline and a plain ``cp``, each as one fresh process, side by side.

    python benches/bench_cli_merge.py                  # TinyLlama-1.1B-shaped bf16 model, 3 rounds
    python benches/bench_cli_merge.py --layers 4       # smaller model, same shapes per layer
    python benches/bench_cli_merge.py --workdir /tmp/b # keep (and reuse) the model and adapter there

Builds once (torch and peft are fine here): a random LlamaForCausalLM of TinyLlama-1.1B's shape in
bfloat16, saved with ``save_pretrained``, and a VB-LoRA top-K adapter on all seven projections (r=4,
num_vectors=2048, vector_length=256, topk=2). Then, in rounds, runs as fresh processes:

* PEFT: load the base with transformers, ``PeftModel.from_pretrained``, ``merge_and_unload``,
  ``save_pretrained`` (what a user would run);
* ours: ``python -m vblora_rs merge BASE ADAPTER -o OUT`` (no torch);
* cp: ``cp`` of the base's safetensors files (the floor for reading and writing the bytes).

Wall time is measured around each process, peak RSS is the process's own ``ru_maxrss`` (``os.wait4``).
Outputs are deleted and ``sync`` run between processes, so dirty pages of one run do not slow the next;
the base's files are read once first so every run starts from a warm page cache. Finally our merged
tensors are compared with PEFT's: exact ulp distances of the bfloat16 weights.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

PEFT_PIPELINE = """
import sys, warnings
warnings.filterwarnings("ignore")
import torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
model = PeftModel.from_pretrained(model, adapter)
merged = model.merge_and_unload()
merged.save_pretrained(out)
"""


def build(workdir: Path, layers: int) -> tuple[Path, Path]:
    """The base model and adapter (reused when already in ``workdir``)."""
    base, adapter = workdir / "base", workdir / "adapter"
    if (base / "config.json").exists() and (adapter / "adapter_config.json").exists():
        return base, adapter
    import peft
    import torch
    from vblora_rs.demo import mini_models

    print(f"building a {layers}-layer TinyLlama-shaped bf16 model in {workdir} ...", flush=True)
    torch.set_default_dtype(torch.bfloat16)
    model = mini_models.build("tinyllama", num_hidden_layers=layers)
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(base)
    vb = peft.VBLoRAConfig(
        target_modules=PROJECTIONS,
        r=4,
        num_vectors=2048,
        vector_length=256,
        topk=2,
        save_only_topk_weights=True,
    )
    peft.get_peft_model(model, vb).save_pretrained(adapter)
    return base, adapter


def cmd_for(cmd: list[str], name: str, out: Path) -> list[str]:
    """The command of one run: ours and cp take the output folder last."""
    return cmd if name == "PEFT pipeline" else [*cmd, str(out)]


def weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def run(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one fresh process.

    The RSS comes from GNU time when it is there: ``ru_maxrss`` of a child forked straight from this
    process also counts the pages it shared with us before ``exec`` (``cp`` showed as 79 MiB)."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as report:
        timed = ["/usr/bin/time", "-f", "%M", "-o", report.name, *cmd] if os.path.exists("/usr/bin/time") else cmd
        start = time.perf_counter()
        proc = subprocess.Popen(timed, env=env, stdout=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise SystemExit(f"{cmd[:3]} failed with status {proc.returncode}")
        text = report.read().strip()
    max_kib = int(text.splitlines()[-1]) if timed is not cmd else usage.ru_maxrss
    return wall, max_kib / 1024


def compare(ours: Path, theirs: Path) -> dict[str, float]:
    """Exact ulp distances between our merged bf16 tensors and PEFT's, over every element."""
    import torch
    from safetensors import safe_open

    def ordered(x: torch.Tensor) -> torch.Tensor:
        i = x.view(torch.int16).to(torch.int32)
        return torch.where(i < 0, -(i & 0x7FFF), i)

    def tensors(folder: Path) -> dict[str, Path]:
        out = {}
        for f in weight_files(folder):
            with safe_open(f, "pt") as fh:
                out.update(dict.fromkeys(fh.keys(), f))
        return out

    ours_at, theirs_at = tensors(ours), tensors(theirs)
    assert ours_at.keys() == theirs_at.keys(), set(ours_at) ^ set(theirs_at)
    total = exact = within_one = 0
    worst, worst_abs = 0, 0.0
    for name, path in ours_at.items():
        with safe_open(path, "pt") as a, safe_open(theirs_at[name], "pt") as b:
            x, y = a.get_tensor(name), b.get_tensor(name)
        assert x.dtype == y.dtype == torch.bfloat16 and x.shape == y.shape, name
        d = (ordered(x) - ordered(y)).abs()
        total += d.numel()
        exact += int((d == 0).sum())
        within_one += int((d <= 1).sum())
        if int(d.max()) > 1:  # large ulp counts only happen where the merged value is near 0
            worst_abs = max(worst_abs, float((x.float() - y.float()).abs()[d > 1].max()))
        worst = max(worst, int(d.max()))
    return {
        "elements": total,
        "exact": exact,
        "within_1_ulp": within_one,
        "max_ulp": worst,
        "max_abs_beyond_1_ulp": worst_abs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=22, help="decoder layers (TinyLlama-1.1B: 22)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the three runs (default 3)")
    parser.add_argument("--workdir", type=Path, help="keep the model, adapter and outputs here")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_cli_merge."))
    workdir.mkdir(parents=True, exist_ok=True)
    base, adapter = build(workdir, args.layers)
    size = sum(f.stat().st_size for f in weight_files(base))
    for f in weight_files(base):  # warm the page cache once, for every run alike
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass

    env = {**os.environ, "PYTHONPATH": str(ROOT / "python")}
    outs = {"PEFT pipeline": workdir / "out_peft", "vblora merge": workdir / "out_ours", "cp": workdir / "out_cp"}
    commands = {
        "PEFT pipeline": [sys.executable, "-c", PEFT_PIPELINE, str(base), str(adapter), str(outs["PEFT pipeline"])],
        "vblora merge": [sys.executable, "-m", "vblora_rs", "merge", str(base), str(adapter), "-o"],
        "cp": ["cp", *map(str, weight_files(base))],
    }
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in commands}
    for r in range(args.rounds):
        # ours and cp back to back, in alternating order, so that both meet the same machine state.
        pair = ["vblora merge", "cp"] if r % 2 == 0 else ["cp", "vblora merge"]
        for name in ["PEFT pipeline", *pair]:
            out = outs[name]
            shutil.rmtree(out, ignore_errors=True)
            if name == "cp":
                out.mkdir()
            os.sync()
            full = cmd_for(commands[name], name, out)
            results[name].append(run(full, env))
            print(f"round {r + 1} {name}: {results[name][-1][0]:.2f} s, {results[name][-1][1]:.0f} MiB", flush=True)
            if r + 1 < args.rounds or name == "cp":
                shutil.rmtree(out, ignore_errors=True)
            os.sync()

    check = compare(outs["vblora merge"], outs["PEFT pipeline"])
    med = {k: (statistics.median(w for w, _ in v), statistics.median(m for _, m in v)) for k, v in results.items()}
    peft_wall, peft_rss = med["PEFT pipeline"]
    cp_wall = med["cp"][0]
    print()
    print(f"Model: {args.layers}-layer TinyLlama-1.1B shape, bf16, {size / 2**30:.2f} GiB of safetensors; ", end="")
    print(f"adapter: VB-LoRA top-K on all 7 projections. Medians of {args.rounds} fresh processes each.")
    print()
    print("| run | wall s | peak RSS MiB | PEFT wall / this | RSS / PEFT's | wall / cp's | all runs (s, MiB) |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, (wall, rss) in med.items():
        runs = ", ".join(f"{w:.2f}/{m:.0f}" for w, m in results[name])
        print(
            f"| {name} | {wall:.2f} | {rss:.0f} | {peft_wall / wall:.2f}x | {rss / peft_rss:.1%} | "
            f"{wall / cp_wall:.2f}x | {runs} |"
        )
    ours_wall, ours_rss = med["vblora merge"]
    per_round = [o[0] / c[0] for o, c in zip(results["vblora merge"], results["cp"])]
    print()
    print(f"vblora merge / cp wall, per round (back to back): {', '.join(f'{x:.2f}x' for x in per_round)}")
    print()
    print(
        f"Targets: speed-up >= 4x: {peft_wall / ours_wall:.2f}x ({'met' if peft_wall / ours_wall >= 4 else 'MISSED'}); "
        f"RSS <= 15% of PEFT's: {ours_rss / peft_rss:.1%} ({'met' if ours_rss <= 0.15 * peft_rss else 'MISSED'}); "
        f"wall <= 2x cp: {ours_wall / cp_wall:.2f}x ({'met' if ours_wall <= 2 * cp_wall else 'MISSED'})"
    )
    n = check["elements"]
    print(
        f"Merged bf16 weights vs PEFT's, {n:,} elements: {check['exact']:,} identical "
        f"({check['exact'] / n:.5%}), {check['within_1_ulp']:,} within 1 ulp ({check['within_1_ulp'] / n:.5%}); "
        f"{n - check['within_1_ulp']:,} beyond 1 ulp (max {check['max_ulp']} ulp, "
        f"max |difference| among those {check['max_abs_beyond_1_ulp']:.3g})"
    )
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
