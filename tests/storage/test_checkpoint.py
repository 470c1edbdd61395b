"""Saving and loading adapters through PEFT with our tuner's state-dict hooks: round trips, and every broken
VB-LoRA tensor refused with VBLoRAError naming the tensor before any weight is written. (Reading the files
themselves, adapter_config.json and the safetensors container, is PEFT's.)"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from support import tolerances
from support.models import make_mlp
from torch import nn
from vblora_rs import PeftModel, VBLoRAConfig, VBLoRAError, get_peft_model

CFG = {
    "target_modules": ["lin0", "lin1"],
    "vector_length": 8,
    "num_vectors": 300,
    "r": 2,
    "init_vector_bank_bound": 0.5,
    "init_logits_std": 1.0,
}
LOGITS_A = "base_model.model.lin0.vblora_logits_A"


def saved(tmp_path: Path, topk: bool = False) -> tuple[Path, nn.Module]:
    torch.manual_seed(0)
    model = get_peft_model(make_mlp(), VBLoRAConfig(save_only_topk_weights=topk, **CFG))
    model.save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt", model


def rewrite(path: Path, edit) -> None:  # type: ignore[no-untyped-def]
    tensors = load_file(path / "adapter_model.safetensors")
    edit(tensors)
    save_file(tensors, path / "adapter_model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("topk", [False, True])
def test_round_trip(tmp_path: Path, topk: bool) -> None:
    path, model = saved(tmp_path, topk)
    tensors = load_file(path / "adapter_model.safetensors")
    if topk:
        assert tensors[LOGITS_A + "_topk_indices"].dtype == torch.int16  # 300 vectors: PEFT's int16
        assert tensors[LOGITS_A + "_topk_weights"].shape == (2, 2, 1)
    else:
        assert torch.equal(tensors[LOGITS_A], model.lin0.vblora_logits_A["default"].detach())
    loaded = PeftModel.from_pretrained(make_mlp(), path)
    x = torch.randn(3, 16)
    with torch.no_grad():
        if not topk:
            torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)
        else:
            # the top-K file keeps exactly the top-K of every sub-vector: deltas are unchanged
            torch.testing.assert_close(
                loaded.lin0.get_delta_weight("default"),
                model.lin0.get_delta_weight("default"),
                **tolerances.delta(torch.float32, n=4),
            )
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["peft_type"] == "VBLORA" and config["inference_mode"] is True


def test_is_trainable(tmp_path: Path) -> None:
    path, _ = saved(tmp_path)
    loaded = PeftModel.from_pretrained(make_mlp(), path, is_trainable=True)
    assert loaded.lin0.vblora_logits_A["default"].requires_grad
    frozen = PeftModel.from_pretrained(make_mlp(), path)
    assert not frozen.training and not frozen.lin0.vblora_logits_A["default"].requires_grad


def test_compact_model_cannot_train(tmp_path: Path) -> None:
    path, _ = saved(tmp_path, topk=True)
    loaded = PeftModel.from_pretrained(make_mlp(), path, is_trainable=True)
    loaded.train()
    with pytest.raises(RuntimeError, match="Found infinity values in VB-LoRA logits"):
        loaded(torch.randn(2, 16))


def test_saved_folder_is_peft_s(tmp_path: Path) -> None:
    path, _ = saved(tmp_path)
    assert sorted(os.listdir(path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["peft_type"] == "VBLORA" and "peft_version" in config


def assert_rejected(path: Path, match: str) -> None:
    base = make_mlp()
    weight = base.lin0.weight.detach().clone()
    with pytest.raises(VBLoRAError, match=match):
        PeftModel.from_pretrained(base, path)
    # nothing of the file was written into the model (PEFT has injected the adapter layers before loading)
    assert torch.equal(base.lin0.get_base_layer().weight, weight)
    assert not base.lin0.is_compact("default")


def test_config_vector_length_not_dividing_layer(tmp_path: Path) -> None:
    path, _ = saved(tmp_path)
    config = json.loads((path / "adapter_config.json").read_text())
    config["vector_length"] = 5
    (path / "adapter_config.json").write_text(json.dumps(config))
    base = make_mlp()
    with pytest.raises(ValueError, match="must be divisible by `vector_length` 5"):
        PeftModel.from_pretrained(base, path)
    assert type(base.lin0) is nn.Linear


def test_missing_tensor(tmp_path: Path) -> None:
    path, _ = saved(tmp_path)
    rewrite(path, lambda t: t.pop(LOGITS_A))
    assert_rejected(path, f"missing tensor {LOGITS_A}")


def test_wrong_shape(tmp_path: Path) -> None:
    path, _ = saved(tmp_path)
    rewrite(path, lambda t: t.__setitem__(LOGITS_A, torch.zeros(2, 2, 299)))
    assert_rejected(path, rf"tensor {LOGITS_A} has shape \(2, 2, 299\), the model expects \(2, 2, 300\)")


def test_wrong_bank_shape(tmp_path: Path) -> None:
    path, _ = saved(tmp_path)
    rewrite(path, lambda t: t.__setitem__("base_model.vblora_vector_bank", torch.zeros(300, 4)))
    assert_rejected(path, r"tensor base_model.vblora_vector_bank has shape \(300, 4\)")


def test_wrong_dtype(tmp_path: Path) -> None:
    path, _ = saved(tmp_path)
    rewrite(path, lambda t: t.__setitem__(LOGITS_A, torch.zeros(2, 2, 300, dtype=torch.int32)))
    assert_rejected(path, f"tensor {LOGITS_A} has dtype torch.int32")


def test_unexpected_tensor(tmp_path: Path) -> None:
    path, _ = saved(tmp_path)
    rewrite(path, lambda t: t.__setitem__("base_model.model.nothing.vblora_logits_A", torch.zeros(1)))
    assert_rejected(path, "tensor base_model.model.nothing.vblora_logits_A matches no VB-LoRA module")


@pytest.mark.parametrize(
    "edit, match",
    [
        (
            lambda t: t.__setitem__(LOGITS_A + "_topk_indices", torch.full((2, 2, 2), 300, dtype=torch.int16)),
            "holds indices outside",
        ),
        (
            lambda t: t.__setitem__(LOGITS_A + "_topk_indices", torch.full((2, 2, 2), -1, dtype=torch.int16)),
            "holds indices outside",
        ),
        (
            lambda t: t.__setitem__(LOGITS_A + "_topk_weights", torch.full((2, 2, 1), float("nan"))),
            "weights must be finite",
        ),
        (lambda t: t.__setitem__(LOGITS_A + "_topk_weights", torch.full((2, 2, 1), -0.5)), "weights must be >= 0"),
        (
            lambda t: t.__setitem__(LOGITS_A + "_topk_weights", torch.full((2, 2, 1), 1.5)),
            r"summing to 1.5, above 1 \+",
        ),
        (lambda t: t.__setitem__(LOGITS_A + "_topk_weights", torch.full((2, 2, 2), 0.1)), "do not hold topk=2 entries"),
        (lambda t: t.__setitem__(LOGITS_A + "_topk_indices", torch.zeros(2, 2, 2)), "expected an integer dtype"),
        (  # the one top-K rule: a repeated index within a row is refused by every reader
            lambda t: t.__setitem__(LOGITS_A + "_topk_indices", torch.zeros(2, 2, 2, dtype=torch.int16)),
            "repeats index 0",
        ),
        (lambda t: t.pop(LOGITS_A + "_topk_weights"), "missing tensor .*_topk_weights"),
        (lambda t: t.pop(LOGITS_A + "_topk_indices"), "missing tensor .*_topk_indices"),
    ],
)
def test_broken_topk_tensors(tmp_path: Path, edit, match: str) -> None:  # type: ignore[no-untyped-def]
    path, _ = saved(tmp_path, topk=True)
    rewrite(path, edit)
    assert_rejected(path, match)


def test_load_adapter_failure_keeps_existing_adapters(tmp_path: Path) -> None:
    path, _ = saved(tmp_path)
    model = PeftModel.from_pretrained(make_mlp(), path)
    rewrite(path, lambda t: t.pop(LOGITS_A))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(VBLoRAError, match="missing tensor"):
        model.load_adapter(path, adapter_name="second")
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_save_into_a_file_path_rejected(tmp_path: Path) -> None:
    _, model = saved(tmp_path)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="should be a directory"):
        model.save_pretrained(tmp_path / "afile")


def test_load_adapter_keeps_frozen_adapters_frozen(tmp_path: Path) -> None:
    path, _ = saved(tmp_path)
    model = PeftModel.from_pretrained(make_mlp(), path)
    model.load_adapter(path, adapter_name="second")
    assert not any(p.requires_grad for p in model.parameters())
    model.load_adapter(path, adapter_name="third", is_trainable=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".third") for n in trainable)


@pytest.mark.parametrize("topk", [False, True])
def test_non_finite_bank_is_refused(tmp_path: Path, topk: bool) -> None:
    # the one finiteness rule (storage.finite), as vblora merge, inspect and to-lora apply it
    path, _ = saved(tmp_path, topk=topk)

    def poison(t: dict) -> None:
        t["base_model.vblora_vector_bank"][7, 3] = float("inf")

    rewrite(path, poison)
    assert_rejected(path, r"vblora_vector_bank holds NaN or infinite values \(vector 7\)")


def test_nan_logits_are_refused(tmp_path: Path) -> None:
    path, _ = saved(tmp_path)
    rewrite(path, lambda t: t[LOGITS_A].view(-1).__setitem__(5, float("nan")))
    assert_rejected(path, f"tensor {LOGITS_A}: sub-vector 0 holds NaN or \\+inf logits")
