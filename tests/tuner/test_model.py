"""Injection, target selection, adapter management and the errors the foundation issue names."""

from __future__ import annotations

import os
import warnings

import peft
import pytest
import torch
import vblora_rs
from support import tolerances
from support.models import MLP, make_mlp
from torch import nn
from vblora_rs import Linear, PeftModel, VBLoRAConfig, VBLoRALayer, VBLoRAModel, get_peft_model
from vblora_rs.demo.mini_models import build


def adapted(model: nn.Module) -> list[str]:
    return sorted(n for n, m in model.base_model.model.named_modules() if isinstance(m, VBLoRALayer))


def cfg(**kw: object) -> VBLoRAConfig:
    return VBLoRAConfig(**{"vector_length": 8, "num_vectors": 16, **kw})


def test_public_api_and_layout() -> None:
    base = make_mlp()
    model = get_peft_model(base, cfg(target_modules=["lin0", "lin1"]))
    # PEFT's own model class, with our tuner (a subclass of PEFT's) as base_model
    assert PeftModel is peft.PeftModel and isinstance(model, peft.PeftModel)
    assert isinstance(model.base_model, VBLoRAModel) and isinstance(model.base_model, peft.VBLoRAModel)
    assert model.base_model.model is base
    assert isinstance(model.lin0, Linear)  # attribute access falls through to the user's model
    bank = model.vblora_vector_bank
    assert isinstance(bank, nn.ParameterDict) and bank["default"].shape == (16, 8)
    # one bank tensor, shared by every layer
    assert model.lin0.vblora_vector_bank["default"] is bank["default"]
    assert model.lin1.vblora_vector_bank["default"] is bank["default"]
    assert model.lin0.vblora_logits_A["default"].shape == (4, 16 // 8, 16)
    assert model.lin0.vblora_logits_B["default"].shape == (32 // 8, 4, 16)
    assert model.lin0.r == {"default": 4} and model.lin0.topk == {"default": 2}
    assert model.active_adapter == "default" and set(model.peft_config) == {"default"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("vblora_" in n for n in trainable)


@pytest.mark.parametrize(
    "targets, expected",
    [
        (["lin0"], ["lin0"]),
        ("lin[01]", ["lin0", "lin1"]),  # a string is a full regex match
        ("lin", []),
        ("all-linear", ["head", "lin0", "lin1", "lin2"]),  # a plain nn.Module has no output head to skip
    ],
)
def test_target_selection(targets: object, expected: list[str]) -> None:
    # vector_length 4 divides the 4 outputs of the head, which "all-linear" picks in a plain nn.Module
    config = cfg(target_modules=targets, vector_length=4)
    if not expected:
        with pytest.raises(ValueError, match="not found in the base model"):
            get_peft_model(make_mlp(), config)
        return
    assert adapted(get_peft_model(make_mlp(), config)) == expected


def test_dotted_suffix_match_and_exclude() -> None:
    model = get_peft_model(
        build("llama"),
        cfg(target_modules=["self_attn.q_proj", "v_proj"], exclude_modules=["model.layers.1.self_attn.v_proj"]),
    )
    assert adapted(model) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj",
    ]
    model = get_peft_model(build("llama"), cfg(target_modules=["q_proj"], exclude_modules=r".*layers\.0\..*"))
    assert adapted(model) == ["model.layers.1.self_attn.q_proj"]


def test_all_linear_skips_output_head() -> None:
    model = get_peft_model(build("llama"), cfg(target_modules="all-linear"))
    names = adapted(model)
    assert "lm_head" not in names and len(names) == 2 * 7


@pytest.mark.parametrize(
    "name, expected",
    [
        ("llama", ["q_proj", "v_proj"]),
        ("opt", ["fc1", "fc2", "k_proj", "out_proj", "q_proj", "v_proj"]),
    ],
)
def test_default_targets_per_model_type(name: str, expected: list[str]) -> None:
    model = get_peft_model(build(name), cfg(target_modules=None))
    assert sorted({n.rsplit(".", 1)[-1] for n in adapted(model)}) == expected


def test_default_targets_gpt2_conv1d() -> None:
    model = get_peft_model(build("gpt2"), cfg(target_modules=None, fan_in_fan_out=True, vector_length=16))
    assert adapted(model) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    layer = model.transformer.h[0].attn.c_attn
    assert layer.fan_in_fan_out and layer.is_target_conv_1d_layer
    assert (layer.in_features, layer.out_features) == (32, 96)


def test_unknown_model_type_needs_targets() -> None:
    with pytest.raises(ValueError, match="Please specify `target_modules`"):
        get_peft_model(make_mlp(), cfg(target_modules=None))


def test_layers_to_transform() -> None:
    model = get_peft_model(
        build("llama"), cfg(target_modules=["q_proj"], layers_to_transform=[1], layers_pattern="layers")
    )
    assert adapted(model) == ["model.layers.1.self_attn.q_proj"]
    model = get_peft_model(build("llama"), cfg(target_modules=["q_proj"], layers_to_transform=0))
    assert adapted(model) == ["model.layers.0.self_attn.q_proj"]
    with pytest.raises(ValueError, match="layers_to_transform"):
        cfg(target_modules=["q_proj"], layers_pattern="layers")


def test_fan_in_fan_out_corrected_with_warning() -> None:
    with pytest.warns(UserWarning, match="Setting fan_in_fan_out to True"):
        model = get_peft_model(build("gpt2"), cfg(target_modules=["c_attn"], vector_length=16))
    assert model.transformer.h[0].attn.c_attn.fan_in_fan_out
    with pytest.warns(UserWarning, match="Setting fan_in_fan_out to False"):
        model = get_peft_model(make_mlp(), cfg(target_modules=["lin0"], fan_in_fan_out=True))
    assert not model.lin0.fan_in_fan_out


# --- errors -------------------------------------------------------------------------------------


def test_unsupported_module_type_names_module() -> None:
    with pytest.raises(TypeError, match=r"module 'relu'.*ReLU\(\) is not supported"):
        get_peft_model(make_mlp(), cfg(target_modules=["relu"]))


def test_indivisible_features_name_module_and_numbers() -> None:
    with pytest.raises(ValueError, match=r"module 'lin1'.*`out_features` 24 must be divisible by `vector_length` 16"):
        get_peft_model(make_mlp(), cfg(target_modules=["lin0", "lin1"], vector_length=16))


def test_failed_injection_leaves_model_untouched() -> None:
    base = make_mlp()
    with pytest.raises(ValueError):
        get_peft_model(base, cfg(target_modules=["lin0", "lin1"], vector_length=16))
    assert type(base.lin0) is nn.Linear and type(base.lin1) is nn.Linear


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r": 0}, "`r` 0 should be a positive integer"),
        ({"r": -2}, "`r` -2 should be a positive integer"),
        ({"topk": 0}, "`topk` 0 should be a positive integer"),
        ({"topk": 17}, "`topk` 17 must not exceed `num_vectors` 16"),
        ({"bias": "some"}, "Requested bias: some, is not implemented"),
    ],
)
def test_config_validation(kwargs: dict, message: str) -> None:
    # PEFT's config takes any values; the injection refuses them, naming the module, and leaves the model as it was
    base = make_mlp()
    with pytest.raises((ValueError, NotImplementedError), match=message):
        get_peft_model(base, cfg(target_modules=["lin0"], **kwargs))
    assert type(base.lin0) is nn.Linear


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r": 0}, "`r` 0 should be a positive integer"),
        ({"topk": 0}, "`topk` 0 should be a positive integer"),
        ({"topk": 20}, "`topk` 20 must not exceed `num_vectors` 16"),
        ({"vector_length": 5}, "`in_features` 16 must be divisible by `vector_length` 5"),
    ],
)
def test_standalone_linear_validation(kwargs: dict, message: str) -> None:
    args = {"r": 4, "num_vectors": 16, "vector_length": 8, "topk": 2, **kwargs}
    bank = nn.ParameterDict({"a": nn.Parameter(torch.zeros(args["num_vectors"], args["vector_length"]))})
    with pytest.raises(ValueError, match=message):
        Linear(nn.Linear(16, 32), bank, "a", **args)


