"""Training on a quantized base, side by side: step time and peak memory of

- VB-LoRA (vblora_rs) on a 4-bit NF4 base (double quantization, bf16 compute: the QLoRA recipe),
- PEFT's VB-LoRA on the same 4-bit base,
- PEFT's LoRA on the same 4-bit base (QLoRA),
- VB-LoRA (vblora_rs) on the bf16 base.

Every configuration runs in a fresh Python process (peaks do not mix): it loads the model, prepares it as QLoRA
does (``prepare_model_for_kbit_training`` for the 4-bit bases, gradient checkpointing for all), runs warm-up steps,
then times full training steps (forward, backward, AdamW step). Memory: on CUDA the peak of
``torch.cuda.max_memory_allocated`` over the timed steps; on CPU the process's peak resident set (VmHWM) over the
timed steps (reset before them through /proc/self/clear_refs where the kernel allows it, after handing memory
freed while loading back to the system), the same above the resident set after the imports (torch, transformers,
peft, bitsandbytes: alike in every configuration), and the resident set once the model is loaded.

CPU runs use one thread unless ``--threads N`` (see the option's comment).

    PYTHONPATH=python python benches/bench_quantized.py [--quick] [--steps N] [--hidden H] [--layers L] [--threads N]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

CONFIGS = {
    "vblora-nf4": "VB-LoRA (vblora_rs), NF4 base",
    "peft-vblora-nf4": "VB-LoRA (PEFT), NF4 base",
    "peft-lora-nf4": "LoRA (PEFT), NF4 base = QLoRA",
    "vblora-bf16": "VB-LoRA (vblora_rs), bf16 base",
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets the peak resident set size (VmHWM)
        return True
    except OSError:
        return False


def _release_free_memory() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _tensor_mib(model: Any) -> float:
    """MiB held by the model's parameters and buffers (each storage once), with bitsandbytes' 4-bit block scales."""
    seen: dict[int, int] = {}

    def add(t: Any) -> None:
        if t is not None and t.device.type != "meta":
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

    for t in [*model.parameters(), *model.buffers()]:
        add(t)
        state = getattr(t, "quant_state", None)
        if state is not None:
            add(state.absmax)
            add(getattr(state.state2, "absmax", None) if getattr(state, "state2", None) is not None else None)
    return sum(seen.values()) / 2**20


def _optimizer_mib(optimizer: Any) -> float:
    tensors = [v for state in optimizer.state.values() for v in state.values() if hasattr(v, "numel")]
    return sum(v.numel() * v.element_size() for v in tensors) / 2**20


def worker(config: str, folder: str, args: argparse.Namespace) -> dict[str, Any]:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import bitsandbytes  # noqa: F401 - imported by every configuration, so the baselines below are alike
    import peft
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    import vblora_rs

    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if not cuda:
        torch.set_num_threads(args.threads)
    rss_imports = _status_kb("VmRSS")
    if config.endswith("nf4"):
        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        placement = {"device_map": device} if cuda else {}
        model = AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=quant, dtype=torch.bfloat16, **placement
        )
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(device)
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    vb = peft.VBLoRAConfig(
        r=4, num_vectors=256, vector_length=args.vector_length, topk=2, target_modules=TARGETS, task_type="CAUSAL_LM"
    )
    if config == "peft-lora-nf4":
        model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    elif config == "peft-vblora-nf4":
        vblora_rs.remove_from_peft()
        model = peft.get_peft_model(model, vb)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    else:
        vblora_rs.apply_to_peft()
        model = peft.get_peft_model(model, vb)
        optimizer = vblora_rs.create_optimizer(model)
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    generator = torch.Generator().manual_seed(1)
    batch = torch.randint(0, args.vocab, (args.batch, args.seq), generator=generator).to(device)

    def step() -> tuple[float, float]:
        start, cpu = time.perf_counter(), time.process_time()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start, time.process_time() - cpu

    _release_free_memory()  # what loading freed, glibc may still hold: not the model's
    rss_loaded = _status_kb("VmRSS")
    for _ in range(args.warmup):
        step()
    _release_free_memory()
    reset = _reset_peak()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    measured = [step() for _ in range(args.steps)]
    weights_mb, optimizer_mb = _tensor_mib(model), _optimizer_mib(optimizer)
    times = [wall for wall, _ in measured]
    return {
        "config": config,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "cpu_median_s": statistics.median(cpu for _, cpu in measured),
        "trainable": trainable,
        "rss_imports_mb": rss_imports / 1024,
        "weights_mb": weights_mb,
        "optimizer_mb": optimizer_mb,
        "rss_loaded_mb": rss_loaded / 1024,
        "peak_mb": (torch.cuda.max_memory_allocated() / 2**20) if cuda else _status_kb("VmHWM") / 1024,
        "peak_reset": reset or cuda,
        "device": torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads",
    }


def save_base(args: argparse.Namespace, folder: str) -> None:
    import torch
    from vblora_rs.demo import mini_models

    mini_models.save(
        "llama",
        folder,
        dtype=torch.bfloat16,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
        vocab_size=args.vocab,
        max_position_embeddings=max(args.seq, 128),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small model and few steps (a smoke run)")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--vector-length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    # one thread by default: on a shared machine OpenMP threads spin at their barriers while another job holds the
    # core, which multiplies both wall and CPU time by several times at random
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--worker", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.intermediate, args.layers, args.vocab, args.seq = 256, 512, 2, 512, 32
        args.steps, args.warmup, args.vector_length = 3, 1, 64
    if args.worker:
        print(json.dumps(worker(args.worker, args.folder, args)))
        return
    folder = tempfile.mkdtemp(prefix="bench_quantized_")
    save_base(args, folder)
    passed = [a for a in sys.argv[1:] if a != "--quick"]
    if args.quick:  # the worker gets the quick sizes explicitly
        passed += ["--hidden", "256", "--intermediate", "512", "--layers", "2", "--vocab", "512", "--seq", "32"]
        passed += ["--steps", "3", "--warmup", "1", "--vector-length", "64"]
    results = {}
    for config in CONFIGS:
        cmd = [sys.executable, __file__, "--worker", config, "--folder", folder, *passed]
        run = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
        if run.returncode != 0 or not lines:
            print(f"{config}: failed (exit {run.returncode}):\n{run.stderr[-2000:]}", file=sys.stderr)
            continue
        results[config] = json.loads(lines[-1])
    if not results:
        sys.exit(1)
    first = next(iter(results.values()))
    print(
        f"Llama hidden={args.hidden} intermediate={args.intermediate} layers={args.layers} vocab={args.vocab}, "
        f"batch {args.batch} x {args.seq} tokens, gradient checkpointing, AdamW; {first['device']}; "
        f"median of {args.steps} steps after {args.warmup} warm-up"
    )
    cpu_run = "CPU" in first["device"]
    memory = "peak RSS MiB" if cpu_run else "peak MiB (CUDA)"
    print(
        f"{'configuration':32} {'trainable':>10} {'median ms':>10} {'min ms':>8} {'CPU ms':>8} {'time ratio':>10} "
        f"{'weights MiB':>11} {'optim MiB':>9} {memory:>13} {'above imports':>13} {'RSS loaded':>10}"
    )
    ref = results.get("vblora-nf4")
    key = "cpu_median_s" if cpu_run else "median_s"  # a shared CPU: the process's CPU time is the stable figure
    for config, r in results.items():
        ratio = f"{r[key] / ref[key]:.2f}x" if ref else "-"
        peak = f"{r['peak_mb']:.0f}" + ("" if r["peak_reset"] else "*")
        above = f"{r['peak_mb'] - r['rss_imports_mb']:.0f}" if cpu_run else "-"
        print(
            f"{CONFIGS[config]:32} {r['trainable']:>10,} {1000 * r['median_s']:10.1f} {1000 * r['min_s']:8.1f} "
            f"{1000 * r['cpu_median_s']:8.1f} {ratio:>10} {r['weights_mb']:11.1f} {r['optimizer_mb']:9.1f} {peak:>13} "
            f"{above:>13} {r['rss_loaded_mb']:10.0f}"
        )
    what = "median CPU time per step" if cpu_run else "median step time"
    print(f"time ratio: {what} / that of VB-LoRA (vblora_rs) on the NF4 base; weights: parameters, buffers and")
    print("4-bit block scales of the model (each storage once); optim: AdamW's state; RSS: resident set of the process")
    if not all(r["peak_reset"] for r in results.values()):
        print("*: the peak could not be reset after loading (it includes loading)")


if __name__ == "__main__":
    main()
