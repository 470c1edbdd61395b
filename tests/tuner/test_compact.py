"""Compact top-K adapters: loaded from top-K checkpoints (PEFT's or ours) without dense logits, or made with
``compact_``; bit for bit what PEFT computes from the same checkpoint."""

from __future__ import annotations

import copy
import pickle

import peft
import pytest
import torch
import vblora_rs
from safetensors.torch import load_file, save_file
from support import tolerances
from support.models import MODEL_CASES, output_tensor
from support.peft_reference import build_pair, peft_from_pretrained
from vblora_rs.tuner.layer import TOPK_TRAINING_ERROR


def vblora_modules(model) -> dict:
    return {n: m for n, m in model.named_modules() if isinstance(m, vblora_rs.VBLoRALayer)}


def peft_modules(model) -> dict:
    return {n: m for n, m in model.named_modules() if isinstance(m, peft.tuners.vblora.layer.VBLoRALayer)}


def load_both(tmp_path, case: str, **overrides):
    """A top-K checkpoint written by PEFT, loaded by PEFT and by us."""
    theirs, _, inputs = build_pair(case, save_only_topk_weights=True, **overrides)
    theirs.save_pretrained(tmp_path / "peft")
    builder = MODEL_CASES[case][0]
    peft_model = peft_from_pretrained(builder(), tmp_path / "peft")
    ours = vblora_rs.PeftModel.from_pretrained(builder(), tmp_path / "peft")
    return peft_model, ours, inputs


@pytest.mark.parametrize("case", ["mlp", "gpt2", "llama"])
def test_topk_checkpoint_loads_compact_and_matches_peft_bit_for_bit(tmp_path, case: str) -> None:
    peft_model, ours, inputs = load_both(tmp_path, case)
    layers = vblora_modules(ours)
    assert layers and all(layer.is_compact("default") for layer in layers.values())
    assert not any("vblora_logits" in name for name, _ in ours.named_parameters())
    theirs = peft_modules(peft_model)
    for name, layer in layers.items():
        want = theirs[name].get_delta_weight("default")
        tolerances.assert_same(layer.get_delta_weight("default"), want, tolerances.delta(want.dtype, 3), name)
    with torch.no_grad():
        out = output_tensor(ours(**inputs))
        tolerances.assert_same(out, output_tensor(peft_model(**inputs)), tolerances.model(case))
    merged_ours = ours.merge_and_unload()
    merged_theirs = peft_model.merge_and_unload()
    for (name, a), (_, b) in zip(merged_ours.state_dict().items(), merged_theirs.state_dict().items()):
        tolerances.assert_same(a, b, tolerances.delta(b.dtype, 3, float(b.abs().max())), name)


def test_logits_are_built_only_on_request_with_peft_values(tmp_path) -> None:
    peft_model, ours, inputs = load_both(tmp_path, "llama")
    theirs = peft_modules(peft_model)
    name, layer = next(iter(vblora_modules(ours).items()))
    assert "default" not in layer.vblora_logits_A
    logits_A = layer.vblora_logits_A["default"]  # asking for them builds them
    assert torch.equal(logits_A, theirs[name].vblora_logits_A["default"])
    assert torch.equal(layer.vblora_logits_B["default"], theirs[name].vblora_logits_B["default"])
    assert not layer.is_compact("default") and not logits_A.requires_grad
    with torch.no_grad():  # a model with some layers dense and some compact still gives PEFT's outputs
        assert torch.equal(output_tensor(ours(**inputs)), output_tensor(peft_model(**inputs)))
    ours.train()
    with pytest.raises(RuntimeError, match="Found infinity values"):
        ours(**inputs)


def test_training_a_compact_adapter_raises_peft_error(tmp_path) -> None:
    _, ours, inputs = load_both(tmp_path, "mlp")
    ours.train()
    with pytest.raises(RuntimeError) as info:
        ours(**inputs)
    assert str(info.value) == TOPK_TRAINING_ERROR


def test_resave_is_bit_identical_to_the_loaded_file(tmp_path) -> None:
    _, ours, _ = load_both(tmp_path, "gpt2")
    ours.save_pretrained(tmp_path / "again")
    original = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    again = load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert original.keys() == again.keys()
    for key, value in original.items():
        assert again[key].dtype == value.dtype and torch.equal(again[key], value), key


