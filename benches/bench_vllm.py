"""Serving VB-LoRA adapters with vLLM by name: disk bytes, cold time to first token, warm time per token.

    python benches/bench_vllm.py                      # in the vLLM virtualenv of `make test-vllm`
    python benches/bench_vllm.py --adapters 200 --cold 5 --markdown table.md
    python benches/bench_vllm.py --adapter-dir DIR    # the vb-* adapters of an earlier run

On SmolLM2-135M-Instruct in float32 (the demo's model), ``--adapters`` VB-LoRA adapters of ours (r=4 on all seven
projections of the 30 blocks, a 256 x 64 bank, top-2, saved top-K as PEFT's ``save_only_topk_weights``), each with
its own random bank and logits:

* bytes on disk: the VB-LoRA folders against the same adapters as LoRA (``vblora to-lora`` through the resolver's
  cache). A LoRA's size follows from the shapes (float32 factors under the same keys), so ``--convert`` adapters
  are converted, timed and checked to be one size, and the LoRA total is the count times that size;
* cold time to first token: one vLLM OpenAI server on 127.0.0.1 with both resolvers, ours (converting on first
  request) and vLLM's own ``FilesystemResolver`` over the same adapters converted beforehand; each round asks for
  one never-served adapter through each (order alternating), ``max_tokens=1``; medians;
* warm time per token: an adapter already loaded against the base model, ``(t(64 tokens) - t(1 token)) / 63``.

Machine, load and versions are printed with the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
import warnings
from typing import Any, Optional

warnings.filterwarnings("ignore")

import torch  # noqa: E402

TESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
sys.path[:0] = [TESTS, os.path.join(TESTS, "serving")]
from serving_support import openai_server  # noqa: E402  (the tests' launcher of vLLM's OpenAI server)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R, NUM_VECTORS, VECTOR_LENGTH, TOPK = 4, 256, 64, 2
PROMPT = "Write one sentence about the sea:"
START_S = 900


def folder_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def make_adapters(base_folder: str, out: str, count: int) -> list[str]:
    """``count`` VB-LoRA adapters of SmolLM2's shape in ``out`` (names ``vb-0000`` ...), top-K saved."""
    import vblora_rs
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    config = vblora_rs.VBLoRAConfig(
        r=R,
        target_modules=TARGETS,
        num_vectors=NUM_VECTORS,
        vector_length=VECTOR_LENGTH,
        topk=TOPK,
        save_only_topk_weights=True,
        task_type="CAUSAL_LM",
    )
    model = vblora_rs.get_peft_model(base, config)
    names = []
    for i in range(count):
        torch.manual_seed(i)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "vblora_logits" in name:
                    param.normal_(0.0, 1.0)
                elif "vblora_vector_bank" in name:
                    param.uniform_(-0.1, 0.1)
        name = f"vb-{i:04d}"
        model.save_pretrained(os.path.join(out, name))
        names.append(name)
    return names


