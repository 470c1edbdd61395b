"""VB-LoRA under FSDP2 through transformers' Trainer (see docs/fsdp.md):

    torchrun --nproc_per_node 2 examples/fsdp/train_trainer.py OUT

``TrainingArguments(fsdp="full_shard auto_wrap", fsdp_config={"fsdp_version": 2, ...})``: each LlamaDecoderLayer
its own group, the PeftModel the root (it owns VB-LoRA's shared bank). Trains the tiny Llama of tiny.py for a few
AdamW steps (each process on its share of the batch), saves the adapter with Trainer's own save_model (PEFT's
folder, gathered to rank 0), and writes the logged losses to OUT/report.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny  # noqa: E402
from vblora_rs.training.fsdp import check_sharding  # noqa: E402


class Batches(torch.utils.data.Dataset):
    """The steps' batches, one sequence per item, in order."""

    def __init__(self) -> None:
        self.rows = torch.cat([tiny.batch(step) for step in range(tiny.STEPS)])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def main(out: Path) -> None:
    torch.set_num_threads(1)
    args = TrainingArguments(
        output_dir=str(out / "run"),
        use_cpu=True,
        per_device_train_batch_size=tiny.BATCH // 2,
        max_steps=tiny.STEPS,
        learning_rate=tiny.LR,
        lr_scheduler_type="constant",
        weight_decay=0.01,
        optim="adamw_torch",
        max_grad_norm=0.0,  # no clipping: the steps are plain AdamW steps
        train_sampling_strategy="sequential",  # step s trains on tiny.batch(s), split over the processes
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=0,
        data_seed=0,
        fsdp="full_shard auto_wrap",
        fsdp_config={"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]},
    )
    trainer = Trainer(model=tiny.peft_model(), args=args, train_dataset=Batches())
    trainer.train()
    check_sharding(trainer.model_wrapped)
    trainer.save_model(str(out / "adapter"))
    if trainer.is_world_process_zero():
        bank = trainer.model.base_model.vblora_vector_bank["default"]
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        report = {
            "losses": losses,
            "distributed_type": str(trainer.accelerator.distributed_type),
            "num_processes": trainer.accelerator.num_processes,
            "root": type(trainer.model_wrapped).__name__,
            "bank": type(bank).__name__,
        }
        (out / "report.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
