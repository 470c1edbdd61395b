"""Parity with the real ``peft`` package: same adapter values in, same outputs, deltas, merges and checkpoints out."""

from __future__ import annotations

import json
import os

import peft
import pytest
import torch
import vblora_rs
from safetensors.torch import load_file
from support import tolerances
from support.models import MODEL_CASES, output_tensor
from support.peft_reference import bank_named_once, build_pair, peft_from_pretrained

# ours and PEFT differ in the order of the delta path's reductions (Rust kernels vs torch ops)
F32 = max((tolerances.model(case) for case in tolerances.MODELS), key=lambda t: t["rtol"])


def vblora_layers(model):
    return {n: m for n, m in model.named_modules() if hasattr(m, "vblora_logits_A")}


def assert_bits_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    scale: torch.Tensor | None = None,
    max_ulp: int = 1,
    frac_exact: float = 0.999,
) -> None:
    """Half-precision tensors: every element within ``2 * max_ulp`` ulp and ``frac_exact`` of them within
    ``max_ulp``, an ulp taken at the magnitude of ``scale`` (default: the values themselves)."""
    assert actual.dtype == expected.dtype
    a, e = actual.float(), expected.float()
    ref = torch.maximum(e.abs(), a.abs()) if scale is None else scale.float().abs()
    ulp = torch.finfo(expected.dtype).eps * ref.clamp_min(torch.finfo(expected.dtype).tiny)
    err = (a - e).abs() / ulp
    assert float(err.max()) <= 2 * max_ulp, float(err.max())
    assert float((err <= max_ulp).float().mean()) >= frac_exact


@pytest.mark.parametrize("grad", [False, True])
def test_forward_matches_peft(model_case: str, grad: bool) -> None:
    theirs, ours, inputs = build_pair(model_case)
    with torch.set_grad_enabled(grad):
        torch.testing.assert_close(output_tensor(ours(**inputs)), output_tensor(theirs(**inputs)), **F32)


def test_delta_weight_matches_peft(model_case: str) -> None:
    theirs, ours, _ = build_pair(model_case)
    t_layers, o_layers = vblora_layers(theirs), vblora_layers(ours)
    assert t_layers.keys() == o_layers.keys() and t_layers
    for name in t_layers:
        with torch.no_grad():
            expected = t_layers[name].get_delta_weight("default")
        for grad in (False, True):
            with torch.set_grad_enabled(grad):
                got = o_layers[name].get_delta_weight("default")
            assert got.dtype == expected.dtype and got.shape == expected.shape
            torch.testing.assert_close(got.detach(), expected, **F32)
        A_t, B_t = t_layers[name]._get_lora_matrices("default")
        with torch.no_grad():
            A_o, B_o = o_layers[name]._get_lora_matrices("default")
        torch.testing.assert_close(A_o, A_t.detach(), **F32)
        torch.testing.assert_close(B_o, B_t.detach(), **F32)


def test_merge_and_unload_matches_peft(model_case: str) -> None:
    theirs, ours, inputs = build_pair(model_case)
    with torch.no_grad():
        expected_out = output_tensor(theirs(**inputs))
    merged_t = theirs.merge_and_unload()
    merged_o = ours.merge_and_unload()
    assert type(merged_o) is type(merged_t)
    sd_t, sd_o = merged_t.state_dict(), merged_o.state_dict()
    assert sd_t.keys() == sd_o.keys()
    for key in sd_t:
        tol = tolerances.delta(torch.float32, 4, float(sd_t[key].abs().max()))
        torch.testing.assert_close(sd_o[key], sd_t[key], **tol)
    with torch.no_grad():
        torch.testing.assert_close(output_tensor(merged_o(**inputs)), expected_out, **F32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_merge_matches_peft(dtype: torch.dtype) -> None:
    theirs, ours, inputs = build_pair("llama", dtype=dtype)
    # adapters stay float32 over a half-precision base (PEFT's autocast_adapter_dtype)
    for layer in vblora_layers(ours).values():
        assert layer.vblora_logits_A["default"].dtype == torch.float32
    assert ours.vblora_vector_bank["default"].dtype == torch.float32
    with torch.no_grad():
        out_t, out_o = output_tensor(theirs(**inputs)), output_tensor(ours(**inputs))
    assert out_o.dtype == dtype
    torch.testing.assert_close(out_o, out_t, **tolerances.half_model("llama", dtype))
    theirs.merge_adapter()
    ours.merge_adapter()
    merged = {}
    for name, layer in vblora_layers(theirs).items():
        merged[name] = layer.get_base_layer().weight.detach().clone()
        assert_bits_close(vblora_layers(ours)[name].get_base_layer().weight, merged[name])
    theirs.unmerge_adapter()
    ours.unmerge_adapter()
    for name, layer in vblora_layers(theirs).items():
        # W + d - d: the rounding of the merged value remains, so the ulp is the merged weight's
        assert_bits_close(
            vblora_layers(ours)[name].get_base_layer().weight, layer.get_base_layer().weight, scale=merged[name]
        )


def test_layer_merge_unmerge_matches_peft() -> None:
    theirs, ours, inputs = build_pair("gpt2")
    for name, t_layer in vblora_layers(theirs).items():
        o_layer = vblora_layers(ours)[name]
        t_layer.merge()
        o_layer.merge()
        torch.testing.assert_close(o_layer.get_base_layer().weight, t_layer.get_base_layer().weight, **F32)
        assert o_layer.merged and o_layer.merged_adapters == ["default"]
        t_layer.unmerge()
        o_layer.unmerge()
        torch.testing.assert_close(o_layer.get_base_layer().weight, t_layer.get_base_layer().weight, **F32)
        assert not o_layer.merged


@pytest.mark.parametrize("topk_only", [False, True])
def test_checkpoint_files_match_peft(tmp_path, topk_only: bool) -> None:
    theirs, ours, _ = build_pair("mlp", save_only_topk_weights=topk_only, modules_to_save=["head"], bias="all")
    # modules_to_save copies are trained in practice: make them differ from the original module
    with torch.no_grad():
        for model in (theirs, ours):
            model.base_model.model.head.modules_to_save["default"].weight.fill_(0.25)
    theirs.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "ours")
    t_sd = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    o_sd = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert sorted(o_sd) == sorted(t_sd)
    for key in t_sd:
        assert o_sd[key].dtype == t_sd[key].dtype, key
        assert o_sd[key].shape == t_sd[key].shape, key
        # top-K weights too: the softmax of the kept logits is torch's own
        assert torch.equal(o_sd[key], t_sd[key]), key
    t_cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    o_cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    for key, value in o_cfg.items():
        if key not in ("auto_mapping", "peft_version", "target_modules"):
            assert t_cfg[key] == value, key
    assert sorted(o_cfg["target_modules"]) == sorted(t_cfg["target_modules"])


