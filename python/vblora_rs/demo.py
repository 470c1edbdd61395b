"""The built-in example (``vblora demo``, what ``make demo`` runs).

A small GPT-2 is built from a config with a fixed seed, given a quick base training on English prose that ships
with Python (the docstrings of a few standard-library modules), then fine-tuned with VB-LoRA on a second built-in
text, the Zen of Python. The held-out loss on the Zen must drop. The adapter is then saved in every storage format
(sizes printed next to a plain LoRA of the same rank), the compact packed file is reloaded, the base model is saved
as a transformers folder and ``vblora merge`` streams the adapter into it; the merged model's logits must equal the
adapter model's. Nothing is downloaded.
"""

from __future__ import annotations

import codecs
import contextlib
import copy
import io
import math
import os
import tempfile
import time
from typing import Optional

import torch
from tqdm import tqdm

from .config import VBLoRAConfig
from .model import PeftModel, get_peft_model


def builtin_text() -> str:
    """The Zen of Python, which the standard ``this`` module stores rot13-encoded (and prints on import)."""
    with contextlib.redirect_stdout(io.StringIO()):
        import this

    return codecs.decode(this.s, "rot13")


def base_text() -> str:
    """English prose that ships with Python: docstrings of standard-library modules."""
    import argparse
    import difflib
    import heapq
    import inspect
    import unittest

    return "\n\n".join(m.__doc__ or "" for m in (argparse, difflib, heapq, inspect, unittest))


def byte_batches(text: str, seq_len: int, batch: int, generator: torch.Generator) -> torch.Tensor:
    data = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    starts = torch.randint(0, len(data) - seq_len - 1, (batch,), generator=generator)
    return torch.stack([data[s : s + seq_len + 1] for s in starts.tolist()])


def build_model(seed: int) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=256,
        n_positions=128,
        n_embd=128,
        n_layer=2,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


