"""The main demo: VB-LoRA fine-tuning of SmolLM2-135M-Instruct on facts it cannot know (see :mod:`.data`).

The model answers a few questions; VB-LoRA (all seven projections of its 30 layers) learns the built-in
instruction set, with the loss computed on the answers only; the held-out loss (the same facts asked in
other words) must drop; the model answers the same questions again, and held-out ones. Then the checks of
:mod:`.showcase` run on this real model.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import TYPE_CHECKING, Any, Optional

import torch
from peft import VBLoRAConfig
from torch import nn

from .. import _progress as progress
from ..errors import VBLoRAError
from . import DEFAULT_STEPS, adapter_calls, data, showcase, smollm2

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

RANK = 4
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BATCH = 4
MAX_NEW_TOKENS = 40
IGNORE = -100  # label of the tokens the loss skips (prompt, padding), as torch's cross_entropy defaults to


def vblora_config() -> VBLoRAConfig:
    return VBLoRAConfig(
        r=RANK,
        num_vectors=128,
        vector_length=64,
        topk=2,
        target_modules=TARGETS,
        save_only_topk_weights=True,
    )


def prompt_ids(tokenizer: PreTrainedTokenizerBase, question: str) -> list[int]:
    """The chat-formatted question up to the assistant's turn, as the model was instruction-tuned."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def encode(tokenizer: PreTrainedTokenizerBase, pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """(tokens, labels) of each (question, answer): the answer and the end-of-turn token are learned, the
    prompt is not."""
    out = []
    for question, answer in pairs:
        prompt = prompt_ids(tokenizer, question)
        reply = list(tokenizer(answer + tokenizer.eos_token, add_special_tokens=False).input_ids)
        out.append((prompt + reply, [IGNORE] * len(prompt) + reply))
    return out


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[showcase.Inputs, torch.Tensor]:
    """Right-padded inputs and labels (padding is masked and ignored)."""
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, (tokens, targets) in enumerate(examples):
        ids[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, : len(tokens)] = 1
        labels[row, : len(targets)] = torch.tensor(targets)
    return showcase.Inputs(ids, mask), labels


def answer_loss(model: nn.Module, inputs: showcase.Inputs, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens, each predicted from the tokens before it."""
    out = model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask).logits[:, :-1]
    return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), labels[:, 1:].reshape(-1))


def train(model: nn.Module, examples: list[tuple[list[int], list[int]]], steps: int, seed: int, pad_id: int) -> None:
    """AdamW with VB-LoRA's two learning rates, batches of :data:`BATCH` drawn epoch by epoch."""
    from ..training.optim import create_optimizer

    optimizer = create_optimizer(model, lr_bank=5e-3, lr_logits=5e-2)
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    model.train()
    with progress.bar(steps, "VB-LoRA fine-tuning", unit="step") as bar:
        for _ in range(steps):
            if len(order) < BATCH:
                order += torch.randperm(len(examples), generator=generator).tolist()
            batch, order = [examples[i] for i in order[:BATCH]], order[BATCH:]
            inputs, labels = collate(batch, pad_id)
            loss = answer_loss(model, inputs, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
            bar.update(1)
    model.eval()


@torch.no_grad()
def held_out_loss(model: nn.Module, examples: list[tuple[list[int], list[int]]], pad_id: int) -> float:
    model.eval()
    inputs, labels = collate(examples, pad_id)
    return float(answer_loss(model, inputs, labels))


@torch.no_grad()
def answers(model: nn.Module, tokenizer: PreTrainedTokenizerBase, questions: list[str]) -> list[str]:
    """Greedy answers, all questions in one left-padded batch."""
    prompts = [prompt_ids(tokenizer, q) for q in questions]
    width = max(len(p) for p in prompts)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=MAX_NEW_TOKENS,
        do_sample=False,
        pad_token_id=pad_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]


def show(title: str, questions: list[str], replies: list[str]) -> None:
    print(f"   {title}")
    for question, reply in zip(questions, replies):
        print(f"   Q: {question}\n      A: {reply}")


def run(steps: int = DEFAULT_STEPS["smollm2"], out: Optional[str] = None, seed: int = 0) -> dict[str, Any]:
    start = time.perf_counter()
    smollm2.check_requirements(real_model=True)
    base_dir = smollm2.base_folder()
    model, tokenizer = smollm2.load(base_dir)
    config = model.config
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    shown, held_out = data.shown_prompts(), data.held_out_prompts()
    train_set = encode(tokenizer, data.train_pairs())
    held_out_set = encode(tokenizer, data.held_out_pairs())

    print(f"1. SmolLM2-135M-Instruct ({base_dir}) before fine-tuning")
    before_answers = answers(model, tokenizer, shown + held_out)
    show("answers to the questions it will be trained on:", shown, before_answers[: len(shown)])
    show("answers to held-out questions:", held_out, before_answers[len(shown) :])
    before = held_out_loss(model, held_out_set, pad_id)

    torch.manual_seed(seed)
    peft_model = adapter_calls.add_vblora(model, vblora_config())
    adapter_calls.print_parameter_counts(peft_model)
    print(f"2. VB-LoRA fine-tuning on {len(train_set)} built-in questions about vblora-rs ({steps} steps of {BATCH})")
    train(peft_model, train_set, steps, seed, pad_id)
    after = held_out_loss(peft_model, held_out_set, pad_id)
    print(f"   held-out loss (the same facts asked in other words): before {before:.3f} -> after {after:.3f}")
    after_answers = answers(peft_model, tokenizer, shown + held_out)
    show("answers to the same questions:", shown, after_answers[: len(shown)])
    show("answers to held-out questions:", held_out, after_answers[len(shown) :])
    if not after < before:
        raise VBLoRAError("demo check failed: the adapter did not lower the held-out loss")

    out_dir = out or tempfile.mkdtemp(prefix="vblora_demo_")
    os.makedirs(out_dir, exist_ok=True)
    inputs, _ = collate(held_out_set, pad_id)
    checked = showcase.Model(
        load=lambda folder: smollm2.load(folder)[0],
        layers=config.num_hidden_layers,
        reduction=max(config.hidden_size, config.intermediate_size),
        answer=lambda m: answers(m, tokenizer, shown + held_out),
    )
    results = showcase.run_checks(peft_model, checked, base_dir, out_dir, RANK, inputs, after_answers)
    elapsed = time.perf_counter() - start
    print(f"done in {elapsed:.1f} s")
    return {
        "before": before,
        "after": after,
        "seconds": elapsed,
        "questions": shown + held_out,
        "answers_before": before_answers,
        "answers_after": after_answers,
        **results,
    }