@pytest.mark.parametrize("topk_only", [False, True])
@pytest.mark.parametrize("case", ["mlp", "gpt2", "llama"])
def test_checkpoints_load_both_ways(tmp_path, case: str, topk_only: bool) -> None:
    theirs, ours, inputs = build_pair(case, save_only_topk_weights=topk_only)
    theirs.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "ours")
    builder = MODEL_CASES[case][0]

    peft_from_peft = peft_from_pretrained(builder(), tmp_path / "peft")
    ours_from_peft = vblora_rs.PeftModel.from_pretrained(builder(), tmp_path / "peft")
    peft_from_ours = peft_from_pretrained(builder(), tmp_path / "ours")
    ours_from_ours = vblora_rs.PeftModel.from_pretrained(builder(), tmp_path / "ours")
    with torch.no_grad():
        reference = output_tensor(peft_from_peft(**inputs))
        for model in (ours_from_peft, peft_from_ours, ours_from_ours):
            torch.testing.assert_close(output_tensor(model(**inputs)), reference, **F32)
        if not topk_only:  # full logits round-trip exactly: the loaded models equal the saved one
            torch.testing.assert_close(output_tensor(ours(**inputs)), reference, **F32)
    assert not ours_from_peft.training
    assert not any(p.requires_grad for p in ours_from_peft.parameters())
    if topk_only:
        for model in (peft_from_peft, ours_from_peft):
            model.train()
            with pytest.raises(RuntimeError, match="Found infinity values in VB-LoRA logits"):
                model(**inputs)


def test_savable_parameter_counts_match_peft(model_case: str) -> None:
    for topk_only in (False, True):
        theirs, ours, _ = build_pair(model_case, save_only_topk_weights=topk_only)
        assert ours.get_nb_savable_parameters() == theirs.get_nb_savable_parameters()
        assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def test_print_methods_match_peft(capsys) -> None:
    theirs, ours, _ = build_pair("mlp")
    theirs.print_trainable_parameters()
    theirs.print_savable_parameters()
    expected = capsys.readouterr().out
    ours.print_trainable_parameters()
    ours.print_savable_parameters()
    assert capsys.readouterr().out == expected