def test_full_mode_save_of_compact_adapter_writes_peft_logits(tmp_path) -> None:
    peft_model, ours, _ = load_both(tmp_path, "mlp")
    ours.peft_config["default"].save_only_topk_weights = False
    ours.save_pretrained(tmp_path / "full")
    saved = load_file(tmp_path / "full" / "adapter_model.safetensors")
    for name, layer in peft_modules(peft_model).items():
        key = f"{name.removeprefix('base_model.model.')}"
        assert torch.equal(saved[f"base_model.model.{key}.vblora_logits_A"], layer.vblora_logits_A["default"])


@pytest.mark.parametrize("case", ["mlp", "gpt2", "llama"])
def test_compact_in_place_equals_peft_top_k_round_trip(tmp_path, case: str) -> None:
    theirs, ours, inputs = build_pair(case)
    theirs.peft_config["default"].save_only_topk_weights = True
    theirs.save_pretrained(tmp_path / "peft")
    reference = peft_from_pretrained(MODEL_CASES[case][0](), tmp_path / "peft")
    ours.compact_("default")
    assert not any("vblora_logits" in name for name, _ in ours.named_parameters())
    ours.eval()
    with torch.no_grad():
        assert torch.equal(output_tensor(ours(**inputs)), output_tensor(reference(**inputs)))
    ours.save_pretrained(tmp_path / "ours")
    ours_file = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    peft_file = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert ours_file.keys() == peft_file.keys()
    for key, value in peft_file.items():
        assert torch.equal(ours_file[key], value), key


def test_ties_and_zero_weights_follow_torch_topk_order(tmp_path) -> None:
    """Rows whose order the kept values do not decide (equal weights, zero weights) match PEFT too."""
    theirs, _, inputs = build_pair("llama", save_only_topk_weights=True)
    theirs.save_pretrained(tmp_path / "peft")
    path = tmp_path / "peft" / "adapter_model.safetensors"
    tensors = load_file(path)
    for key in [k for k in tensors if k.endswith("_topk_weights")]:
        w = tensors[key]
        w[..., 0, :] = torch.tensor([1 / 3, 1 / 3])  # a three-way tie (1 - 2/3 == 1/3 in float32)
        w[..., 1, :] = torch.tensor([0.0, 0.5])  # a zero weight: log 0 = -inf ties with the fill
        w[..., 2, :] = torch.tensor([0.5, 0.5])  # two halves and a zero
    save_file(tensors, str(path), metadata={"format": "pt"})
    builder = MODEL_CASES["llama"][0]
    peft_model = peft_from_pretrained(builder(), tmp_path / "peft")
    ours = vblora_rs.PeftModel.from_pretrained(builder(), tmp_path / "peft")
    theirs_layers = peft_modules(peft_model)
    for name, layer in vblora_modules(ours).items():
        want = theirs_layers[name].get_delta_weight("default")
        tolerances.assert_same(layer.get_delta_weight("default"), want, tolerances.delta(want.dtype, 3), name)


def test_compact_model_copies_pickles_and_moves(tmp_path) -> None:
    peft_model, ours, inputs = load_both(tmp_path, "mlp")
    with torch.no_grad():
        expected = output_tensor(peft_model(**inputs))
        for clone in (copy.deepcopy(ours), pickle.loads(pickle.dumps(ours))):
            assert all(layer.is_compact("default") for layer in vblora_modules(clone).values())
            assert torch.equal(output_tensor(clone(**inputs)), expected)
        fresh = vblora_rs.PeftModel.from_pretrained(MODEL_CASES["mlp"][0](), tmp_path / "peft")
        fresh.load_state_dict(ours.state_dict())
        assert torch.equal(output_tensor(fresh(**inputs)), expected)
        ours.to(torch.float64).to(torch.float32)
        assert torch.equal(output_tensor(ours(**inputs)), expected)


