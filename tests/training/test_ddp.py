"""DistributedDataParallel (gloo, two CPU processes) around PEFT's PeftModel with vblora_rs's backend: one
training step on two halves of a batch updates the adapter as one process does on the whole batch. The bank is one
parameter however many layers hold it, so DDP reduces its gradient once; inactive (frozen) adapters are no unused
parameters."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from support.models import MODEL_CASES
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from vblora_rs import VBLoRAConfig, get_peft_model
from vblora_rs.training.optim import param_groups

WORLD = 2
BATCH = 4  # two samples per rank
LR = 0.1


def build() -> nn.Module:
    builder, kw, _ = MODEL_CASES["llama"]  # no dropout anywhere: the step is deterministic
    model = get_peft_model(builder(seed=0), VBLoRAConfig(**kw))
    model.add_adapter("inactive", VBLoRAConfig(**kw))  # frozen: must not count as an unused DDP parameter
    model.train()
    return model


def batch() -> torch.Tensor:
    return torch.randint(0, 64, (BATCH, 7), generator=torch.Generator().manual_seed(3))


def step(model: nn.Module, module: nn.Module, ids: torch.Tensor) -> None:
    optimizer = torch.optim.SGD(param_groups(module, lr_bank=LR, lr_logits=LR), lr=LR)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Logits, bank and their gradients (the bank once: named_parameters yields a shared tensor once)."""
    state = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            state[name] = param.detach().clone()
            state[name + ".grad"] = param.grad.detach().clone()
    return state


def _rank(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model = build()
        ddp = DistributedDataParallel(model)
        # the shared bank is a single DDP parameter
        banks = [p for p in ddp.parameters() if p is model.base_model.vblora_vector_bank["default"]]
        assert len(banks) == 1
        half = BATCH // WORLD
        step(ddp, model, batch()[rank * half : (rank + 1) * half])
        torch.save(adapter_state(model), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(600)
def test_two_process_step_equals_one_process_full_batch(tmp_path: Path) -> None:
    init_file = tmp_path / "rendezvous"
    mp.spawn(_rank, args=(str(init_file), str(tmp_path)), nprocs=WORLD, join=True)

    torch.set_num_threads(1)
    model = build()
    step(model, model, batch())
    expected = adapter_state(model)
    assert any("vblora_vector_bank" in k for k in expected) and not any("inactive" in k for k in expected)
    eps = torch.finfo(torch.float32).eps
    tokens = batch()[:, 1:].numel()  # the loss is a mean over these predicted tokens
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got.keys() == expected.keys()
        for key in expected:
            # The averaged gradient of two half-batch means is the full-batch mean's gradient, summed in another
            # grouping: a reordered float32 sum over the batch's tokens. A parameter moves by lr x gradient.
            grad = expected[key if key.endswith(".grad") else key + ".grad"]
            atol = tokens * eps * grad.abs().max().item()
            if not key.endswith(".grad"):
                atol = LR * atol + eps * expected[key].abs().max().item()
            torch.testing.assert_close(got[key], expected[key], atol=atol, rtol=0, msg=key)
    # and the step did move the adapter
    (bank_key,) = [k for k in expected if k.endswith("vblora_vector_bank.default")]
    assert not torch.equal(expected[bank_key], build().base_model.vblora_vector_bank["default"])
