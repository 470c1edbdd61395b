"""Sequence-classification fine-tune, side by side: PEFT's own VB-LoRA against PEFT served by vblora_rs.

    python benches/bench_seq_cls.py                 # 40 AdamW steps
    python benches/bench_seq_cls.py --steps 60 --markdown table.md

A RoBERTa-shaped classifier built from a config (random weights, no downloads, dropout on as in a real
fine-tune), ``task_type="SEQ_CLS"`` (PEFT makes the classification head trainable and saves it), VB-LoRA on
query and value. The task is synthetic and separable: class 0 draws its tokens from the lower half of the
vocabulary, class 1 from the upper half.

Both sides are built by ``peft.get_peft_model`` from copies of one base model, PEFT's with its own classes
(``vblora_rs.remove_from_peft()``) and ours with ``vblora_rs.apply_to_peft()``. PEFT draws the bank once per
target module (keeping the last draw), vblora_rs once per adapter, so ours is given PEFT's initial state dict
before training. Then each side trains with the same seed (dropout masks), the same batches and AdamW over
``vblora_rs.param_groups`` (the paper's two learning rates; the head in the "other" group). Printed: both loss
curves, their largest absolute difference, the largest difference of the trained parameters, and the accuracy
of each side after training.
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

warnings.filterwarnings("ignore")

import peft  # noqa: E402
import vblora_rs  # noqa: E402
from peft.tuners.vblora import VBLoRAModel as PeftVBLoRAModel  # noqa: E402
from vblora_rs.demo import mini_models  # noqa: E402

VOCAB, SEQ, SAMPLES, BATCH = 64, 12, 64, 16
FIRST_TOKEN = 4  # below: RoBERTa's special tokens (pad is 1)


def base_model(seed: int) -> nn.Module:
    return mini_models.build(
        "roberta-seq-cls",
        seed,
        hidden_size=64,
        intermediate_size=128,
        vocab_size=VOCAB,
        max_position_embeddings=SEQ + 4,
        num_labels=2,
    ).train()


def vblora_config() -> peft.VBLoRAConfig:
    return peft.VBLoRAConfig(
        task_type="SEQ_CLS", target_modules=["query", "value"], r=4, num_vectors=64, vector_length=16, topk=2
    )


def task(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``SAMPLES`` sequences and labels: class 0 uses tokens below the middle of the vocabulary, class 1 above."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(SAMPLES) % 2
    middle = (FIRST_TOKEN + VOCAB) // 2
    low = torch.randint(FIRST_TOKEN, middle, (SAMPLES, SEQ), generator=gen)
    high = torch.randint(middle, VOCAB, (SAMPLES, SEQ), generator=gen)
    ids = torch.where(labels[:, None] == 1, high, low)
    order = torch.randperm(SAMPLES, generator=gen)
    return ids[order], labels[order]


def build_pair(seed: int) -> tuple[nn.Module, nn.Module]:
    """(PEFT's own VB-LoRA model, the same adapter under vblora_rs's classes), equal state dicts."""
    base = base_model(seed)
    was_applied = vblora_rs.is_applied()
    vblora_rs.remove_from_peft()
    try:
        theirs = peft.get_peft_model(copy.deepcopy(base), vblora_config())
        vblora_rs.apply_to_peft()
        ours = peft.get_peft_model(copy.deepcopy(base), vblora_config())
    finally:
        if not was_applied:
            vblora_rs.remove_from_peft()
    if type(theirs.base_model) is not PeftVBLoRAModel or not isinstance(ours.base_model, vblora_rs.VBLoRAModel):
        raise SystemExit("the two sides do not use the classes they should")
    ours.load_state_dict(theirs.state_dict())  # strict: the layouts must agree key for key
    return theirs, ours


def canonical(name: str) -> str:
    """PEFT's layers register the tuner's bank too, so PEFT's named_parameters() names the bank after the first
    layer (``...query.vblora_vector_bank.<adapter>``); vblora_rs's names it after its one owner, the tuner."""
    _, sep, adapter = name.rpartition("vblora_vector_bank.")
    return f"base_model.vblora_vector_bank.{adapter}" if sep and "." not in adapter else name


