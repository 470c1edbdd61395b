"""The packed adapter format at the Llama-2-7B shape: file sizes, and the time to write a full-logits adapter.

    python benches/bench_packed.py              # 5 repeats
    python benches/bench_packed.py --repeats 3

Adapter: VB-LoRA on every linear of Llama-2-7B (32 layers x q,k,v,o 4096x4096, gate/up 11008x4096, down
4096x11008), r=4, 2048 x 256 float32 bank, topk=2: 39,040 sub-vectors, i.e. 39,040 x 2,048 float32 logits.

Sizes: PEFT's save_only_topk_weights file (written by peft itself) against the packed file, lossless and with a
float16 bank and weights. Time, on the same random logits (medians): PEFT's ``save_pretrained`` with
save_only_topk_weights=True, against ``topk_tensors_from_full`` + ``write_packed`` (top-K in Rust, softmax of the k
kept logits by torch, bit-packing and the file write in Rust). PEFT's model is built on ``torch.device("meta")``, so no
7B base weights exist; only the adapter's parameters get real (shared, random) storage.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from typing import Callable

import torch
from torch import nn

warnings.filterwarnings("ignore")

import peft  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from vblora_rs import VBLoRAConfig  # noqa: E402
from vblora_rs.packed import read_packed, topk_tensors_from_full, write_packed  # noqa: E402

R, NUM_VECTORS, VECTOR_LENGTH, TOPK = 4, 2048, 256, 2
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BANK_KEY = "base_model.vblora_vector_bank"


def peft_llama7b(seed: int) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """PEFT's VB-LoRA model on a meta-device Llama-2-7B, its adapter parameters given real random values; also the
    full-logits checkpoint dict of those values under PEFT's keys."""
    cfg = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    )
    with torch.device("meta"):
        base = LlamaForCausalLM(cfg)
    config = peft.VBLoRAConfig(
        r=R,
        num_vectors=NUM_VECTORS,
        vector_length=VECTOR_LENGTH,
        topk=TOPK,
        target_modules=TARGETS,
        save_only_topk_weights=True,
    )
    model = peft.get_peft_model(base, config)
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        for grid in ("vblora_logits_A", "vblora_logits_B"):
            params = getattr(module, grid, None)
            if isinstance(params, nn.ParameterDict) and "default" in params:
                shape = params["default"].shape
                params["default"] = nn.Parameter(torch.randn(shape, generator=gen))
                tensors[f"{name}.{grid}"] = params["default"].data
    bank = torch.rand(NUM_VECTORS, VECTOR_LENGTH, generator=gen) * 0.04 - 0.02
    model.base_model.vblora_vector_bank["default"] = nn.Parameter(bank)
    tensors[BANK_KEY] = bank
    return model, tensors


def median_s(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up (page cache, thread pools)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per side (default 5)")
    args = parser.parse_args()

    model, full = peft_llama7b(seed=0)
    rows = sum(t.numel() // NUM_VECTORS for k, t in full.items() if k != BANK_KEY)
    config = VBLoRAConfig(r=R, num_vectors=NUM_VECTORS, vector_length=VECTOR_LENGTH, topk=TOPK, target_modules=TARGETS)
    print(
        f"Llama-2-7B shape: {rows:,} sub-vectors x {NUM_VECTORS:,} logits (float32), torch threads "
        f"{torch.get_num_threads()}"
    )

    with tempfile.TemporaryDirectory() as tmp:
        peft_dir = os.path.join(tmp, "peft")
        packed = os.path.join(tmp, "adapter_packed.safetensors")

        def peft_save() -> None:
            model.save_pretrained(peft_dir)

        def ours_save() -> None:
            write_packed(packed, topk_tensors_from_full(full, config), config)

        peft_s = median_s(peft_save, args.repeats)
        ours_s = median_s(ours_save, args.repeats)

        peft_bytes = os.path.getsize(os.path.join(peft_dir, "adapter_model.safetensors"))
        topk = topk_tensors_from_full(full, config)
        lossless = write_packed(packed, topk, config)
        theirs, (_, ours) = load_file(os.path.join(peft_dir, "adapter_model.safetensors")), read_packed(packed)
        same = sorted(theirs) == sorted(ours) and all(
            theirs[k].dtype == ours[k].dtype and torch.equal(theirs[k], ours[k]) for k in theirs
        )
        start = time.perf_counter()
        half = write_packed(os.path.join(tmp, "half.safetensors"), topk, config, half=torch.float16)
        half_s = time.perf_counter() - start

    print()
    print("| file | bytes | vs PEFT top-K |")
    print("|---|---:|---:|")
    print(f"| PEFT save_only_topk_weights | {peft_bytes:,} | 1.000 |")
    print(f"| packed, lossless | {lossless.total_bytes:,} | {lossless.total_bytes / peft_bytes:.3f} |")
    print(f"| packed, float16 | {half.total_bytes:,} | {half.total_bytes / peft_bytes:.3f} |")
    bits = max(1, (NUM_VECTORS - 1).bit_length())
    print(f"  packed lossless holds exactly PEFT's tensors (keys, dtypes, values): {'yes' if same else 'NO'}")
    for name, rep in (("lossless", lossless), ("float16", half)):
        print(
            f"  {name}: bank {rep.bank_bytes:,}, indices {rep.indices_bytes:,} ({bits} bits), weights "
            f"{rep.weights_bytes:,}, header+extras {rep.header_and_extras_bytes:,}"
        )
    print(
        f"  float16: max |delta W error| over {len(half.layer_errors)} layers {half.max_error:.3e} "
        f"(write incl. the error report: {half_s:.2f} s, one run)"
    )
    print()
    print(f"| full-logits adapter -> top-K file (median of {args.repeats}) | seconds |")
    print("|---|---:|")
    print(f"| PEFT save_pretrained (save_only_topk_weights) | {peft_s:.3f} |")
    print(f"| vblora_rs topk_tensors_from_full + write_packed | {ours_s:.3f} |")
    print(f"| speed-up | {peft_s / ours_s:.2f}x |")


if __name__ == "__main__":
    main()