def test_multiple_adapters_set_and_disable_match_peft() -> None:
    theirs, ours, inputs = build_pair("mlp")
    extra = {
        "target_modules": ["lin0", "lin2"],
        "vector_length": 8,
        "num_vectors": 16,
        "r": 2,
        "init_vector_bank_bound": 0.5,
        "init_logits_std": 1.0,
    }
    theirs.add_adapter("other", peft.VBLoRAConfig(**extra))
    ours.add_adapter("other", vblora_rs.VBLoRAConfig(**extra))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = inputs["x"]
    with torch.no_grad():
        for adapter in ("other", "default"):
            theirs.set_adapter(adapter)
            ours.set_adapter(adapter)
            assert ours.active_adapter == theirs.active_adapter == adapter
            torch.testing.assert_close(ours(x), theirs(x), **F32)
            trainable_t = sorted(bank_named_once(n) for n, p in theirs.named_parameters() if p.requires_grad)
            trainable_o = sorted(n for n, p in ours.named_parameters() if p.requires_grad)
            assert trainable_o == trainable_t
        with theirs.disable_adapter(), ours.disable_adapter():
            torch.testing.assert_close(ours(x), theirs(x), **F32)
            torch.testing.assert_close(ours(x), MODEL_CASES["mlp"][0]()(x), **F32)
        # several active adapters in one layer
        for model in (theirs, ours):
            model.base_model.set_adapter(["default", "other"])
        torch.testing.assert_close(ours(x), theirs(x), **F32)
        # merging several adapters (one pass for us) equals PEFT's sequential merges
        theirs.merge_adapter()
        ours.merge_adapter()
        for name, layer in vblora_layers(theirs).items():
            torch.testing.assert_close(
                vblora_layers(ours)[name].get_base_layer().weight,
                layer.get_base_layer().weight,
                **tolerances.delta(torch.float32, 4, float(layer.get_base_layer().weight.abs().max())),
            )
        torch.testing.assert_close(ours(x), theirs(x), **F32)
    for model in (theirs, ours):
        with pytest.raises(ValueError, match="while they are merged"):
            model.delete_adapter("other")
        model.unmerge_adapter()
        model.delete_adapter("other")
    assert list(ours.peft_config) == list(theirs.peft_config) == ["default"]


def test_multiple_adapters_save_layout_matches_peft(tmp_path) -> None:
    theirs, ours, _ = build_pair("mlp")
    extra = {"target_modules": ["lin0"], "vector_length": 8, "num_vectors": 16, "r": 2}
    theirs.add_adapter("other", peft.VBLoRAConfig(**extra))
    ours.add_adapter("other", vblora_rs.VBLoRAConfig(**extra))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "ours")
    for sub in ("", "other"):
        t_sd = load_file(tmp_path / "peft" / sub / "adapter_model.safetensors")
        o_sd = load_file(tmp_path / "ours" / sub / "adapter_model.safetensors")
        assert sorted(o_sd) == sorted(t_sd)
        for key in t_sd:
            assert torch.equal(o_sd[key], t_sd[key]), key
    loaded = vblora_rs.PeftModel.from_pretrained(MODEL_CASES["mlp"][0](), tmp_path / "ours")
    loaded.load_adapter(tmp_path / "ours" / "other", adapter_name="other")
    assert sorted(loaded.peft_config) == ["default", "other"]
    assert os.path.isfile(tmp_path / "ours" / "other" / "adapter_config.json")


def test_dropout_in_training_matches_peft() -> None:
    theirs, ours, inputs = build_pair("mlp", vblora_dropout=0.3)
    theirs.train()
    ours.train()
    torch.manual_seed(7)
    out_t = theirs(**inputs)
    torch.manual_seed(7)
    out_o = ours(**inputs)
    torch.testing.assert_close(out_o, out_t, **F32)
    theirs.eval()
    ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs), theirs(**inputs), **F32)


def test_training_gradients_match_peft() -> None:
    theirs, ours, inputs = build_pair("llama")
    theirs.train()
    ours.train()
    output_tensor(theirs(**inputs)).square().mean().backward()
    output_tensor(ours(**inputs)).square().mean().backward()
    t_grads = {bank_named_once(n): p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    o_grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert t_grads.keys() == o_grads.keys()
    for name in t_grads:
        torch.testing.assert_close(o_grads[name], t_grads[name], **tolerances.model("llama", backward=True))


def test_safe_merge_with_nan_bank_matches_peft() -> None:
    theirs, ours, _ = build_pair("mlp")
    with torch.no_grad():
        theirs.vblora_vector_bank["default"][0].fill_(float("nan"))
        ours.vblora_vector_bank["default"][0].fill_(float("nan"))
        # make every sub-vector select vector 0
        for model in (theirs, ours):
            for layer in vblora_layers(model).values():
                layer.vblora_logits_A["default"][..., 0] = 100.0
    for model in (theirs, ours):
        layer = model.base_model.model.lin0
        before = layer.get_base_layer().weight.detach().clone()
        with pytest.raises(ValueError, match="NaNs detected in the merged weights"):
            layer.merge(safe_merge=True)
        assert torch.equal(layer.get_base_layer().weight, before)
        assert not layer.merged


@pytest.mark.skipif(
    vblora_rs._native.simd_level() == "portable",
    reason="bit parity needs an FMA level (AVX2+FMA or AVX-512: torch's matmul rounds B @ A as an FMA chain)",
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_weights_bit_identical_to_peft(dtype: torch.dtype) -> None:
    """Exact top-K order, torch's softmax bits, the gather's order of sums and FMA in the delta: the merged
    weights are PEFT's to the bit."""
    theirs, ours, _ = build_pair("llama", dtype=dtype)
    merged_t = theirs.merge_and_unload().state_dict()
    merged_o = ours.merge_and_unload().state_dict()
    for key, value in merged_t.items():
        assert torch.equal(merged_o[key], value), key