def test_standalone_linear_rejects_other_modules() -> None:
    bank = nn.ParameterDict({"a": nn.Parameter(torch.zeros(16, 8))})
    with pytest.raises(TypeError, match="Embedding is not supported"):
        Linear(nn.Embedding(16, 8), bank, "a", r=2, num_vectors=16, vector_length=8)


def test_bank_shape_mismatch_rejected() -> None:
    bank = nn.ParameterDict({"a": nn.Parameter(torch.zeros(16, 4))})
    with pytest.raises(ValueError, match=r"vector bank of adapter 'a' has shape \(16, 4\)"):
        Linear(nn.Linear(16, 32), bank, "a", r=2, num_vectors=16, vector_length=8)


def test_second_adapter_with_bias_rejected() -> None:
    model = get_peft_model(make_mlp(), cfg(target_modules=["lin0"], bias="all"))
    with pytest.raises(ValueError, match="supports only 1 adapter with bias"):
        model.add_adapter("b", cfg(target_modules=["lin0"], bias="all"))


def test_duplicate_adapter_name_rejected() -> None:
    model = get_peft_model(make_mlp(), cfg(target_modules=["lin0"]))
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("default", cfg(target_modules=["lin0"]))


# --- behaviour ----------------------------------------------------------------------------------


def test_standalone_linear_over_nn_linear_and_conv1d() -> None:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    for base, fan_in_fan_out in ((nn.Linear(16, 32), False), (Conv1D(32, 16), True)):
        bank = nn.ParameterDict({"a": nn.Parameter(torch.rand(16, 8) - 0.5)})
        layer = Linear(
            base,
            bank,
            "a",
            r=2,
            num_vectors=16,
            vector_length=8,
            init_logits_std=1.0,
            fan_in_fan_out=fan_in_fan_out,
            is_target_conv_1d_layer=fan_in_fan_out,
        )
        x = torch.randn(3, 16)
        A, B = layer._get_lora_matrices("a")
        assert A.shape == (2, 16) and B.shape == (32, 2)
        expected = base(x) + x @ A.T @ B.T
        torch.testing.assert_close(layer(x), expected, **tolerances.reordered(torch.float32, 16, 2, 4.0))
        layer.eval()
        with torch.no_grad():
            unmerged = layer(x)
            layer.merge()
            torch.testing.assert_close(layer(x), unmerged, **tolerances.reordered(torch.float32, 16, 2, 4.0))
            layer.unmerge()
            torch.testing.assert_close(layer(x), unmerged, **tolerances.reordered(torch.float32, 16, 2, 4.0))
        assert repr(layer).startswith("vblora.")


