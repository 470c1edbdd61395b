"""Hand-made broken PEFT-format adapter folders (tests/data/broken/peft_*, made by tests/data/make_broken.py):
loading one through PEFT with our backend raises a clean error (VBLoRAError naming the tensor for VB-LoRA
tensors), packing it raises VBLoRAError naming the file and the tensor or field."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from support.models import make_mlp
from torch import nn
from vblora_rs import PeftModel, VBLoRAError
from vblora_rs.cli import main as cli_main

BROKEN = Path(__file__).resolve().parents[1] / "data" / "broken"
CASES = json.loads((BROKEN / "cases.json").read_text())
PEFT_CASES = sorted(name for name, case in CASES.items() if case["kind"] == "peft")

# Packing cannot see the model, so a folder whose only fault is not fitting the model packs fine.
PACKS_FINE = {"peft_shape_not_fitting"}


def load(folder: Path) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(make_mlp(), folder)


def test_the_valid_folder_loads() -> None:
    model = load(BROKEN / "peft_valid")
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(2, 16))).all()


# PEFT reads the config and loads a folder of another method as that method: not a VB-LoRA load at all
LOADS_AS_OTHER_METHOD = {"peft_unknown_peft_type"}


@pytest.mark.parametrize("name", [n for n in PEFT_CASES if n not in LOADS_AS_OTHER_METHOD])
def test_broken_peft_folder_is_refused_by_name(name: str) -> None:
    folder = BROKEN / name
    base = make_mlp()
    weight = base.lin0.weight.detach().clone()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            PeftModel.from_pretrained(base, folder)
    except Exception as exc:  # noqa: BLE001 (the type is what this test checks)
        error = exc
    else:
        pytest.fail(f"{name} loaded")
    message = str(error)
    if isinstance(error, VBLoRAError):
        # a VB-LoRA tensor that does not fit: refused by our load hook, naming the tensor (the file is read by PEFT,
        # which does not pass its name to the hook)
        for part in CASES[name]["names"]:
            if "/" not in part and not part.startswith("adapter_"):
                assert part in message, (part, message)
    else:
        # the container itself is broken (JSON, safetensors header): PEFT's and safetensors' own errors
        assert isinstance(error, (ValueError, OSError, SafetensorError)), f"{type(error).__name__}: {error}"
    # no weight of the file reached the model
    layer = base.lin0.get_base_layer() if hasattr(base.lin0, "get_base_layer") else base.lin0
    assert torch.equal(layer.weight, weight)


@pytest.mark.parametrize("name", [n for n in PEFT_CASES if n not in PACKS_FINE])
def test_packing_a_broken_peft_folder_fails_naming_it(name: str, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        status = cli_main(["pack", str(BROKEN / name), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert status == 1
    assert f"{BROKEN / name}/adapter_" in err, err  # the input file, never the output
    assert not (tmp_path / "out" / "adapter_packed.safetensors").exists()


def test_a_folder_that_does_not_fit_the_model_still_packs(tmp_path: Path) -> None:
    assert cli_main(["pack", str(BROKEN / "peft_shape_not_fitting"), "-o", str(tmp_path / "out")]) == 0
    assert cli_main(["unpack", str(tmp_path / "out"), "-o", str(tmp_path / "u")]) == 0
    # the loader, which sees the model, refuses it
    with pytest.raises(VBLoRAError, match="lin0.vblora_logits_A_topk_indices has shape"):
        load(tmp_path / "u")
