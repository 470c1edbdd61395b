"""Training with ``save_only_topk_weights=True`` under transformers' ``Trainer`` (PEFT's trap: top-K checkpoints
cannot be trained on, so a run could neither resume nor go on after ``load_best_model_at_end``). Here the run's
checkpoints keep the dense logits, the final ``save_model`` is top-K, and a top-K adapter in training mode says
what is wrong and what to do."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import vblora_rs
from safetensors.torch import load_file
from support.models import MODEL_CASES
from support.peft_reference import peft_from_pretrained
from torch import nn
from vblora_rs.demo.mini_models import build
from vblora_rs.tuner.layer import TOPK_TRAINING_ERROR

SEQ = 7


def llama_topk(seed: int = 0) -> nn.Module:
    _, kw, _ = MODEL_CASES["llama"]
    base = build("llama", seed=0)
    torch.manual_seed(seed)
    return vblora_rs.get_peft_model(base, vblora_rs.VBLoRAConfig(**kw, save_only_topk_weights=True)).train()


def rows(n: int = 8) -> list[dict[str, list[int]]]:
    gen = torch.Generator().manual_seed(5)
    out = [torch.randint(0, 64, (SEQ,), generator=gen).tolist() for _ in range(n)]
    return [{"input_ids": r, "labels": r} for r in out]


def args(out: Path, **kw: object):  # type: ignore[no-untyped-def]
    from transformers import TrainingArguments

    return TrainingArguments(
        **{
            "output_dir": str(out),
            "max_steps": 4,
            "per_device_train_batch_size": 2,
            "per_device_eval_batch_size": 4,
            "save_strategy": "steps",
            "save_steps": 2,
            "logging_steps": 1,
            "learning_rate": 5e-3,
            "report_to": [],
            "use_cpu": True,
            "disable_tqdm": True,
            "dataloader_num_workers": 0,
            "seed": 11,
            **kw,
        }
    )


def adapter_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "vblora_" in n}


def is_topk_file(folder: Path) -> bool:
    keys = load_file(str(folder / "adapter_model.safetensors")).keys()
    return any(k.endswith("_topk_indices") for k in keys)


def test_checkpoints_resume_exactly_and_the_final_save_is_top_k(tmp_path: Path) -> None:
    from transformers import Trainer

    straight_model = llama_topk()
    straight = Trainer(model=straight_model, args=args(tmp_path / "straight"), train_dataset=rows())
    straight.train()
    checkpoint = tmp_path / "straight" / "checkpoint-2"
    assert not is_topk_file(checkpoint)  # a checkpoint keeps the logits training needs
    straight.save_model(str(tmp_path / "final"))
    assert is_topk_file(tmp_path / "final")  # the user's save is top-K, as configured
    # PEFT loads the final file; it computes what the trained model computes after PEFT's top-K round trip
    peft_model = peft_from_pretrained(build("llama", seed=0), tmp_path / "final")
    ours = vblora_rs.PeftModel.from_pretrained(build("llama", seed=0), tmp_path / "final")
    ids = torch.tensor(rows(1)[0]["input_ids"])[None]
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, peft_model(input_ids=ids).logits)

    resumed_model = llama_topk(seed=1)
    resumed = Trainer(model=resumed_model, args=args(tmp_path / "resumed"), train_dataset=rows())
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 4
    want, got = adapter_params(straight_model), adapter_params(resumed_model)
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)


def test_load_best_model_at_end_leaves_a_trainable_model(tmp_path: Path) -> None:
    from transformers import Trainer

    model = llama_topk()
    trainer = Trainer(
        model=model,
        args=args(
            tmp_path,
            eval_strategy="steps",
            eval_steps=2,
            load_best_model_at_end=True,
            metric_for_best_model="eval_loss",
            greater_is_better=True,  # the first checkpoint is the "best": the model must go back to it
        ),
        train_dataset=rows(),
        eval_dataset=rows(4),
    )
    trainer.train()
    best = load_file(str(tmp_path / "checkpoint-2" / "adapter_model.safetensors"))
    for name, param in model.named_parameters():
        if "vblora_logits_A" in name:
            key = name.replace(".default", "")
            assert torch.equal(param.detach(), best[key])
            break
    else:
        pytest.fail("no logits parameter")
    model.train()
    ids = torch.tensor(rows(1)[0]["input_ids"])[None]
    model(input_ids=ids, labels=ids).loss.backward()  # training goes on
    trainer.save_model(str(tmp_path / "final"))
    assert is_topk_file(tmp_path / "final")


def test_a_top_k_adapter_in_training_mode_names_the_cause_and_the_fix(tmp_path: Path) -> None:
    model = llama_topk()
    model.save_pretrained(tmp_path / "a")
    loaded = vblora_rs.PeftModel.from_pretrained(build("llama", seed=0), tmp_path / "a").train()
    ids = torch.tensor(rows(1)[0]["input_ids"])[None]
    with pytest.raises(RuntimeError) as info:
        loaded(input_ids=ids)
    message = str(info.value)
    assert message.startswith("This VB-LoRA adapter holds only its top-K indices and weights")
    assert "model.eval()" in message and "docs/checkpoints.md" in message
    # PEFT's words, which PEFT's own test matches on, are kept
    assert "Found infinity values in VB-LoRA logits. Ensure training was not resumed" in message
    assert message == TOPK_TRAINING_ERROR
    with torch.no_grad():  # training mode without autograd trains nothing: allowed
        loaded(input_ids=ids)


def test_trainer_logs_the_logits_learning_rate(tmp_path: Path) -> None:
    """With create_optimizer's two rates, Trainer's "learning_rate" is the first group's: the logits'."""
    from transformers import Trainer
    from vblora_rs.training.optim import create_optimizer

    model = llama_topk()
    optimizer = create_optimizer(model, lr_bank=1e-3, lr_logits=4e-3)
    trainer = Trainer(
        model=model,
        args=args(tmp_path, max_steps=1, save_strategy="no", lr_scheduler_type="constant"),
        train_dataset=rows(),
        optimizers=(optimizer, None),
    )
    trainer.train()
    logged = [e["learning_rate"] for e in trainer.state.log_history if "learning_rate" in e]
    assert logged == [4e-3]
