"""VB-LoRA under FSDP2 through accelerate (see docs/fsdp.md):

    accelerate launch --config_file examples/fsdp/accelerate_fsdp2.yaml examples/fsdp/train_accelerate.py OUT

Trains the tiny Llama of tiny.py for a few AdamW steps, each process on its share of the batch, writes the
full-batch loss of every step to OUT/losses.json and the adapter, gathered, to OUT/adapter (rank 0 writes)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny  # noqa: E402
from vblora_rs.training.fsdp import check_sharding, save_pretrained  # noqa: E402


def main(out: Path) -> None:
    torch.set_num_threads(1)
    accelerator = Accelerator()
    model = tiny.peft_model()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=tiny.LR)
    model, optimizer = accelerator.prepare(model, optimizer)
    check_sharding(model)  # the bank belongs to the root's group (a named VBLoRAError otherwise)
    share = tiny.BATCH // accelerator.num_processes
    rank = accelerator.process_index
    losses = []
    for step in range(tiny.STEPS):
        ids = tiny.batch(step)[rank * share : (rank + 1) * share]
        loss = model(input_ids=ids, labels=ids).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(accelerator.reduce(loss.detach(), reduction="mean").item())
    save_pretrained(model, str(out / "adapter"))
    if accelerator.is_main_process:
        bank = accelerator.unwrap_model(model).base_model.vblora_vector_bank["default"]
        report = {
            "losses": losses,
            "distributed_type": str(accelerator.distributed_type),
            "num_processes": accelerator.num_processes,
            "root": type(model).__name__,
            "bank": type(bank).__name__,
        }
        (out / "losses.json").write_text(json.dumps(report))
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
