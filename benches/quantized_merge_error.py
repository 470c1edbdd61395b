"""Merge and unmerge errors on bitsandbytes quantized bases, in quantization steps: vblora_rs's VB-LoRA against
PEFT's LoRA (and PEFT's own VB-LoRA, whose merge adds a dense delta to the packed 4-bit codes and fails).

For every quantized layer of a small Llama loaded with ``BitsAndBytesConfig`` (CPU):

- merge: the largest distance of a merged weight from the exact sum (dequantized original + delta, float64), in
  steps of the merged layer;
- unmerge: the largest distance of a weight after merge + unmerge from the original, in steps of the original;
- delta: the largest delta, in steps of the original (how far the merge moves the weights).

One quantization step (``vblora_rs.tuner.bnb_weights.quantization_step``): 4-bit, the largest gap between adjacent
code values times the block's scale; 8-bit, the row's scale / 127.

    PYTHONPATH=python python benches/quantized_merge_error.py [--hidden 256] [--layers 2]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import warnings
from typing import Any

import torch

warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)

import peft  # noqa: E402
import vblora_rs  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402
from vblora_rs.demo import mini_models  # noqa: E402
from vblora_rs.tuner import bnb_weights  # noqa: E402
from vblora_rs.tuner.peft_backend import peft_classes  # noqa: E402

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QUANT: dict[str, dict[str, Any]] = {
    "NF4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
    "FP4": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"},
    "NF4 + double quant": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True},
    "FP4 + double quant": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": True},
    "int8 (LLM.int8())": {"load_in_8bit": True},
}


def load(folder: str, quant: str) -> torch.nn.Module:
    config = {**QUANT[quant]}
    if config.get("load_in_4bit"):
        config["bnb_4bit_compute_dtype"] = torch.float32
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=BitsAndBytesConfig(**config))


def quantized_bases(model: torch.nn.Module) -> dict[str, Any]:
    """module name -> (wrapper layer, its bitsandbytes base layer)."""
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "get_base_layer") and bnb_weights.kind_of(module.get_base_layer()) is not None:
            out[name] = (module, module.get_base_layer())
    return out


def values(base: torch.nn.Module) -> torch.Tensor:
    return bnb_weights.dequantize(bnb_weights.snapshot(base)).double()


def measure(model: torch.nn.Module, delta_of: Any) -> dict[str, float]:
    layers = quantized_bases(model)
    original = {n: values(b) for n, (_, b) in layers.items()}
    step0 = {n: bnb_weights.quantization_step(b).double() for n, (_, b) in layers.items()}
    deltas = {n: delta_of(layer).double() for n, (layer, _) in layers.items()}
    model.merge_adapter()
    merge = max(
        float(((values(b) - original[n] - deltas[n]).abs() / bnb_weights.quantization_step(b)).max())
        for n, (_, b) in layers.items()
    )
    model.unmerge_adapter()
    unmerge = max(float(((values(b) - original[n]).abs() / step0[n]).max()) for n, (_, b) in layers.items())
    delta = max(float((deltas[n].abs() / step0[n]).max()) for n in layers)
    return {"merge": merge, "unmerge": unmerge, "delta": delta}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args()
    folder = mini_models.save(
        "llama",
        tempfile.mkdtemp(),
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers,
        vocab_size=128,
        max_position_embeddings=2048,
    )
    vb = {"r": 4, "num_vectors": 64, "vector_length": 32, "topk": 2, "target_modules": TARGETS}
    # two adapter sizes per method: deltas of a few steps, and deltas of tens of steps (a long fine-tune)
    sizes = {
        "small": ({"init_vector_bank_bound": 0.05, "init_logits_std": 1.0}, 16),
        "large": ({"init_vector_bank_bound": 0.5, "init_logits_std": 1.0}, 160),
    }
    print(f"Llama hidden={args.hidden} x {args.layers} layers, all 7 projections; errors in quantization steps")
    print(f"{'base':20} {'method':24} {'max |delta|':>11} {'merge':>7} {'unmerge':>8}")
    for quant in QUANT:
        with peft_classes():
            torch.manual_seed(1)
            theirs = peft.get_peft_model(load(folder, quant), peft.VBLoRAConfig(**vb))
        try:
            theirs.merge_adapter()
            print(f"{quant:20} {'PEFT VB-LoRA':24} merges")
        except Exception as exc:  # noqa: BLE001 - the point is to show what PEFT raises
            print(f"{quant:20} {'PEFT VB-LoRA':24} merge fails: {type(exc).__name__}: {str(exc)[:60]}")
        for size, (vb_init, lora_alpha) in sizes.items():
            torch.manual_seed(1)
            ours = vblora_rs.get_peft_model(load(folder, quant), peft.VBLoRAConfig(**vb, **vb_init))
            rows = [(f"vblora_rs VB-LoRA, {size}", measure(ours, lambda layer: layer.get_delta_weight("default")))]
            torch.manual_seed(1)
            # LoRA with random A and B (init_lora_weights=False: a trained-looking adapter, not B = 0)
            lora_config = peft.LoraConfig(r=8, lora_alpha=lora_alpha, target_modules=TARGETS, init_lora_weights=False)
            lora = peft.get_peft_model(load(folder, quant), lora_config)
            rows.append((f"PEFT LoRA, {size}", measure(lora, lambda layer: layer.get_delta_weight("default"))))
            for method, r in rows:
                print(f"{quant:20} {method:24} {r['delta']:11.2f} {r['merge']:7.3f} {r['unmerge']:8.3f}")


if __name__ == "__main__":
    main()
