"""Top-K adapters with ``topk=1``: PEFT stores k indices and an EMPTY k-1 = 0 weights tensor per matrix (the one
kept bank vector has weight 1). Every reader must take the empty tensor: load, compact forward, merge, pack and
unpack, inspect, to-lora (the LoRA the vLLM plugin serves) and the streaming merge, each equal to PEFT."""

from __future__ import annotations

import os
from pathlib import Path

import peft
import pytest
import torch
import vblora_rs
from safetensors.torch import load_file
from support import tolerances
from support.models import MODEL_CASES, output_tensor
from support.peft_reference import peft_from_pretrained, peft_get_peft_model
from vblora_rs.cli import main

CASE = "llama"


def save_topk1(folder: Path, seed: int = 1) -> Path:
    """A PEFT top-K checkpoint with topk=1, written by PEFT's own classes (logits spread so every row differs)."""
    builder, cfg_kwargs, _ = MODEL_CASES[CASE]
    torch.manual_seed(seed)
    kwargs = {**cfg_kwargs, "topk": 1, "save_only_topk_weights": True, "init_logits_std": 1.0}
    kwargs["init_vector_bank_bound"] = 0.5
    model = peft_get_peft_model(builder(), peft.VBLoRAConfig(**kwargs))
    model.save_pretrained(folder)
    weights = load_file(folder / "adapter_model.safetensors")
    empty = [k for k in weights if k.endswith("_topk_weights")]
    assert empty and all(weights[k].numel() == 0 for k in empty)  # the case this file is about
    return folder


def inputs() -> dict:
    return MODEL_CASES[CASE][2]()


def assert_outputs_equal(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    with torch.no_grad():
        got, want = output_tensor(ours(**inputs())), output_tensor(theirs(**inputs()))
    tolerances.assert_same(got, want, tolerances.model(CASE))


def test_load_compact_forward_and_merge_match_peft(tmp_path: Path) -> None:
    folder = save_topk1(tmp_path / "adapter")
    builder = MODEL_CASES[CASE][0]
    theirs = peft_from_pretrained(builder(), folder)
    ours = vblora_rs.PeftModel.from_pretrained(builder(), folder)
    layers = [m for m in ours.modules() if isinstance(m, vblora_rs.VBLoRALayer)]
    assert layers and all(layer.is_compact("default") for layer in layers)
    assert_outputs_equal(ours, theirs)
    # resaved top-K: the very tensors PEFT wrote
    ours.save_pretrained(tmp_path / "resaved")
    first, again = (
        load_file(folder / "adapter_model.safetensors"),
        load_file(tmp_path / "resaved/adapter_model.safetensors"),
    )
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    merged_ours, merged_theirs = ours.merge_and_unload(), theirs.merge_and_unload()
    for (name, a), (_, b) in zip(merged_ours.state_dict().items(), merged_theirs.state_dict().items()):
        tolerances.assert_same(a, b, tolerances.delta(b.dtype, 3, float(b.abs().max())), name)


def test_compact_in_place_then_save_loads_in_peft(tmp_path: Path) -> None:
    builder, cfg_kwargs, _ = MODEL_CASES[CASE]
    torch.manual_seed(2)
    config = vblora_rs.VBLoRAConfig(**{**cfg_kwargs, "topk": 1, "save_only_topk_weights": True, "init_logits_std": 1.0})
    ours = vblora_rs.get_peft_model(builder(), config)
    ours.base_model.compact_()
    ours.eval()
    ours.save_pretrained(tmp_path / "a")
    assert_outputs_equal(ours, peft_from_pretrained(builder(), tmp_path / "a"))


def test_pack_unpack_and_load_packed(tmp_path: Path) -> None:
    folder = save_topk1(tmp_path / "adapter")
    assert main(["pack", str(folder), "-o", str(tmp_path / "packed")]) == 0
    assert main(["unpack", str(tmp_path / "packed"), "-o", str(tmp_path / "unpacked")]) == 0
    first = load_file(folder / "adapter_model.safetensors")
    again = load_file(tmp_path / "unpacked/adapter_model.safetensors")
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    builder = MODEL_CASES[CASE][0]
    loaded = vblora_rs.load_packed(builder(), tmp_path / "packed")
    assert_outputs_equal(loaded, peft_from_pretrained(builder(), folder))
    # and the API's own packed save of a k=1 model
    vblora_rs.save_packed(loaded, tmp_path / "packed_again")
    assert_outputs_equal(vblora_rs.load_packed(builder(), tmp_path / "packed_again"), loaded)


def test_inspect_and_to_lora(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = save_topk1(tmp_path / "adapter")
    assert main(["inspect", str(folder)]) == 0
    assert "topk=1" in capsys.readouterr().out
    assert main(["to-lora", str(folder), "-o", str(tmp_path / "lora")]) == 0
    builder = MODEL_CASES[CASE][0]
    with torch.no_grad():
        lora = peft.PeftModel.from_pretrained(builder(), tmp_path / "lora")
    assert isinstance(lora.peft_config["default"], peft.LoraConfig)
    assert_outputs_equal(lora, peft_from_pretrained(builder(), folder))


def test_streaming_merge_matches_peft(tmp_path: Path) -> None:
    folder = save_topk1(tmp_path / "adapter")
    builder = MODEL_CASES[CASE][0]
    builder().save_pretrained(tmp_path / "base")
    assert main(["merge", str(tmp_path / "base"), str(folder), "-o", str(tmp_path / "out")]) == 0
    merged = {}
    for name in os.listdir(tmp_path / "out"):
        if name.endswith(".safetensors"):
            merged.update(load_file(tmp_path / "out" / name))
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    reference = peft_from_pretrained(base, folder).merge_and_unload().state_dict()
    for name, got in merged.items():
        want = reference[name]
        torch.testing.assert_close(got, want, **tolerances.delta(want.dtype, 3, float(want.abs().max())), msg=name)