def test_layer_adapter_management() -> None:
    model = get_peft_model(make_mlp(), cfg(target_modules=["lin0"]))
    model.add_adapter("b", cfg(target_modules=["lin0"]))
    layer = model.lin0
    assert layer.get_base_layer() is layer.base_layer
    assert set(layer.vblora_logits_A) == {"default", "b"}
    assert not layer.vblora_logits_A["b"].requires_grad  # added adapters are inactive and frozen
    layer.set_adapter(["default", "b"])
    assert layer.active_adapters == ["default", "b"]
    layer.enable_adapters(False)
    assert layer.disable_adapters and not layer.vblora_logits_A["default"].requires_grad
    layer.enable_adapters(True)
    assert layer.vblora_logits_A["default"].requires_grad
    layer.delete_adapter("default")
    assert layer.active_adapters == ["b"] and "default" not in layer.r
    model.delete_adapter("default")
    assert model.active_adapter == "b"
    with pytest.raises(ValueError, match="not found"):
        model.set_adapter("default")


def test_disabled_forward_unmerges_and_matches_base() -> None:
    base = make_mlp()
    reference = make_mlp()
    model = get_peft_model(base, cfg(target_modules=["lin0", "lin2"], init_vector_bank_bound=0.5))
    x = torch.randn(4, 16)
    model.merge_adapter()
    with model.disable_adapter(), torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), **tolerances.model("mlp"))
    assert not model.lin0.merged


def test_merge_warnings_like_peft() -> None:
    model = get_peft_model(make_mlp(), cfg(target_modules=["lin0"]))
    model.lin0.merge()
    with pytest.warns(UserWarning, match="All adapters are already merged"):
        model.lin0.merge()
    model.lin0.unmerge()
    with pytest.warns(UserWarning, match="Already unmerged"):
        model.lin0.unmerge()
    with pytest.raises(TypeError, match="adapter_names should be a list"):
        model.lin0.merge(adapter_names="default")


def test_unload_restores_base_modules() -> None:
    base = make_mlp()
    weight = base.lin0.weight.detach().clone()
    model = get_peft_model(base, cfg(target_modules=["lin0"], modules_to_save=["head"]))
    unloaded = model.unload()
    assert type(unloaded.lin0) is nn.Linear and type(unloaded.head) is nn.Linear
    assert torch.equal(unloaded.lin0.weight, weight)


