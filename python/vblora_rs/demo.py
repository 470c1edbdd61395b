"""The built-in example: fine-tune a small GPT-2 with VB-LoRA on text that ships with Python, save the compact
adapter, reload it, merge it into the base weights and check the merged model gives the same logits.

Nothing is downloaded: the model is built from a config with a fixed seed and trained on the Zen of Python.
"""

from __future__ import annotations

import codecs
import contextlib
import copy
import io
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


def run(steps: int = 150, out: Optional[str] = None, seed: int = 0) -> dict[str, float]:
    start = time.perf_counter()
    zen = builtin_text()
    base_text, adapt_text = zen[: len(zen) // 2], zen[len(zen) // 2 :]
    model = build_model(seed)
    print("1. base training on the first half of the Zen of Python")
    train(model, base_text, 2 * steps, 3e-3, seed, "base")
    base_copy = copy.deepcopy(model)
    before = held_out_loss(model, adapt_text, seed)

    config = VBLoRAConfig(
        r=4,
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
    print("2. VB-LoRA fine-tuning on the second half")
    train(peft_model, adapt_text, steps, 2e-2, seed + 1, "vb-lora")
    after = held_out_loss(peft_model, adapt_text, seed)
    print(f"held-out loss on the adaptation text: before {before:.3f} -> after {after:.3f}")

    out_dir = out or tempfile.mkdtemp(prefix="vblora_demo_")
    peft_model.save_pretrained(out_dir)
    size = os.path.getsize(os.path.join(out_dir, "adapter_model.safetensors"))
    print(f"3. saved the top-K adapter to {out_dir} ({size:,d} bytes)")

    reloaded = PeftModel.from_pretrained(copy.deepcopy(base_copy), out_dir)
    tokens = byte_batches(adapt_text, 64, 4, torch.Generator().manual_seed(seed + 5))[:, :-1]
    with torch.no_grad():
        adapter_logits = reloaded(input_ids=tokens).logits
        merged = reloaded.merge_and_unload()
        merged_logits = merged(input_ids=tokens).logits
    max_diff = float((merged_logits - adapter_logits).abs().max())
    print(f"4. reloaded and merged: max |merged - adapter| logits = {max_diff:.2e}")
    if not after < before:
        raise SystemExit("demo failed: the adapter did not lower the held-out loss")
    if max_diff > 1e-4:
        raise SystemExit("demo failed: merged model differs from the adapter model")
    elapsed = time.perf_counter() - start
    print(f"done in {elapsed:.1f} s")
    return {"before": before, "after": after, "max_diff": max_diff, "bytes": float(size)}