def trainable_names(model: nn.Module) -> list[str]:
    return sorted(canonical(n) for n, p in model.named_parameters() if p.requires_grad)


def train(model: nn.Module, steps: int, seed: int, lr: float) -> list[float]:
    """``steps`` AdamW steps over the task's batches in order; the loss of each step."""
    ids, labels = task(seed)
    model.train()
    optimizer = torch.optim.AdamW(vblora_rs.param_groups(model), lr=lr)
    torch.manual_seed(seed)  # the same dropout masks on both sides
    losses = []
    for step in range(steps):
        start = step * BATCH % SAMPLES
        batch = slice(start, start + BATCH)
        loss = model(input_ids=ids[batch], labels=labels[batch]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def accuracy(model: nn.Module, seed: int) -> float:
    ids, labels = task(seed + 1)  # fresh samples of the same task
    model.eval()
    with torch.no_grad():
        return (model(input_ids=ids).logits.argmax(-1) == labels).float().mean().item()


@dataclass
class Result:
    peft_losses: list[float]
    ours_losses: list[float]
    max_loss_diff: float
    max_param_diff: float
    peft_accuracy: float
    ours_accuracy: float
    trainable: list[str]


def run(steps: int = 40, seed: int = 0, lr: float = 2e-3) -> Result:
    theirs, ours = build_pair(seed)
    names = trainable_names(theirs)
    if names != trainable_names(ours):
        raise SystemExit("the two sides train different parameters")
    peft_losses = train(theirs, steps, seed, lr)
    ours_losses = train(ours, steps, seed, lr)
    ours_params = dict(ours.named_parameters())
    param_diff = max(
        (p - ours_params[canonical(n)]).abs().max().item()
        for n, p in theirs.named_parameters()
        if canonical(n) in names
    )
    return Result(
        peft_losses,
        ours_losses,
        max(abs(a - b) for a, b in zip(peft_losses, ours_losses)),
        param_diff,
        accuracy(theirs, seed),
        accuracy(ours, seed),
        names,
    )


def markdown(result: Result, lr: float) -> str:
    heads = sorted(
        {
            n.split(".modules_to_save")[0].removeprefix("base_model.model.")
            for n in result.trainable
            if "modules_to_save" in n
        }
    )
    lines = [
        f"RoBERTa-shaped classifier (2 layers, hidden 64, random weights), task_type=SEQ_CLS, VB-LoRA on query/value "
        f"(r=4, num_vectors=64, vector_length=16, topk=2), trainable head(s): {', '.join(heads)}; AdamW over "
        f"vblora_rs.param_groups (bank 1e-3, logits 1e-2, head {lr:g}), batch {BATCH} x {SEQ}, torch threads "
        f"{torch.get_num_threads()}.",
        "",
        "| step | PEFT loss | vblora_rs loss | abs diff |",
        "|---:|---:|---:|---:|",
    ]
    for step, (a, b) in enumerate(zip(result.peft_losses, result.ours_losses), 1):
        lines.append(f"| {step} | {a:.6f} | {b:.6f} | {abs(a - b):.2e} |")
    lines += [
        "",
        f"- max abs loss difference over {len(result.peft_losses)} steps: {result.max_loss_diff:.2e}",
        f"- max abs difference of the trained parameters: {result.max_param_diff:.2e}",
        f"- accuracy on fresh samples after training: PEFT {result.peft_accuracy:.3f}, "
        f"vblora_rs {result.ours_accuracy:.3f}",
    ]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=2e-3, help="learning rate of the head (default 2e-3)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--markdown", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    table = markdown(run(args.steps, args.seed, args.lr), args.lr)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(table + "\n")


if __name__ == "__main__":
    sys.exit(main())