def test_several_compact_adapters_merge_in_one_pass_and_delete(tmp_path) -> None:
    theirs, _, inputs = build_pair("mlp", save_only_topk_weights=True)
    theirs.save_pretrained(tmp_path / "a")
    torch.manual_seed(7)
    other, _, _ = build_pair("mlp", save_only_topk_weights=True, init_logits_std=2.0)
    other.save_pretrained(tmp_path / "b")
    builder = MODEL_CASES["mlp"][0]
    ours = vblora_rs.PeftModel.from_pretrained(builder(), tmp_path / "a")
    ours.load_adapter(tmp_path / "b", "b")
    peft_model = peft_from_pretrained(builder(), tmp_path / "a")
    peft_model.load_adapter(tmp_path / "b", "b")
    merged_ours = ours.merge_and_unload(adapter_names=["default", "b"])
    merged_theirs = peft_model.merge_and_unload(adapter_names=["default", "b"])
    for (name, a), (_, b) in zip(merged_ours.state_dict().items(), merged_theirs.state_dict().items()):
        torch.testing.assert_close(a, b, **tolerances.delta(a.dtype, 4), msg=name)

    ours = vblora_rs.PeftModel.from_pretrained(builder(), tmp_path / "a")
    ours.load_adapter(tmp_path / "b", "b")
    ours.delete_adapter("b")
    assert "b" not in ours.base_model.vblora_topk and "default" in ours.base_model.vblora_topk
    reference = peft_from_pretrained(builder(), tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(output_tensor(ours(**inputs)), output_tensor(reference(**inputs)))


def test_compact_rejects_a_merged_adapter() -> None:
    _, ours, _ = build_pair("mlp")
    ours.merge_adapter()
    with pytest.raises(ValueError, match="unmerge it before compact_"):
        ours.compact_()


def test_savable_counts_of_loaded_top_k_match_peft(tmp_path) -> None:
    peft_model, ours, _ = load_both(tmp_path, "llama")
    assert ours.get_nb_savable_parameters() == peft_model.get_nb_savable_parameters()


def test_wide_index_dtype_cannot_wrap_into_range(tmp_path) -> None:
    """Indices stored wider than PEFT's dtype are checked before the table narrows them: 65,541 in int32 would
    wrap to the valid int16 index 5."""
    theirs, _, _ = build_pair("llama", save_only_topk_weights=True)
    theirs.save_pretrained(tmp_path / "peft")
    path = tmp_path / "peft" / "adapter_model.safetensors"
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith("_topk_indices"))
    wide = tensors[key].to(torch.int32)
    wide.view(-1)[0] = 65536 + 5
    tensors[key] = wide
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(vblora_rs.VBLoRAError, match=f"{key} holds indices outside"):
        vblora_rs.PeftModel.from_pretrained(MODEL_CASES["llama"][0](), tmp_path / "peft")


def _children_walked(module: torch.nn.Module) -> int:
    """Modules a recursive walk visits without de-duplication (``load_state_dict``, ``train()``, PEFT's loops)."""
    return 1 + sum(_children_walked(child) for child in module._modules.values() if child is not None)


def test_each_loaded_adapter_adds_no_modules_to_the_layers(tmp_path) -> None:
    # every walk of the model (state_dict, load_state_dict, train(), PEFT's injection) visits each registered child:
    # if adapters added children to each layer, loading the n-th one would cost n per layer
    theirs, _, _ = build_pair("llama", save_only_topk_weights=True)
    theirs.save_pretrained(tmp_path / "a")
    model = vblora_rs.PeftModel.from_pretrained(MODEL_CASES["llama"][0](), tmp_path / "a", adapter_name="a0")
    layers = vblora_modules(model)
    walked = {name: _children_walked(layer) for name, layer in layers.items()}
    for i in range(1, 4):
        model.load_adapter(tmp_path / "a", f"a{i}")
    assert {name: _children_walked(layer) for name, layer in layers.items()} == walked
    assert all(len(layer.vblora_dropout) == 4 for layer in layers.values())


def test_dropout_adapters_are_registered_and_moved_with_the_layer(tmp_path) -> None:
    theirs, _, _ = build_pair("llama", save_only_topk_weights=True, vblora_dropout=0.25)
    theirs.save_pretrained(tmp_path / "a")
    model = vblora_rs.PeftModel.from_pretrained(MODEL_CASES["llama"][0](), tmp_path / "a")
    for layer in vblora_modules(model).values():
        dropout = layer.vblora_dropout["default"]
        assert isinstance(dropout, torch.nn.Dropout) and dropout.p == 0.25
        assert dict(layer.vblora_dropout.named_children()) == {"default": dropout}