def test_half_precision_base_keeps_float32_adapter_and_input_dtype() -> None:
    model = get_peft_model(make_mlp().to(torch.bfloat16), cfg(target_modules=["lin0", "lin1"]))
    assert model.lin0.vblora_logits_A["default"].dtype == torch.float32
    out = model(torch.randn(2, 16, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16


def test_modules_to_save_trainable_copy() -> None:
    model = get_peft_model(make_mlp(), cfg(target_modules=["lin0"], modules_to_save=["head"]))
    head = model.head
    assert head.modules_to_save["default"].weight.requires_grad
    assert not head.original_module.weight.requires_grad
    with torch.no_grad():
        head.modules_to_save["default"].weight.zero_()
        head.modules_to_save["default"].bias.zero_()
    assert torch.count_nonzero(model(torch.randn(2, 16))) == 0
    merged = model.merge_and_unload()
    assert type(merged.head) is nn.Linear and torch.count_nonzero(merged.head.weight) == 0


def test_bias_modes_trainable() -> None:
    model = get_peft_model(MLP(), cfg(target_modules=["lin0"], bias="vblora_only"))
    assert model.lin0.base_layer.bias.requires_grad and not model.lin2.bias.requires_grad
    model = get_peft_model(MLP(), cfg(target_modules=["lin0"], bias="all"))
    assert model.lin0.base_layer.bias.requires_grad and model.lin2.bias.requires_grad


def test_training_step_updates_adapter_only() -> None:
    model = get_peft_model(make_mlp(), cfg(target_modules=["lin0", "lin1", "lin2"], init_vector_bank_bound=0.5))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(params, lr=1e-2)
    loss = model(torch.randn(8, 16)).square().mean()
    loss.backward()
    opt.step()
    for name, p in model.named_parameters():
        changed = not torch.equal(before[name], p)
        assert changed == p.requires_grad, name


def test_no_warnings_on_plain_use() -> None:
    # warnings transformers raises inside PEFT's own calls (deprecations) are not ours to fix
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = get_peft_model(build("llama"), cfg(target_modules=["q_proj", "v_proj"]))
        model(torch.randint(0, 64, (1, 4)))
    # raised in the package's own files (a virtualenv under a path named vblora_rs holds transformers too)
    package = os.path.dirname(vblora_rs.__file__) + os.sep
    ours = [w for w in caught if w.filename.startswith(package)]
    assert not ours, [str(w.message) for w in ours]


def test_ops_low_rank_matrices_match_layer() -> None:
    from vblora_rs import ops

    model = get_peft_model(make_mlp(), cfg(target_modules=["lin1"], init_logits_std=1.0))
    layer = model.lin1
    logits_A, logits_B = layer.vblora_logits_A["default"], layer.vblora_logits_B["default"]
    bank = model.vblora_vector_bank["default"]
    with torch.no_grad():
        A, B = ops.low_rank_matrices(logits_A, logits_B, bank, 2)
        ia, wa = ops.topk_softmax(logits_A, 2)
        ib, wb = ops.topk_softmax(logits_B, 2)
        A2, B2 = ops.low_rank_matrices_from_topk(ia, wa, ib, wb, bank)
    A_ref, B_ref = layer._get_lora_matrices("default")  # autograd path: PEFT's torch ops
    assert A.shape == (4, 32) and B.shape == (24, 4)
    tol = tolerances.delta(torch.float32, 2, scale=float(bank.abs().max()))
    torch.testing.assert_close(A, A_ref.detach(), **tol)
    torch.testing.assert_close(B, B_ref.detach(), **tol)
    torch.testing.assert_close(A2, A, **tol)
    torch.testing.assert_close(B2, B, **tol)
    with pytest.raises(ValueError, match="with the same r"):
        ops.low_rank_matrices(logits_A, logits_B[:, :2], bank, 2)


def test_bank_drawn_once_per_adapter_and_redrawn_on_request() -> None:
    # injection draws one bank for all targets; PEFT's tests redraw it through the tuner's init method
    model = get_peft_model(make_mlp(), cfg(target_modules=["lin0", "lin1", "lin2"]))
    bank = model.vblora_vector_bank["default"]
    assert all(m.vblora_vector_bank["default"] is bank for m in (model.lin0, model.lin1, model.lin2))
    with torch.no_grad():
        bank.zero_()
    model.base_model._init_vblora_vector_bank(model.peft_config["default"], "default")
    new = model.vblora_vector_bank["default"]
    assert new is not bank and bool(new.abs().sum() > 0)
    assert all(m.vblora_vector_bank["default"] is new for m in (model.lin0, model.lin1, model.lin2))