def lm_loss(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=tokens[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def train(model: torch.nn.Module, text: str, steps: int, lr: float, seed: int, desc: str) -> None:
    g = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    bar = tqdm(range(steps), desc=desc, leave=True, mininterval=0.5)
    for _ in bar:
        loss = lm_loss(model, byte_batches(text, 64, 16, g))
        opt.zero_grad()
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")


@torch.no_grad()
def held_out_loss(model: torch.nn.Module, text: str, seed: int) -> float:
    model.eval()
    g = torch.Generator().manual_seed(seed + 10_000)
    return float(lm_loss(model, byte_batches(text, 64, 64, g)))


def _file_bytes(folder: str) -> tuple[int, int]:
    """(bytes, stored numbers) of the one weights file in ``folder``; a packed file stores the same numbers as
    PEFT's top-K file (its indices just take fewer bits each)."""
    from safetensors import safe_open

    from .packed import PACKED_WEIGHTS_NAME, read_packed

    path = next(os.path.join(folder, n) for n in sorted(os.listdir(folder)) if n.endswith(".safetensors"))
    if os.path.basename(path) == PACKED_WEIGHTS_NAME:
        return os.path.getsize(path), sum(t.numel() for t in read_packed(path)[1].values())
    values = 0
    with safe_open(path, framework="pt") as fh:
        for key in fh.keys():  # noqa: SIM118 (safe_open has no __iter__)
            values += math.prod(fh.get_slice(key).get_shape())
    return os.path.getsize(path), values


def report_formats(model: torch.nn.Module, out_dir: str, r: int) -> str:
    """Save the adapter in every format, print their sizes next to LoRA of the same rank; returns the packed
    adapter's folder."""
    from .cli import main as cli_main

    folders = {
        "PEFT full logits": os.path.join(out_dir, "adapter_full"),
        "PEFT top-K": os.path.join(out_dir, "adapter_topk"),
        "packed (lossless)": os.path.join(out_dir, "adapter"),
        "packed, half precision": os.path.join(out_dir, "adapter_half"),
        f"plain LoRA, r={r}": os.path.join(out_dir, "lora"),
    }
    config = model.peft_config["default"]
    config.save_only_topk_weights = False
    model.save_pretrained(folders["PEFT full logits"])
    config.save_only_topk_weights = True
    model.save_pretrained(folders["PEFT top-K"])
    model.save_pretrained(folders["packed (lossless)"], format="packed")
    model.save_pretrained(folders["packed, half precision"], format="packed", half=True)
    if cli_main(["to-lora", folders["PEFT top-K"], "-o", folders[f"plain LoRA, r={r}"], "--force"]) != 0:
        raise SystemExit("demo failed: vblora to-lora")
    print(f"{'format':<26} {'stored numbers':>14} {'bytes':>10}")
    for name, folder in folders.items():
        size, values = _file_bytes(folder)
        print(f"{name:<26} {values:>14,d} {size:>10,d}")
    return folders["packed (lossless)"]


def run(steps: int = 150, out: Optional[str] = None, seed: int = 0) -> dict[str, float]:
    from transformers import GPT2LMHeadModel

    from .cli import main as cli_main

    start = time.perf_counter()
    adapt_text = builtin_text()
    model = build_model(seed)
    print("1. base training on standard-library docstrings")
    train(model, base_text(), 2 * steps, 3e-3, seed, "base")
    base_copy = copy.deepcopy(model)
    before = held_out_loss(model, adapt_text, seed)

    rank = 4
    config = VBLoRAConfig(
        r=rank,
        num_vectors=64,
        vector_length=64,
        topk=2,
        fan_in_fan_out=True,
        target_modules=["c_attn", "c_proj", "c_fc"],
        save_only_topk_weights=True,
    )
    peft_model = get_peft_model(model, config)
    peft_model.print_trainable_parameters()
    peft_model.print_savable_parameters()
    print("2. VB-LoRA fine-tuning on the Zen of Python")
    train(peft_model, adapt_text, steps, 2e-2, seed + 1, "vb-lora")
    after = held_out_loss(peft_model, adapt_text, seed)
    print(f"held-out loss on the Zen of Python: before {before:.3f} -> after {after:.3f}")

    out_dir = out or tempfile.mkdtemp(prefix="vblora_demo_")
    os.makedirs(out_dir, exist_ok=True)
    print(f"3. the adapter in each storage format (in {out_dir})")
    adapter_dir = report_formats(peft_model, out_dir, rank)

    tokens = byte_batches(adapt_text, 64, 4, torch.Generator().manual_seed(seed + 5))[:, :-1]
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base_copy), adapter_dir)
    with torch.no_grad():
        adapter_logits = reloaded(input_ids=tokens).logits
    print("4. reloaded the packed adapter; merging it into the saved base model with `vblora merge`")
    base_dir, merged_dir = os.path.join(out_dir, "base"), os.path.join(out_dir, "merged")
    base_copy.save_pretrained(base_dir)
    if cli_main(["merge", base_dir, adapter_dir, "-o", merged_dir, "--force"]) != 0:
        raise SystemExit("demo failed: vblora merge")
    merged = GPT2LMHeadModel.from_pretrained(merged_dir).eval()
    with torch.no_grad():
        merged_logits = merged(input_ids=tokens).logits
    max_diff = float((merged_logits - adapter_logits).abs().max())
    print(f"5. max |merged - adapter| logits = {max_diff:.2e}")
    if not after < before:
        raise SystemExit("demo failed: the adapter did not lower the held-out loss")
    if max_diff > 1e-4:
        raise SystemExit("demo failed: merged model differs from the adapter model")
    elapsed = time.perf_counter() - start
    print(f"done in {elapsed:.1f} s")
    size, _ = _file_bytes(adapter_dir)
    return {"before": before, "after": after, "max_diff": max_diff, "bytes": float(size)}
