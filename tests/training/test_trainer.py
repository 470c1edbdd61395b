"""transformers' own ``Trainer`` on a PEFT model built with vblora_rs's backend: training steps, evaluation with
``compute_metrics``, adapter checkpoints, resuming, ``load_best_model_at_end``, and the optimizer groups with the
paper's two learning rates passed through ``optimizers=(optimizer, None)``."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from support.models import MODEL_CASES, make_mlp
from torch import nn
from vblora_rs import (
    Linear,
    PeftModel,
    VBLoRAConfig,
    VBLoRAError,
    get_lora_cache_size,
    get_peft_model,
    set_lora_cache_size,
)
from vblora_rs.demo.mini_models import build
from vblora_rs.training.optim import create_optimizer, param_groups

EPS32 = torch.finfo(torch.float32).eps
DEFAULT_CACHE = get_lora_cache_size()
SEQ = 7


def llama(adapter_seed: int = 0) -> nn.Module:
    """The tiny Llama of support.models (base weights always seed 0) with an adapter drawn from ``adapter_seed``."""
    _, kw, _ = MODEL_CASES["llama"]
    base = build("llama", seed=0)
    torch.manual_seed(adapter_seed)
    model = get_peft_model(base, VBLoRAConfig(**kw))
    assert any(isinstance(m, Linear) for m in model.modules())  # our layers, not PEFT's own
    model.train()
    return model


def dataset(n: int = 4, seed: int = 5) -> list[dict[str, list[int]]]:
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.randint(0, 64, (SEQ,), generator=gen).tolist() for _ in range(n)]
    return [{"input_ids": r, "labels": r} for r in rows]


def training_args(tmp_path: Path, **kw: object):  # type: ignore[no-untyped-def]
    from transformers import TrainingArguments

    args = {
        "output_dir": str(tmp_path),
        "max_steps": 1,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 2,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "disable_tqdm": True,
        "max_grad_norm": 0.0,  # no clipping, so the step can be checked against a plain AdamW step
        "lr_scheduler_type": "constant",
        "dataloader_num_workers": 0,
    }
    return TrainingArguments(**{**args, **kw})


def adapter_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "vblora_" in n}


def assert_same_params(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


# --- optimizer groups ------------------------------------------------------------------------------


def test_groups_hold_each_parameter_once_with_the_papers_rates() -> None:
    model = get_peft_model(
        make_mlp(),
        VBLoRAConfig(target_modules=["lin0", "lin1"], modules_to_save=["head"], vector_length=8, num_vectors=16),
    )
    groups = param_groups(model, weight_decay=0.1)
    by_name = {g["name"]: g for g in groups}
    assert list(by_name) == ["vblora_logits", "vblora_vector_bank", "other"]  # logits first: Trainer logs its rate
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
    assert [g["lr"] for g in optimizer.param_groups] == [1e-2, 1e-3, 2e-4]
    assert isinstance(optimizer, torch.optim.AdamW)
    sgd = create_optimizer(model, torch.optim.SGD, lr=0.1)
    assert [g["lr"] for g in sgd.param_groups] == [1e-2, 1e-3, 0.1]


def test_group_errors() -> None:
    model = llama()
    with pytest.raises(VBLoRAError, match="lr_bank"):
        param_groups(model, lr_bank=-1.0)
    model.requires_grad_(False)
    with pytest.raises(VBLoRAError, match="no trainable parameters"):
        param_groups(model)


# --- Trainer -------------------------------------------------------------------------------------


def test_trainer_steps_equal_adamw_steps_with_the_papers_groups(tmp_path: Path) -> None:
    """Three Trainer steps with ``optimizers=(create_optimizer(model), None)`` are three AdamW steps on the same
    batches with the groups' two learning rates: the same float ops in the same order, so bit-equal."""
    from transformers import Trainer

    model = llama()
    twin = copy.deepcopy(model)
    start = adapter_params(model)
    optimizer = create_optimizer(model)
    trainer = Trainer(
        model=model,
        # in the dataset's order: a shuffled batch sums its rows in another order (float32 sums differ in ulps)
        args=training_args(tmp_path, max_steps=3, logging_steps=1, train_sampling_strategy="sequential"),
        train_dataset=dataset(),
        optimizers=(optimizer, None),
    )
    result = trainer.train()
    assert result.global_step == 3
    assert [g["lr"] for g in optimizer.param_groups] == [1e-2, 1e-3]  # the constant schedule kept both rates
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]

    ids = torch.tensor([r["input_ids"] for r in dataset()])
    reference = create_optimizer(twin)
    losses = []
    # Trainer normalises the summed token losses by the batch's count of predicted tokens (labels shifted by one)
    predicted = torch.tensor(ids[:, 1:].numel())
    for _ in range(3):
        loss = twin(input_ids=ids, labels=ids, num_items_in_batch=predicted).loss
        loss.backward()
        reference.step()
        reference.zero_grad()
        losses.append(loss.item())
    assert logged == losses  # logged every step: each step's loss as it was
    # the Trainer's mean of the three losses, accumulated in float32: a few ulps from the float64 mean
    assert result.training_loss == pytest.approx(sum(losses) / 3, rel=4 * EPS32)
    trained = adapter_params(model)
    expected_params = adapter_params(twin)
    for name in expected_params:
        assert torch.equal(trained[name], expected_params[name]), name
    bank = next(n for n in trained if n.endswith("vblora_vector_bank.default"))
    assert not torch.equal(trained[bank], start[bank])
    assert sum(not torch.equal(trained[n], start[n]) for n in trained) == len(trained)  # every tensor moved


