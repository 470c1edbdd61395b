"""transformers' Trainer with a VB-LoRA model, and the optimizer groups with the paper's two learning rates."""

from __future__ import annotations

import copy
import inspect
from pathlib import Path

import pytest
import tolerances
import torch
from conftest import MODEL_CASES, make_mlp
from test_ecosystem import build, classification_inputs
from torch import nn
from vblora_rs import VBLoRAConfig, VBLoRAError, get_peft_model
from vblora_rs.optim import create_optimizer, param_groups


def llama() -> nn.Module:
    builder, kw, _ = MODEL_CASES["llama"]
    model = get_peft_model(builder(), VBLoRAConfig(**kw))
    model.train()
    return model


def dataset(n: int = 4) -> list[dict[str, list[int]]]:
    gen = torch.Generator().manual_seed(5)
    rows = [torch.randint(0, 64, (7,), generator=gen).tolist() for _ in range(n)]
    return [{"input_ids": r, "labels": r} for r in rows]


def training_args(tmp_path: Path, **kw: object):  # type: ignore[no-untyped-def]
    from transformers import TrainingArguments

    args = {
        "output_dir": str(tmp_path),
        "max_steps": 1,
        "per_device_train_batch_size": 4,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "disable_tqdm": True,
        "max_grad_norm": 0.0,  # no clipping, so the step can be checked against a plain AdamW step
        "lr_scheduler_type": "constant",
    }
    return TrainingArguments(**{**args, **kw})


def test_groups_hold_each_parameter_once_with_the_papers_rates() -> None:
    model = get_peft_model(
        make_mlp(),
        VBLoRAConfig(target_modules=["lin0", "lin1"], modules_to_save=["head"], vector_length=8, num_vectors=16),
    )
    groups = param_groups(model, weight_decay=0.1)
    by_name = {g["name"]: g for g in groups}
    assert list(by_name) == ["vblora_vector_bank", "vblora_logits", "other"]
    bank = model.base_model.vblora_vector_bank["default"]
    assert by_name["vblora_vector_bank"]["params"] == [bank]  # shared by both layers, listed once
    assert (by_name["vblora_vector_bank"]["lr"], by_name["vblora_logits"]["lr"]) == (1e-3, 1e-2)
    assert by_name["vblora_logits"]["weight_decay"] == 0.0 and by_name["other"]["weight_decay"] == 0.1
    assert "lr" not in by_name["other"]  # the optimizer's lr
    assert len(by_name["vblora_logits"]["params"]) == 4  # A and B of two layers
    listed = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert sorted(listed) == sorted(trainable)
    optimizer = create_optimizer(model, lr=5e-4, lr_other=2e-4)
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 1e-2, 2e-4]
    assert isinstance(optimizer, torch.optim.AdamW)
    sgd = create_optimizer(model, torch.optim.SGD, lr=0.1)
    assert [g["lr"] for g in sgd.param_groups] == [1e-3, 1e-2, 0.1]


def test_group_errors() -> None:
    model = llama()
    with pytest.raises(VBLoRAError, match="lr_bank"):
        param_groups(model, lr_bank=-1.0)
    model.requires_grad_(False)
    with pytest.raises(VBLoRAError, match="no trainable parameters"):
        param_groups(model)


def test_trainer_keeps_the_batch_columns() -> None:
    model = llama()
    params = inspect.signature(model.forward).parameters
    assert {"input_ids", "attention_mask", "labels", "adapter_names"} <= set(params)
    assert "self" not in params
    assert torch.equal(
        model.forward(input_ids=torch.tensor([[1, 2]])).logits, model(input_ids=torch.tensor([[1, 2]])).logits
    )


def test_one_trainer_step_equals_one_adamw_step(tmp_path: Path) -> None:
    from transformers import Trainer

    model = llama()
    twin = copy.deepcopy(model)
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path),
        train_dataset=dataset(),
        optimizers=(create_optimizer(model), None),
    )
    result = trainer.train()
    assert result.global_step == 1

    rows = dataset()
    ids = torch.tensor([r["input_ids"] for r in rows])
    optimizer = create_optimizer(twin)
    loss = twin(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    assert result.training_loss == pytest.approx(loss.item(), rel=tolerances.model("llama")["rtol"])
    moved = 0
    for (name, trained), (_, expected) in zip(model.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(trained, expected, **tolerances.model("llama", backward=True), msg=name)
        moved += "vblora_" in name and not torch.equal(trained, llama().get_parameter(name))
    assert moved > 0


def test_trainer_with_a_classification_head(tmp_path: Path) -> None:
    from transformers import Trainer

    model = build("roberta")
    model.train()
    inputs = classification_inputs()
    rows = [{"input_ids": i.tolist(), "labels": int(label)} for i, label in zip(inputs["input_ids"], inputs["labels"])]
    head = model.get_base_model().classifier.modules_to_save["default"]
    before = copy.deepcopy(head.dense.weight)
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path, per_device_train_batch_size=3),
        train_dataset=rows,
        optimizers=(create_optimizer(model, lr=1e-2), None),
    )
    trainer.train()
    assert not torch.equal(head.dense.weight, before)  # the modules_to_save copy trained too


def test_vblora_trainer_checkpoints_the_adapter(tmp_path: Path) -> None:
    """Plain Trainer saves an unknown model's raw state_dict, which safetensors refuses (the shared bank sits
    under every layer's key); VBLoRATrainer saves the adapter as PEFT's Trainer path does."""
    import vblora_rs
    from safetensors import SafetensorError
    from transformers import Trainer
    from vblora_rs import VBLoRATrainer

    args = training_args(tmp_path / "plain", save_strategy="steps", save_steps=1)
    with pytest.raises((RuntimeError, SafetensorError), match="share memory"):
        Trainer(model=llama(), args=args, train_dataset=dataset()).train()

    model = llama()
    args = training_args(tmp_path / "ours", save_strategy="steps", save_steps=1)
    trainer = VBLoRATrainer(model=model, args=args, train_dataset=dataset(), optimizers=(create_optimizer(model), None))
    trainer.train()
    checkpoint = tmp_path / "ours" / "checkpoint-1"
    assert (checkpoint / "adapter_config.json").is_file() and (checkpoint / "adapter_model.safetensors").is_file()
    trainer.save_model(str(tmp_path / "final"))
    builder = MODEL_CASES["llama"][0]
    reloaded = vblora_rs.PeftModel.from_pretrained(builder(), tmp_path / "final")
    ids = torch.tensor([dataset()[0]["input_ids"]])
    model.eval()
    with torch.no_grad():
        tol = tolerances.model("llama")
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, **tol)
