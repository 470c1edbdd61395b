"""The toy demo (``vblora demo --tiny``): nothing to download, quick enough for the test suite.

A small GPT-2 is built from a config with a fixed seed, given a quick base training on English prose that ships
with Python (the docstrings of a few standard-library modules), then fine-tuned with VB-LoRA on a second built-in
text, the Zen of Python; the held-out loss on the Zen must drop. Then the checks of :mod:`.showcase` run.
"""

from __future__ import annotations

import codecs
import contextlib
import io
import os
import tempfile
import time
from typing import Any, Optional

import torch
from peft import VBLoRAConfig
from torch import nn

from .. import _progress as progress
from ..errors import VBLoRAError
from . import DEFAULT_STEPS, adapter_calls, mini_models, showcase, smollm2

RANK = 4
SEQ_LEN = 64


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


def byte_batches(text: str, batch: int, generator: torch.Generator) -> torch.Tensor:
    """``batch`` random windows of ``SEQ_LEN + 1`` bytes of ``text``."""
    data = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    starts = torch.randint(0, len(data) - SEQ_LEN - 1, (batch,), generator=generator)
    return torch.stack([data[s : s + SEQ_LEN + 1] for s in starts.tolist()])


def lm_loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=tokens[:, :-1]).logits
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def train(model: nn.Module, text: str, steps: int, lr: float, seed: int, desc: str) -> None:
    g = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    with progress.bar(steps, desc, unit="step") as bar:
        for _ in range(steps):
            loss = lm_loss(model, byte_batches(text, 16, g))
            opt.zero_grad()
            loss.backward()
            opt.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
            bar.update(1)
    model.eval()


@torch.no_grad()
def held_out_loss(model: nn.Module, text: str, seed: int) -> float:
    model.eval()
    g = torch.Generator().manual_seed(seed + 10_000)
    return float(lm_loss(model, byte_batches(text, 64, g)))


def load_gpt2(folder: str) -> nn.Module:
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(folder).eval()


def run(steps: int = DEFAULT_STEPS["tiny"], out: Optional[str] = None, seed: int = 0) -> dict[str, Any]:
    start = time.perf_counter()
    smollm2.check_requirements(real_model=False)
    adapt_text = builtin_text()
    model = mini_models.build("gpt2-bytes", seed)  # a byte-level GPT-2, no dropout
    print("1. a small GPT-2 built from a config, base training on standard-library docstrings")
    train(model, base_text(), 2 * steps, 3e-3, seed, "base")
    before = held_out_loss(model, adapt_text, seed)
    out_dir = out or tempfile.mkdtemp(prefix="vblora_demo_")
    os.makedirs(out_dir, exist_ok=True)
    base_dir = os.path.join(out_dir, "base")
    model.save_pretrained(base_dir)

    config = VBLoRAConfig(
        r=RANK,
        num_vectors=64,
        vector_length=64,
        topk=2,
        fan_in_fan_out=True,
        target_modules=["c_attn", "c_proj", "c_fc"],
        save_only_topk_weights=True,
    )
    peft_model = adapter_calls.add_vblora(model, config)
    adapter_calls.print_parameter_counts(peft_model)
    print("2. VB-LoRA fine-tuning on the Zen of Python")
    train(peft_model, adapt_text, steps, 2e-2, seed + 1, "vb-lora")
    after = held_out_loss(peft_model, adapt_text, seed)
    print(f"   held-out loss on the Zen of Python: before {before:.3f} -> after {after:.3f}")
    if not after < before:
        raise VBLoRAError("demo check failed: the adapter did not lower the held-out loss")

    tokens = byte_batches(adapt_text, 4, torch.Generator().manual_seed(seed + 5))[:, :-1]
    inputs = showcase.Inputs(tokens, torch.ones_like(tokens))
    gpt2 = model.config
    checked = showcase.Model(load=load_gpt2, layers=gpt2.n_layer, reduction=4 * gpt2.n_embd)
    results = showcase.run_checks(peft_model, checked, base_dir, out_dir, RANK, inputs)
    elapsed = time.perf_counter() - start
    print(f"done in {elapsed:.1f} s")
    return {"before": before, "after": after, "seconds": elapsed, **results}