def token_accuracy(prediction: Any) -> dict[str, float]:
    """Next-token accuracy of a causal LM's logits against its labels (shifted as the loss is)."""
    logits, labels = prediction.predictions, prediction.label_ids
    guesses = np.asarray(logits)[:, :-1].argmax(-1)
    return {"token_accuracy": float((guesses == np.asarray(labels)[:, 1:]).mean())}


@pytest.mark.parametrize(
    "optim",
    [
        "adamw_torch",
        "adamw_torch_fused",  # writes parameters without bumping version counters: the A/B cache must still see it
    ],
)
def test_evaluate_reports_eval_loss_and_runs_compute_metrics(tmp_path: Path, optim: str) -> None:
    from transformers import Trainer

    model = llama()
    calls: list[tuple[int, ...]] = []

    def metrics(prediction: Any) -> dict[str, float]:
        calls.append(tuple(np.asarray(prediction.label_ids).shape))
        return token_accuracy(prediction)

    rows = dataset(n=4, seed=9)
    args = training_args(tmp_path, optim=optim, learning_rate=1e-2, max_steps=3)
    trainer = Trainer(model=model, args=args, train_dataset=dataset(), eval_dataset=rows, compute_metrics=metrics)
    assert trainer.label_names == ["labels"]  # inferred from the base model's class through the PeftModel

    def expected() -> tuple[float, float]:
        """Eval loss and token accuracy computed by hand: two batches of two rows, as the Trainer batches them."""
        model.eval()
        ids = torch.tensor([r["input_ids"] for r in rows])
        with torch.no_grad():
            batches = [model(input_ids=ids[i : i + 2], labels=ids[i : i + 2]) for i in (0, 2)]
        loss = sum(b.loss.item() for b in batches) / 2
        guesses = torch.cat([b.logits for b in batches])[:, :-1].argmax(-1)
        return loss, (guesses == ids[:, 1:]).float().mean().item()

    result = trainer.evaluate()
    assert calls == [(4, SEQ)]  # compute_metrics ran once, over every eval row
    loss, accuracy = expected()
    # the mean of two float32 batch means, taken in another order: a few ulps
    assert result["eval_loss"] == pytest.approx(loss, rel=4 * EPS32)
    assert result["eval_token_accuracy"] == pytest.approx(accuracy)

    # training moves the adapter, and the next evaluation sees it: the same figures as a model that never cached
    trainer.train()
    after = trainer.evaluate()
    assert len(calls) == 2
    set_lora_cache_size(0)
    try:
        loss, accuracy = expected()
    finally:
        set_lora_cache_size(DEFAULT_CACHE)
    assert after["eval_loss"] == pytest.approx(loss, rel=4 * EPS32)
    assert after["eval_loss"] != result["eval_loss"]
    print(
        f"{optim}: eval_loss {result['eval_loss']:.6f} -> {after['eval_loss']:.6f} after 3 steps (by hand: {loss:.6f})"
    )


def resume_args(out: Path, **kw: object):  # type: ignore[no-untyped-def]
    return training_args(
        out,
        max_steps=4,
        per_device_train_batch_size=2,  # 8 rows: a shuffled order, four steps per epoch
        save_strategy="steps",
        save_steps=2,
        logging_steps=1,
        lr_scheduler_type="linear",  # the scheduler's state matters too
        learning_rate=5e-3,
        seed=11,
        **kw,
    )


