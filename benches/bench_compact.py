"""Loading a compact top-K adapter: vblora_rs vs PEFT, side by side in one run.

Llama-2-7B shape (32 layers, hidden 4096, intermediate 11008, q/k/v/o/gate/up/down adapted), r=4,
num_vectors=2048, vector_length=256, topk=2. The base model is built on the meta device and given
uninitialised CPU storage (``to_empty``) that nobody touches, so no 7B weights are ever written. The top-K
adapter file is made directly from random indices and weights (PEFT's layout and dtypes).

Each side runs in its own fresh subprocess per repeat: build the base model, then PEFT's ``from_pretrained`` of
the adapter, with PEFT's own VB-LoRA classes (``vblora_rs.remove_from_peft()``) or with vblora_rs's backend
(``vblora_rs.apply_to_peft()``); the time of that call and the extra peak RSS it causes (VmHWM after minus VmRSS
before, with the kernel's peak counter reset just before the call) are reported as medians. Then one process loads
the same adapter ``--adapters`` times (``load_adapter`` under distinct names) and reports its RSS.

python benches/bench_compact.py [--repeats 3] [--adapters 1000] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

LAYERS, HIDDEN, INTER = 32, 4096, 11008
R, NUM_VECTORS, LENGTH, TOPK = 4, 2048, 256, 2
SHAPES = {  # module -> (in, out)
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (HIDDEN, HIDDEN),
    "self_attn.v_proj": (HIDDEN, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (HIDDEN, INTER),
    "mlp.up_proj": (HIDDEN, INTER),
    "mlp.down_proj": (INTER, HIDDEN),
}


def make_adapter(directory: str) -> int:
    """A PEFT-layout top-K checkpoint of the shape above; returns the weights file size."""
    import torch
    from safetensors.torch import save_file
    from vblora_rs import VBLoRAConfig

    g = torch.Generator().manual_seed(0)
    tensors = {}
    for layer in range(LAYERS):
        for module, (fan_in, fan_out) in SHAPES.items():
            key = f"base_model.model.model.layers.{layer}.{module}"
            for name, grid in (("A", (R, fan_in // LENGTH)), ("B", (fan_out // LENGTH, R))):
                scores = torch.rand(*grid, NUM_VECTORS, generator=g)
                idx = scores.topk(TOPK, dim=-1).indices  # distinct indices per sub-vector
                w = torch.softmax(torch.randn(*grid, TOPK, generator=g), dim=-1)
                tensors[f"{key}.vblora_logits_{name}_topk_indices"] = idx.to(torch.int16)
                tensors[f"{key}.vblora_logits_{name}_topk_weights"] = w[..., :-1].contiguous()
    tensors["base_model.vblora_vector_bank"] = torch.rand(NUM_VECTORS, LENGTH, generator=g) * 0.04 - 0.02
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "adapter_model.safetensors")
    save_file(tensors, path, metadata={"format": "pt"})
    config = VBLoRAConfig(
        r=R,
        num_vectors=NUM_VECTORS,
        vector_length=LENGTH,
        topk=TOPK,
        target_modules=[m.split(".")[1] for m in SHAPES],
        save_only_topk_weights=True,
        task_type="CAUSAL_LM",
    )
    config.save_pretrained(directory)
    return os.path.getsize(path)


# --- one measurement, in a fresh process -------------------------------------------------------------


def _status(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as fh:  # "5" resets VmHWM to the current RSS
        fh.write("5")


def build_base():  # type: ignore[no-untyped-def]
    import torch
    from vblora_rs.demo import mini_models

    with torch.device("meta"):
        model = mini_models.build("llama-7b", hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS)
    return model.to_empty(device="cpu")  # uninitialised storage, never touched


# The VB-LoRA tuner's own hooks, the only places where the two sides run different code during from_pretrained
# (PEFT's injection and loading machinery calls them); everything else is shared.
METHOD_HOOKS = ("_pre_injection_hook", "_create_and_replace", "_remap_adapter_state_dict_for_load")


def _timed(owner: object, name: str, spent: dict[str, float], key: str) -> None:
    """Replace ``owner.name`` (a function, or a classmethod of a class) with one that adds its run time to
    ``spent[key]``. Used on top-level calls only (none of them calls another), so nothing is counted twice."""
    raw = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
    is_classmethod = isinstance(raw, classmethod)
    inner = raw.__func__ if is_classmethod else raw

    def timed(*args, **kwargs):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            spent[key] += time.perf_counter() - start

    setattr(owner, name, classmethod(timed) if is_classmethod else timed)


def measure(side: str, adapter: str) -> dict:
    import gc

    import torch

    torch.set_num_threads(2)
    import peft.utils.transformers_weight_conversion as weight_conversion
    import vblora_rs
    from peft import PeftModel
    from peft.tuners.vblora import VBLoRAModel as PeftVBLoRAModel
    from vblora_rs.tuner.model import VBLoRAModel as OurVBLoRAModel

    if side == "peft":
        vblora_rs.remove_from_peft()  # PEFT's own classes (importing vblora_rs alone changes nothing; be explicit)
    else:
        vblora_rs.apply_to_peft()
    spent = {"method": 0.0, "conversion": 0.0}
    for hook in METHOD_HOOKS:  # each side's tuner defines all three itself
        _timed(PeftVBLoRAModel if side == "peft" else OurVBLoRAModel, hook, spent, "method")
    # transformers' checkpoint conversion table, built by PEFT's injection for any method (regex compiles)
    _timed(weight_conversion, "get_model_conversion_mapping", spent, "conversion")
    base = build_base()
    gc.collect()
    before = _status("VmRSS")
    _reset_peak()
    start = time.perf_counter()
    model = PeftModel.from_pretrained(base, adapter)
    seconds = time.perf_counter() - start
    peak = _status("VmHWM")
    after = _status("VmRSS")
    tuner = type(model.base_model)
    if (tuner is PeftVBLoRAModel) != (side == "peft") or not issubclass(tuner, PeftVBLoRAModel):
        raise SystemExit(f"{side}: loaded with {tuner.__module__}.{tuner.__name__}")
    del model
    return {
        "seconds": seconds,
        "method_seconds": spent["method"],
        "conversion_seconds": spent["conversion"],
        "extra_peak": peak - before,
        "extra_kept": after - before,
    }


def hold_many(adapter: str, count: int) -> dict:
    import gc

    import torch
    from vblora_rs import PeftModel

    torch.set_num_threads(2)
    base = build_base()
    gc.collect()
    before = _status("VmRSS")
    start = time.perf_counter()
    model = PeftModel.from_pretrained(base, adapter, adapter_name="a0")
    marks = []  # seconds for each tenth of the adapters: load_adapter's cost as the process fills up
    last = start
    for i in range(1, count):
        model.load_adapter(adapter, f"a{i}")
        if (i + 1) % max(count // 10, 1) == 0:
            now = time.perf_counter()
            marks.append(now - last)
            last = now
    seconds = time.perf_counter() - start
    gc.collect()
    return {
        "adapters": len(model.peft_config),
        "seconds": seconds,
        "rss": _status("VmRSS"),
        "extra_rss": _status("VmRSS") - before,
        "peak_rss": _status("VmHWM"),
        "tenths": marks,
    }


def run_child(*args: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", *args], check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--adapters", type=int, default=1000, help="adapters held by one process (0: skip)")
    parser.add_argument("--markdown", default=None, help="also write the table to this file")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        result = measure(rest[0], rest[1]) if kind == "load" else hold_many(rest[0], int(rest[1]))
        print(json.dumps(result))
        return

    MiB = 2**20
    with tempfile.TemporaryDirectory(prefix="vblora_bench_compact_") as tmp:
        adapter = os.path.join(tmp, "adapter")
        size = make_adapter(adapter)
        runs: dict[str, list[dict]] = {"peft": [], "vblora_rs": []}
        for _ in range(args.repeats):  # interleaved, so drift hits both sides alike
            for side in runs:
                runs[side].append(run_child("load", side, adapter))

        def med(side: str, key: str) -> float:
            return statistics.median(r[key] for r in runs[side])

        lines = [
            f"Top-K adapter file: {size:,d} bytes (Llama-2-7B shape, r={R}, num_vectors={NUM_VECTORS}, "
            f"vector_length={LENGTH}, topk={TOPK}); medians of {args.repeats} fresh processes per side.",
            "",
            "| from_pretrained | PEFT | vblora_rs | ratio |",
            "| --- | ---: | ---: | ---: |",
            f"| time | {med('peft', 'seconds') * 1e3:.0f} ms | {med('vblora_rs', 'seconds') * 1e3:.1f} ms | "
            f"{med('peft', 'seconds') / med('vblora_rs', 'seconds'):.1f}x faster |",
            f"| extra peak RSS | {med('peft', 'extra_peak') / MiB:.1f} MiB | "
            f"{med('vblora_rs', 'extra_peak') / MiB:.2f} MiB | "
            f"{med('peft', 'extra_peak') / max(med('vblora_rs', 'extra_peak'), 1):.0f}x less |",
            f"| extra RSS kept | {med('peft', 'extra_kept') / MiB:.1f} MiB | "
            f"{med('vblora_rs', 'extra_kept') / MiB:.2f} MiB | "
            f"{med('peft', 'extra_kept') / max(med('vblora_rs', 'extra_kept'), 1):.0f}x less |",
        ]
        for key, label in (
            ("method_seconds", "of which in the VB-LoRA tuner's hooks"),
            ("conversion_seconds", "of which transformers' conversion table"),
        ):
            lines.append(
                f"| {label} | {med('peft', key) * 1e3:.0f} ms | {med('vblora_rs', key) * 1e3:.1f} ms | |"
            )
        shared = [r["seconds"] - r["method_seconds"] for r in runs["vblora_rs"]]
        lines.append(
            f"| the rest: PEFT's injection and loading, shared | "
            f"{statistics.median(r['seconds'] - r['method_seconds'] for r in runs['peft']) * 1e3:.0f} ms | "
            f"{statistics.median(shared) * 1e3:.1f} ms | |"
        )
        speed = med("peft", "seconds") / med("vblora_rs", "seconds")
        memory = med("peft", "extra_peak") / max(med("vblora_rs", "extra_peak"), 1)
        lines += [
            "",
            f"Targets: >= 10x faster: {speed:.1f}x ({'met' if speed >= 10 else 'NOT met'}); >= 50x less extra peak "
            f"memory: {memory:.0f}x ({'met' if memory >= 50 else 'NOT met'}). Machine load average at the end "
            f"(1, 5, 15 min): {', '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs.",
            f"Floor: PEFT's from_pretrained outside the VB-LoRA hooks (code any tuner served through it runs) took "
            f"{statistics.median(shared) * 1e3:.1f} ms of our load; at that cost alone a load through "
            f"PeftModel.from_pretrained is at most {med('peft', 'seconds') / statistics.median(shared):.1f}x faster "
            "than PEFT's here.",
        ]
        print("\n".join(lines), flush=True)  # the side-by-side table, before the long single-side run
        if args.adapters:
            many = run_child("many", adapter, str(args.adapters))
            tenths = ", ".join(f"{t:.1f}" for t in many["tenths"])
            more = [
                "",
                f"One process holding {many['adapters']} such adapters (vblora_rs, `load_adapter`): RSS "
                f"{many['rss'] / 2**30:.2f} GiB ({many['extra_rss'] / MiB / many['adapters']:.2f} MiB per adapter "
                f"over the base model), peak {many['peak_rss'] / 2**30:.2f} GiB, loaded in {many['seconds']:.1f} s "
                f"(seconds per tenth of the adapters, in order: {tenths}).",
            ]
            print("\n".join(more))
            lines += more
    text = "\n".join(lines)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
