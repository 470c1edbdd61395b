"""``vblora_rs.save_packed`` / ``vblora_rs.load_packed`` of packed files, against PEFT's top-K checkpoints."""

from __future__ import annotations

import os

import pytest
import torch
import vblora_rs
from safetensors.torch import load_file
from support import tolerances
from support.models import MODEL_CASES, output_tensor
from support.peft_reference import build_pair, peft_from_pretrained
from vblora_rs.storage.names import PACKED_WEIGHTS_NAME


@pytest.mark.parametrize("case", ["mlp", "gpt2", "llama"])
def test_peft_top_k_to_packed_and_back_is_lossless(tmp_path, case: str) -> None:
    theirs, _, inputs = build_pair(case, save_only_topk_weights=True)
    theirs.save_pretrained(tmp_path / "peft")
    builder = MODEL_CASES[case][0]
    ours = vblora_rs.PeftModel.from_pretrained(builder(), tmp_path / "peft")
    assert vblora_rs.save_packed(ours, tmp_path / "packed") is None
    assert sorted(os.listdir(tmp_path / "packed")) == ["adapter_config.json", PACKED_WEIGHTS_NAME]
    assert os.path.getsize(tmp_path / "packed" / PACKED_WEIGHTS_NAME) < os.path.getsize(
        tmp_path / "peft" / "adapter_model.safetensors"
    )

    from_packed = vblora_rs.load_packed(builder(), tmp_path / "packed")
    from_file = vblora_rs.load_packed(builder(), tmp_path / "packed" / PACKED_WEIGHTS_NAME)
    reference = peft_from_pretrained(builder(), tmp_path / "peft")
    with torch.no_grad():
        expected = output_tensor(reference(**inputs))
        for model in (from_packed, from_file):
            assert torch.equal(output_tensor(model(**inputs)), expected)
    merged = from_packed.merge_and_unload().state_dict()
    for key, value in reference.merge_and_unload().state_dict().items():
        tolerances.assert_same(merged[key], value, tolerances.delta(value.dtype, 3, float(value.abs().max())), key)

    from_file.save_pretrained(tmp_path / "again")  # PEFT's top-K format again, bit for bit
    assert sorted(os.listdir(tmp_path / "again")) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    original = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    again = load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert original.keys() == again.keys()
    for key, value in original.items():
        assert again[key].dtype == value.dtype and torch.equal(again[key], value), key
    peft_from_pretrained(builder(), tmp_path / "again")  # and PEFT reads it


def test_full_logits_model_saves_packed_directly(tmp_path) -> None:
    theirs, ours, inputs = build_pair("gpt2")
    theirs.peft_config["default"].save_only_topk_weights = True
    theirs.save_pretrained(tmp_path / "peft")
    vblora_rs.save_packed(ours, tmp_path / "packed")
    assert ours.peft_config["default"].save_only_topk_weights is False  # the model's config is not changed
    builder = MODEL_CASES["gpt2"][0]
    loaded = vblora_rs.load_packed(builder(), tmp_path / "packed")
    reference = peft_from_pretrained(builder(), tmp_path / "peft")
    with torch.no_grad():
        assert torch.equal(output_tensor(loaded(**inputs)), output_tensor(reference(**inputs)))


@pytest.mark.parametrize("half", [True, torch.bfloat16])
def test_half_packed_reports_the_error_it_costs(tmp_path, half) -> None:
    _, ours, inputs = build_pair("llama", save_only_topk_weights=True)
    report = vblora_rs.save_packed(ours, tmp_path / "half", half=half)
    vblora_rs.save_packed(ours, tmp_path / "full")
    assert report.half == (torch.float16 if half is True else torch.bfloat16)
    assert len(report.layer_errors) == len(list(ours.base_model.vblora_layers()))
    assert 0 < report.max_error < 1e-2
    assert os.path.getsize(tmp_path / "half" / PACKED_WEIGHTS_NAME) < os.path.getsize(
        tmp_path / "full" / PACKED_WEIGHTS_NAME
    )
    builder = MODEL_CASES["llama"][0]
    lossy = vblora_rs.load_packed(builder(), tmp_path / "half")
    exact = vblora_rs.load_packed(builder(), tmp_path / "full")
    for (name, a), (_, b) in zip(lossy.base_model.vblora_layers(), exact.base_model.vblora_layers()):
        error = float((a.get_delta_weight("default") - b.get_delta_weight("default")).abs().max())
        assert error <= report.max_error * 1.01 + 1e-9, name


def test_bad_half_argument(tmp_path) -> None:
    _, ours, _ = build_pair("mlp")
    with pytest.raises(ValueError, match="half must be"):
        vblora_rs.save_packed(ours, tmp_path / "x", half=torch.float64)
    with pytest.raises(ValueError, match="not found"):
        vblora_rs.save_packed(ours, tmp_path / "x", adapter_name="nope")


def test_saving_packed_replaces_peft_weights(tmp_path) -> None:
    _, ours, _ = build_pair("mlp", save_only_topk_weights=True)
    ours.save_pretrained(tmp_path)
    vblora_rs.save_packed(ours, tmp_path)
    # the PEFT weights file is replaced by the packed one, PEFT's model card stays
    assert sorted(os.listdir(tmp_path)) == ["README.md", "adapter_config.json", PACKED_WEIGHTS_NAME]