def test_checkpoints_are_adapter_folders_and_resuming_continues_exactly(tmp_path: Path) -> None:
    from transformers import Trainer

    rows = dataset(n=8)
    model = llama()
    trainer = Trainer(
        model=model,
        args=resume_args(tmp_path / "straight"),
        train_dataset=rows,
        optimizers=(create_optimizer(model), None),
    )
    trainer.train()
    straight = adapter_params(model)
    straight_losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]

    checkpoint = tmp_path / "straight" / "checkpoint-2"
    files = {p.name for p in checkpoint.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "trainer_state.json"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin"}  # the adapter, not the whole model
    config = json.loads((checkpoint / "adapter_config.json").read_text())
    assert config["peft_type"] == "VBLORA"
    saved = load_file(str(checkpoint / "adapter_model.safetensors"))
    assert "base_model.vblora_vector_bank" in saved  # PEFT's keys: the bank once, logits per layer
    logits_keys = [k for k in saved if k.endswith(("vblora_logits_A", "vblora_logits_B"))]
    assert len(logits_keys) == 2 * sum(isinstance(m, Linear) for m in model.modules())
    assert len(saved) == len(logits_keys) + 1

    # a model whose adapter starts elsewhere: only loading checkpoint-2 can bring it onto the same path
    resumed_model = llama(adapter_seed=1)
    assert not torch.equal(*(m.base_model.vblora_vector_bank["default"] for m in (resumed_model, llama())))
    resumed = Trainer(
        model=resumed_model,
        args=resume_args(tmp_path / "resumed"),
        train_dataset=rows,
        optimizers=(create_optimizer(resumed_model), None),
    )
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 4
    resumed_losses = [e["loss"] for e in resumed.state.log_history if "loss" in e]
    # the same data order, optimizer state and schedule, the same ops in the same order: bit-equal
    assert resumed_losses[-2:] == straight_losses[-2:]
    assert_same_params(adapter_params(resumed_model), straight)
    print(f"losses straight {straight_losses}, resumed from checkpoint-2 {resumed_losses}")
    # and the final checkpoints hold the same adapter
    final_a = load_file(str(tmp_path / "straight" / "checkpoint-4" / "adapter_model.safetensors"))
    final_b = load_file(str(tmp_path / "resumed" / "checkpoint-4" / "adapter_model.safetensors"))
    assert_same_params(final_b, final_a)
    assert not torch.equal(final_a["base_model.vblora_vector_bank"], saved["base_model.vblora_vector_bank"])


def test_load_best_model_at_end_restores_the_best_checkpoint(tmp_path: Path) -> None:
    """With ``greater_is_better=True`` on the eval loss the best checkpoint is an early one (training lowers the
    loss), so the model at the end must be that checkpoint's adapter, not the last step's."""
    from transformers import Trainer

    model = llama()
    rows = dataset()
    trainer = Trainer(
        model=model,
        args=training_args(
            tmp_path,
            max_steps=3,
            learning_rate=1e-2,
            eval_strategy="steps",
            eval_steps=1,
            save_strategy="steps",
            save_steps=1,
            load_best_model_at_end=True,
            metric_for_best_model="eval_loss",
            greater_is_better=True,
        ),
        train_dataset=rows,
        eval_dataset=rows,
        optimizers=(create_optimizer(model), None),
    )
    trainer.train()
    evals = {e["step"]: e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e}
    assert sorted(evals) == [1, 2, 3]
    best_step = max(evals, key=evals.__getitem__)
    assert best_step != 3, f"training did not lower the eval loss: {evals}"
    assert trainer.state.best_model_checkpoint == str(tmp_path / f"checkpoint-{best_step}")

    best = load_file(str(tmp_path / f"checkpoint-{best_step}" / "adapter_model.safetensors"))
    last = load_file(str(tmp_path / "checkpoint-3" / "adapter_model.safetensors"))
    from peft import get_peft_model_state_dict

    now = get_peft_model_state_dict(model)
    assert_same_params(now, best)
    assert any(not torch.equal(now[k], last[k]) for k in last)
    # the restored adapter is still the one training would continue: trainable, and it scores the best loss
    assert all(p.requires_grad for n, p in model.named_parameters() if "vblora_" in n)
    again = trainer.evaluate()
    print(f"eval losses by step {evals}; best checkpoint {best_step}, evaluated again {again['eval_loss']}")
    assert again["eval_loss"] == pytest.approx(evals[best_step], rel=4 * EPS32)


def test_trainer_saves_a_model_peft_reloads(tmp_path: Path) -> None:
    from transformers import Trainer

    model = llama()
    trainer = Trainer(model=model, args=training_args(tmp_path, learning_rate=1e-2), train_dataset=dataset())
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    reloaded = PeftModel.from_pretrained(build("llama", seed=0), tmp_path / "final")
    ids = torch.tensor([dataset()[0]["input_ids"]])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=0, rtol=0)
