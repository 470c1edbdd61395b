"""What every injection refuses before allocating: adapter names that are not one folder name and configs whose
bank or logits cannot fit the machine's memory, for the first adapter and for every one added later
(``add_adapter`` / ``load_adapter`` do not run PEFT's pre-injection hook)."""

from __future__ import annotations

import pytest
import torch
import vblora_rs
from vblora_rs import VBLoRAError
from vblora_rs.demo.mini_models import build
from vblora_rs.tuner import memory_budget

CONFIG = dict(r=2, num_vectors=16, vector_length=8, topk=2, target_modules=["q_proj", "v_proj"])


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_bad_name_of_an_added_adapter_is_refused_and_nothing_changes() -> None:
    model = vblora_rs.get_peft_model(build("llama"), vblora_rs.VBLoRAConfig(**CONFIG))
    before = state(model)
    with pytest.raises(VBLoRAError, match=r"adapter name '\.\./x' must be a single folder name"):
        model.add_adapter("../x", vblora_rs.VBLoRAConfig(**CONFIG))
    assert list(model.peft_config) == ["default"]
    assert list(model.base_model.vblora_vector_bank) == ["default"]
    after = state(model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_config_checks_run_for_an_added_adapter() -> None:
    model = vblora_rs.get_peft_model(build("llama"), vblora_rs.VBLoRAConfig(**CONFIG))
    with pytest.raises(VBLoRAError, match="config of adapter 'second': `topk` 32 must not exceed `num_vectors` 16"):
        model.add_adapter("second", vblora_rs.VBLoRAConfig(**{**CONFIG, "topk": 32}))
    assert list(model.peft_config) == ["default"]


def test_logits_beyond_the_memory_left_are_refused_before_allocation(monkeypatch: pytest.MonkeyPatch) -> None:
    # the bank (16 x 8 float32 = 512 bytes) fits; the first layer's logits do not
    monkeypatch.setattr(memory_budget, "available_bytes", lambda: 600)
    base = build("llama")
    expected = r"module '.*q_proj': config of adapter 'default': logits A of shape \(2, \d+, 16\) needs "
    with pytest.raises(VBLoRAError, match=expected):
        vblora_rs.get_peft_model(base, vblora_rs.VBLoRAConfig(**CONFIG))
    assert not any("vblora" in name for name, _ in base.named_modules())  # rolled back


def test_a_bank_beyond_the_memory_left_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    model = vblora_rs.get_peft_model(build("llama"), vblora_rs.VBLoRAConfig(**CONFIG))
    monkeypatch.setattr(memory_budget, "available_bytes", lambda: 100)
    with pytest.raises(VBLoRAError, match=r"config of adapter 'big': the vector bank of shape \(16, 8\) needs"):
        model.add_adapter("big", vblora_rs.VBLoRAConfig(**CONFIG))
    assert list(model.base_model.vblora_vector_bank) == ["default"]


def test_the_budget_is_the_memory_the_machine_reports() -> None:
    left = memory_budget.available_bytes()
    assert left is None or left > 0
    budget = memory_budget.MemoryBudget("x", left=4096)
    budget.take("a", (512,))
    assert budget.left == 2048
    with pytest.raises(VBLoRAError, match="x: b of shape \\(513,\\) needs"):
        budget.take("b", (513,))