def post(port: int, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.load(response)


def timed(port: int, model: str, tokens: int) -> float:
    body = {"model": model, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0.0, "ignore_eos": True}
    start = time.perf_counter()
    post(port, body)
    return time.perf_counter() - start


def machine() -> list[str]:
    import peft
    import transformers
    import vblora_rs
    import vllm

    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return [
        f"machine: {cpu}, {os.cpu_count()} cores, {platform.platform()}, load average {os.getloadavg()[0]:.2f}",
        f"versions: vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"peft {peft.__version__}, vblora_rs {vblora_rs.__version__}, Python {platform.python_version()}",
    ]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapters", type=int, default=1000)
    parser.add_argument("--cold", type=int, default=8, help="cold adapters timed through each resolver")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="warm timings per model")
    parser.add_argument("--convert", type=int, default=20, help="adapters converted to measure the LoRA size and time")
    parser.add_argument("--adapter-dir", help="use the vb-* adapters an earlier run made in this folder")
    parser.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args(argv)
    if args.cold > args.adapters:
        parser.error("--cold cannot exceed --adapters")

    from vblora_rs.convert.lora import export_lora
    from vblora_rs.demo.smollm2 import base_folder
    from vblora_rs.serving.lora_cache import LoraCache

    base = base_folder()
    work = tempfile.mkdtemp(prefix="bench-vllm-")
    try:
        vb_dir, lora_dir = os.path.join(work, "vblora"), os.path.join(work, "lora")
        started = time.perf_counter()
        if args.adapter_dir:  # adapters made by an earlier run (making 1,000 takes minutes)
            vb_dir = os.path.abspath(args.adapter_dir)
            names = sorted(n for n in os.listdir(vb_dir) if n.startswith("vb-"))[: args.adapters]
        else:
            names = make_adapters(base, vb_dir, args.adapters)
        made = time.perf_counter() - started
        vb_bytes = sum(folder_size(os.path.join(vb_dir, n)) for n in names)

        # LoRA bytes: a LoRA's size follows from the shapes alone (float32 factors, the same keys), so every adapter
        # here converts to the same number of bytes; --convert of them are converted (timed) and checked equal
        cache = LoraCache(os.path.join(work, "bytes-cache"), max_bytes=1 << 40)
        sizes, convert_times = set(), []
        for name in names[: args.convert]:
            t = time.perf_counter()
            converted = cache.get(os.path.join(vb_dir, name))
            convert_times.append(time.perf_counter() - t)
            sizes.add(folder_size(converted.folder))
        assert len(sizes) == 1, f"conversions of one shape differ in size: {sorted(sizes)}"
        lora_bytes = len(names) * sizes.pop()
        shutil.rmtree(os.path.join(work, "bytes-cache"))

        # the cold adapters pre-converted for vLLM's FilesystemResolver (it wants the served model's name inside)
        cold = names[: args.cold]
        for name in cold:
            out = export_lora(os.path.join(vb_dir, name), os.path.join(lora_dir, f"lora-{name}"))
            with open(os.path.join(out, "adapter_config.json")) as fh:
                assert json.load(fh)["base_model_name_or_path"] == base, "to-lora keeps the base model's name"

        env = {
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1",
            "VLLM_LORA_RESOLVER_CACHE_DIR": lora_dir,
            "VBLORA_RS_VLLM_ADAPTER_DIRS": vb_dir,
            "VBLORA_RS_VLLM_CACHE_DIR": os.path.join(work, "server-cache"),
            "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        }
        ours, theirs = [], []
        server_args = ["--max-lora-rank", "8", "--max-loras", "2", "--max-cpu-loras", "2"]
        with openai_server(base, server_args, env, os.path.join(work, "server.log"), START_S) as (port, _):
            timed(port, base, 1)  # the first request of a server pays one-time costs: not a cold adapter's
            base_ttft = statistics.median(timed(port, base, 1) for _ in range(args.repeats))
            for i, name in enumerate(cold):
                pair = [("ours", name), ("filesystem", f"lora-{name}")]
                for kind, model in pair if i % 2 == 0 else pair[::-1]:
                    (ours if kind == "ours" else theirs).append(timed(port, model, 1))
            warm = cold[0]
            per_token = {}
            for model in (base, warm):
                one = statistics.median(timed(port, model, 1) for _ in range(args.repeats))
                full = statistics.median(timed(port, model, args.tokens) for _ in range(args.repeats))
                per_token[model] = (full - one) / (args.tokens - 1)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    ours_med, theirs_med = statistics.median(ours), statistics.median(theirs)
    added = ours_med - theirs_med
    allowed = max(0.2 * theirs_med, 0.050)
    n = len(names)
    rows = [
        "| measure | VB-LoRA (ours) | LoRA / vLLM's own | ratio |",
        "|---|---|---|---|",
        f"| {n:,d} adapters on disk (file bytes) | {vb_bytes:,d} B ({vb_bytes / n / 1024:.0f} KiB each) | "
        f"{lora_bytes:,d} B ({lora_bytes / n / 1024:.0f} KiB each) | {lora_bytes / vb_bytes:.1f}x smaller |",
        f"| cold TTFT, median of {len(ours)} (ours: find, hash, convert, check, load; vLLM: load) | {ms(ours_med)} | "
        f"{ms(theirs_med)} | +{ms(added)} ({added / theirs_med:+.0%}); target <= +{ms(allowed)}: "
        f"{'met' if added <= allowed else 'MISSED'} |",
        f"| warm time per token (adapter {warm} vs base) | {ms(per_token[warm])} | {ms(per_token[base])} | "
        f"{per_token[warm] / per_token[base]:.2f}x |",
    ]
    notes = [
        f"base model TTFT (warm, 1 token): {ms(base_ttft)}; conversion alone (hash, convert, write, through the "
        f"cache; median of {len(convert_times)}): {ms(statistics.median(convert_times))}; LoRA bytes: {n:,d} x the "
        f"size of each conversion (all {len(convert_times)} converted were {lora_bytes // n:,d} B)"
        + ("" if args.adapter_dir else f"; making {n} adapters took {made:.0f} s"),
        f"cold TTFT each, ours: {', '.join(ms(t) for t in ours)}",
        f"cold TTFT each, FilesystemResolver: {', '.join(ms(t) for t in theirs)}",
        *machine(),
    ]
    text = "\n".join([*rows, "", *notes])
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
