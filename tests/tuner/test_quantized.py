"""VB-LoRA over bitsandbytes quantized bases (4-bit NF4 / FP4 with and without double quantization, 8-bit
LLM.int8()): injection into a transformers model loaded with ``BitsAndBytesConfig`` (bitsandbytes runs 4-bit and
8-bit on CPU), forward and backward against PEFT's own classes and against the dequantized base, QLoRA training,
merging into the quantized weight within one quantization step, unmerge back to the same bits, the adapter merged
into the bf16 base with ``vblora merge``, and the layers we refuse."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from support import tolerances
from support.peft_reference import bank_named_once, peft_from_pretrained, peft_get_peft_model
from torch import nn

bnb = pytest.importorskip("bitsandbytes")

import peft  # noqa: E402
import vblora_rs  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402
from vblora_rs.cli import main as cli_main  # noqa: E402
from vblora_rs.demo import mini_models  # noqa: E402
from vblora_rs.errors import VBLoRAError  # noqa: E402
from vblora_rs.tuner import bnb_weights  # noqa: E402
from vblora_rs.tuner.layer import VBLoRALayer  # noqa: E402
from vblora_rs.tuner.quantized import Linear4bit, Linear8bitLt, QuantizedLinear  # noqa: E402

# The tests' tiny Llama made wider: out-features of every projection a multiple of 32 (bitsandbytes' CPU layout
# packs rows in groups of 32).
WIDER = {"hidden_size": 64, "intermediate_size": 128}
LLAMA = mini_models.config("llama", **WIDER)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# init values that make deltas as large as a few quantization steps, so merging moves the codes
ADAPTER = {"r": 4, "num_vectors": 48, "vector_length": 16, "topk": 2, "target_modules": TARGETS}
BIG = {"init_vector_bank_bound": 0.5, "init_logits_std": 1.0}
LONGEST = LLAMA.intermediate_size  # longest reduction of the model
DEPTH = tolerances.network_depth(LLAMA.num_hidden_layers)


def model_tol(backward: bool = False) -> dict[str, float]:
    """Outputs (or gradients: the chain runs twice) of this Llama computed in another order, in float32."""
    return tolerances.reordered(torch.float32, LONGEST, DEPTH * (2 if backward else 1))


FP32 = torch.float32
QUANT = {
    "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": FP32},
    "fp4": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4", "bnb_4bit_compute_dtype": FP32},
    "nf4-dq": {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": FP32,
    },
    "fp4-dq": {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "fp4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": FP32,
    },
    "nf4-bf16-storage": {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": FP32,
        "bnb_4bit_quant_storage": torch.bfloat16,
    },
    "nf4-bf16-compute": {  # QLoRA's usual setting: the adapters are cast to bfloat16 too (PEFT's device move)
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": torch.bfloat16,
    },
    "int8": {"load_in_8bit": True},
}
FOUR_BIT = ["nf4", "fp4", "nf4-dq", "fp4-dq", "nf4-bf16-storage"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama saved in float32 (the full-precision base)."""
    folder = tmp_path_factory.mktemp("llama")
    mini_models.save("llama", folder, **WIDER)
    return folder


def load_quantized(folder: Path, quant: str) -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=BitsAndBytesConfig(**QUANT[quant]))


def vb_model(model: nn.Module, seed: int = 1, **overrides: Any) -> Any:
    torch.manual_seed(seed)
    return vblora_rs.get_peft_model(model, peft.VBLoRAConfig(**{**ADAPTER, **BIG, **overrides}))


def quantized_layers(model: nn.Module) -> list[tuple[str, QuantizedLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]


def ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, LLAMA.vocab_size, (2, 9), generator=torch.Generator().manual_seed(seed))


def copy_adapter(src: nn.Module, dst: nn.Module) -> None:
    """Copy every VB-LoRA tensor (logits, bank) of ``src`` into the same-named tensor of ``dst``."""
    params = {bank_named_once(n): p for n, p in dst.named_parameters()}
    with torch.no_grad():
        for name, p in src.named_parameters():
            if "vblora" in name:
                params[bank_named_once(name)].copy_(p)


def dense_copy(model: nn.Module) -> nn.Module:
    """``model`` with every bitsandbytes layer (wrapped or not) replaced by ``nn.Linear`` holding its dequantized
    weight in float32: the same network on the dequantized base."""
    dense = copy.deepcopy(model)
    for module in list(dense.modules()):
        for child_name, child in list(module.named_children()):
            if bnb_weights.kind_of(child) is None:
                continue
            linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
            with torch.no_grad():
                linear.weight.copy_(bnb_weights.dequantize(bnb_weights.snapshot(child)))
                if child.bias is not None:
                    linear.bias.copy_(child.bias.float())
            setattr(module, child_name, linear)
    return dense


def adapter_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    named = model.named_parameters()
    return {bank_named_once(n): p.grad.clone() for n, p in named if "vblora" in n and p.grad is not None}


# --- reading the quantized weights ----------------------------------------------------------------------------


@pytest.mark.parametrize("quant", FOUR_BIT)
def test_4bit_values_are_bitsandbytes_own(base_dir: Path, quant: str) -> None:
    model = load_quantized(base_dir, quant)
    for _, layer in [(n, m) for n, m in model.named_modules() if bnb_weights.kind_of(m) == "4bit"]:
        ours = bnb_weights.dequantize(bnb_weights.snapshot(layer))
        theirs = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
        assert torch.equal(ours, theirs)


def test_8bit_values_are_bitsandbytes_own(base_dir: Path) -> None:
    model = load_quantized(base_dir, "int8")
    for layer in [m for m in model.modules() if bnb_weights.kind_of(m) == "8bit"]:
        snap = bnb_weights.snapshot(layer)
        theirs = bnb.functional.int8_vectorwise_dequant(snap.CB, snap.SCB)
        # two float32 products in another order: two roundings apart at most
        rtol = 4 * tolerances.unit_roundoff(FP32)
        torch.testing.assert_close(bnb_weights.dequantize(snap), theirs, rtol=rtol, atol=0)


def cpu_layout(layer: nn.Module) -> None:
    """Repack ``layer``'s 4-bit weight into the layout bitsandbytes' first no-grad CPU forward makes on CPUs with
    AVX512-BF16 (called directly so that every machine runs this path)."""
    convert = getattr(bnb.functional, "_convert_weight_packed_for_cpu", None)
    if convert is None:
        pytest.skip(f"bitsandbytes {bnb.__version__} has no CPU layout")
    data, state = convert(layer.weight.data, layer.weight.quant_state)
    layer.weight.data, layer.weight.quant_state = data, state


@pytest.mark.parametrize("quant", ["nf4", "fp4-dq"])
def test_cpu_layout_is_read(base_dir: Path, quant: str) -> None:
    model = load_quantized(base_dir, quant)
    layer = model.model.layers[0].mlp.up_proj
    before = bnb_weights.dequantize(bnb_weights.snapshot(layer))
    absmax = bnb_weights.quantization_step(layer)  # any per-block quantity, to find each block's scale
    cpu_layout(layer)
    after = bnb_weights.dequantize(bnb_weights.snapshot(layer))
    # the CPU layout holds the same codes; only the block scales are rounded to bfloat16 (|code| <= 1)
    scale = absmax / float(layer.weight.quant_state.code.float().sort().values.diff().max())
    slack = 1 + 4 * tolerances.unit_roundoff(FP32)  # the scale recovered as step / gap: a few float32 roundings
    assert ((after - before).abs() <= tolerances.unit_roundoff(torch.bfloat16) * scale * slack).all()


# --- injection, forward, backward -------------------------------------------------------------------------------


@pytest.mark.parametrize("quant", [*FOUR_BIT, "nf4-bf16-compute", "int8"])
def test_injection_and_parity_with_peft(base_dir: Path, quant: str) -> None:
    """Our layers wrap every bitsandbytes layer; logits and adapter gradients are PEFT's (same base forward, the
    adapter term reordered)."""
    ours = vb_model(load_quantized(base_dir, quant))
    layers = quantized_layers(ours)
    assert len(layers) == len(TARGETS) * LLAMA.num_hidden_layers
    expected = Linear8bitLt if quant == "int8" else Linear4bit
    assert all(type(m) is expected for _, m in layers)
    theirs = peft_get_peft_model(load_quantized(base_dir, quant), peft.VBLoRAConfig(**ADAPTER, **BIG))
    copy_adapter(ours, theirs)
    for model in (ours, theirs):
        model.train()
        model(ids(), labels=ids()).loss.backward()
    bf16 = QUANT[quant].get("bnb_4bit_compute_dtype") == torch.bfloat16
    # bfloat16 on both sides: the same ops, each chained step rounding about twice (tolerances.half_model)
    tol = tolerances.reordered(torch.bfloat16, 1, 2 * DEPTH) if bf16 else model_tol(backward=True)
    with torch.no_grad():
        out_tol = tolerances.reordered(torch.bfloat16, 1, DEPTH) if bf16 else model_tol()
        torch.testing.assert_close(ours(ids()).logits, theirs(ids()).logits, **out_tol)
    got, want = adapter_grads(ours), adapter_grads(theirs)
    assert got.keys() == want.keys() and got
    for name in got:
        scale = float(want[name].abs().max())
        torch.testing.assert_close(got[name], want[name], rtol=tol["rtol"], atol=tol["atol"] * scale, msg=name)


@pytest.mark.parametrize("quant", ["nf4", "fp4-dq"])
def test_4bit_forward_backward_match_the_dequantized_base(base_dir: Path, quant: str) -> None:
    """With float32 compute, bitsandbytes multiplies by the dequantized weight: the same network as the adapter on
    the dequantized base, up to summation order."""
    model = vb_model(load_quantized(base_dir, quant)).train()
    dense = dense_copy(model).train()
    out_q = model(ids(), labels=ids())
    out_d = dense(ids(), labels=ids())
    torch.testing.assert_close(out_q.logits, out_d.logits, **model_tol())
    out_q.loss.backward()
    out_d.loss.backward()
    got, want = adapter_grads(model), adapter_grads(dense)
    tol = model_tol(backward=True)
    for name in got:
        scale = float(want[name].abs().max())
        torch.testing.assert_close(got[name], want[name], rtol=tol["rtol"], atol=tol["atol"] * scale, msg=name)


def test_8bit_layer_matches_the_dequantized_base(base_dir: Path) -> None:
    """LLM.int8() also quantizes the input rows (from float16, to 127 levels of the row absmax): the layer's output
    is the dense one within that rounding; the adapter term and its gradients are the dense ones."""
    model = vb_model(load_quantized(base_dir, "int8")).train()
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    dense = dense_copy(model).base_model.model.model.layers[0].mlp.down_proj
    x = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(2))
    out_q, out_d = layer(x), dense(x)
    w = bnb_weights.dequantize(bnb_weights.snapshot(layer.get_base_layer())).abs()
    n, u16 = layer.in_features, tolerances.unit_roundoff(torch.float16)
    row_step = x.abs().amax(dim=1, keepdim=True) / bnb_weights.INT8_LEVELS  # one level of the input's int8 code
    per_input = 0.5 * row_step + 2 * u16 * x.abs()  # half a level, plus the float16 cast (of x and of the result)
    bound = per_input @ w.T + 2 * n * tolerances.unit_roundoff(FP32) * (x.abs() @ w.T) + u16 * out_d.abs()
    assert ((out_q - out_d).abs() <= bound).all()
    g = torch.randn(out_q.shape, generator=torch.Generator().manual_seed(3))
    (out_q * g).sum().backward()
    (out_d * g).sum().backward()
    params_d = dict(dense.named_parameters())
    for name, p in layer.named_parameters():
        if "vblora" in name and p.grad is not None:
            want = params_d[name].grad
            tol = tolerances.reordered(FP32, n, depth=tolerances.DELTA_DEPTH, scale=float(want.abs().max()))
            torch.testing.assert_close(p.grad, want, **tol, msg=name)


# --- training ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quant", ["nf4-dq", "int8"])
def test_qlora_training_saves_and_loads_on_the_full_precision_base(base_dir: Path, quant: str, tmp_path: Path) -> None:
    model = peft.prepare_model_for_kbit_training(load_quantized(base_dir, quant), use_gradient_checkpointing=True)
    model = vb_model(model).train()
    assert model.base_model.model.is_gradient_checkpointing
    optimizer = torch.optim.AdamW(vblora_rs.param_groups(model, lr_bank=1e-2, lr_logits=1e-1))
    batch = ids(4)
    losses = []
    for _ in range(6):
        loss = model(batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < losses[0], losses
    model.save_pretrained(tmp_path / "adapter")
    saved = {bank_named_once(n): p.detach().clone() for n, p in model.named_parameters() if "vblora" in n}
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert "adapter_model.safetensors" in files and "adapter_config.json" in files
    full = AutoModelForCausalLM.from_pretrained(base_dir)
    for backend in ("ours", "peft"):  # PEFT's own classes read the same file
        if backend == "peft":
            loaded = peft_from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "adapter")
        else:
            loaded = peft.PeftModel.from_pretrained(full, tmp_path / "adapter")
        params = {bank_named_once(n): p for n, p in loaded.named_parameters()}
        for name, value in saved.items():
            assert torch.equal(params[name].float(), value.float()), name


# --- merging into the quantized weight -------------------------------------------------------------------------


def exact_sum(layer: QuantizedLinear, original: torch.Tensor, adapters: list[str]) -> torch.Tensor:
    """original + deltas, in float64 (the reference the merged codes are measured against)."""
    out = original.double()
    for adapter in adapters:
        out = out + layer.get_delta_weight(adapter).double()
    return out


def steps_from(layer: QuantizedLinear, want: torch.Tensor) -> float:
    """Largest distance of ``layer``'s weights from ``want``, in quantization steps of the layer."""
    base = layer.get_base_layer()
    got = bnb_weights.dequantize(bnb_weights.snapshot(base)).double()
    return float(((got - want).abs() / bnb_weights.quantization_step(base).double()).max())


def snapshot_bits(layer: QuantizedLinear) -> list[torch.Tensor]:
    snap = bnb_weights.snapshot(layer.get_base_layer())
    if isinstance(snap, bnb_weights.Snapshot8bit):
        return [snap.CB.clone(), snap.SCB.clone()]
    parts = [snap.data.view(torch.uint8).clone(), snap.state.absmax.clone()]  # bits (bf16 storage holds NaNs)
    if snap.state.nested:
        parts += [snap.state.state2.absmax.clone(), snap.state.offset.clone()]
    return parts


def same_bits(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a, b))


# The 8-bit layer quantizes from float16, as bitsandbytes does: one float16 rounding of the sum on top of the half
# step of rounding to the nearest level (relative to the step, at most 127 * u16 of the row's absmax).
def merge_bound(quant: str) -> float:
    return 0.5 + (bnb_weights.INT8_LEVELS * 2 * tolerances.unit_roundoff(torch.float16) if quant == "int8" else 0.0)


@pytest.mark.parametrize("quant", [*FOUR_BIT, "int8"])
def test_merge_within_one_step_and_unmerge_restores_the_bits(base_dir: Path, quant: str) -> None:
    model = vb_model(load_quantized(base_dir, quant))
    layers = quantized_layers(model)
    originals = {n: bnb_weights.dequantize(bnb_weights.snapshot(m.get_base_layer())) for n, m in layers}
    bits = {n: snapshot_bits(m) for n, m in layers}
    model.merge_adapter()
    moved = 0
    for name, layer in layers:
        assert layer.merged
        # half a step of rounding to the nearest code, plus the rounding of 8-bit block scales (double quant.)
        # and of float16 (8-bit): all within one step
        assert steps_from(layer, exact_sum(layer, originals[name], ["default"])) <= merge_bound(quant) + 0.5, name
        moved += not same_bits(snapshot_bits(layer), bits[name])
    assert moved == len(layers)  # the deltas are large enough to change every layer's codes
    with torch.no_grad():
        merged_out = model(ids()).logits
    model.unmerge_adapter()
    for name, layer in layers:
        assert not layer.merged and same_bits(snapshot_bits(layer), bits[name]), name
    with torch.no_grad():
        assert not torch.equal(model(ids()).logits, merged_out)


@pytest.mark.parametrize("quant", ["nf4-dq", "int8"])
def test_several_adapters_quantize_once(base_dir: Path, quant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = vb_model(load_quantized(base_dir, quant))
    torch.manual_seed(7)
    model.add_adapter("other", peft.VBLoRAConfig(**ADAPTER, **BIG))
    layers = quantized_layers(model)
    originals = {n: bnb_weights.dequantize(bnb_weights.snapshot(m.get_base_layer())) for n, m in layers}
    bits = {n: snapshot_bits(m) for n, m in layers}
    calls: list[int] = []
    quantize = bnb_weights.quantize
    monkeypatch.setattr(bnb_weights, "quantize", lambda *a: calls.append(1) or quantize(*a))
    for _, layer in layers:
        layer.merge(adapter_names=["default", "other"])
    assert len(calls) == len(layers)
    for name, layer in layers:
        assert steps_from(layer, exact_sum(layer, originals[name], ["default", "other"])) <= 1.0, name
        layer.unmerge()
        assert same_bits(snapshot_bits(layer), bits[name]), name
        # one after the other: the second merge starts again from the original weight, not the merged codes
        layer.merge(adapter_names=["default"])
        layer.merge(adapter_names=["other"])
        assert layer.merged_adapters == ["default", "other"]
        assert steps_from(layer, exact_sum(layer, originals[name], ["default", "other"])) <= 1.0, name
        layer.unmerge()
        assert same_bits(snapshot_bits(layer), bits[name]), name


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_unmerge_after_the_weight_was_replaced(base_dir: Path, quant: str) -> None:
    """A weight loaded anew while merged has no kept original: unmerge subtracts in float32 and quantizes again,
    within one step of the exact difference."""
    model = vb_model(load_quantized(base_dir, quant))
    torch.manual_seed(7)
    model.add_adapter("other", peft.VBLoRAConfig(**ADAPTER, **BIG))
    _, layer = quantized_layers(model)[0]
    base = layer.get_base_layer()
    layer.merge()
    merged = bnb_weights.dequantize(bnb_weights.snapshot(base))
    bnb_weights.install(base, bnb_weights.quantize(base, merged))  # the same values, new tensors
    layer.unmerge()
    want = merged.double() - layer.get_delta_weight("default").double()
    assert steps_from(layer, want) <= merge_bound(quant) + 0.5 and not layer.merged
    # merged, replaced, then another adapter merged: the first comes out before the second goes in, and unmerge
    # takes both out
    layer.merge(adapter_names=["default"])
    merged = bnb_weights.dequantize(bnb_weights.snapshot(base))
    bnb_weights.install(base, bnb_weights.quantize(base, merged))
    layer.merge(adapter_names=["other"])
    estimate = layer.pre_merge_weight  # the replaced weight with "default" taken out, quantized
    exact = merged.double() - layer.get_delta_weight("default").double()
    step = bnb_weights.step_of(estimate).double()
    assert float(((bnb_weights.dequantize(estimate) - exact).abs() / step).max()) <= merge_bound(quant) + 0.5
    assert steps_from(layer, exact_sum(layer, bnb_weights.dequantize(estimate), ["default", "other"])) <= 1.0
    layer.unmerge()
    assert bnb_weights.dequantize(bnb_weights.snapshot(base)).equal(bnb_weights.dequantize(estimate))
    assert not layer.merged and layer.pre_merge_weight is None


@pytest.mark.parametrize("quant", ["nf4", "fp4-dq"])
def test_merge_from_the_cpu_layout(base_dir: Path, quant: str) -> None:
    model = vb_model(load_quantized(base_dir, quant))
    layers = quantized_layers(model)
    for _, layer in layers:
        cpu_layout(layer.get_base_layer())
    originals = {n: bnb_weights.dequantize(bnb_weights.snapshot(m.get_base_layer())) for n, m in layers}
    bits = {n: snapshot_bits(m) for n, m in layers}
    model.merge_adapter()
    for name, layer in layers:
        state = layer.get_base_layer().weight.quant_state
        assert not getattr(state, "packing_format_for_cpu", False) and state.nested == ("dq" in quant)
        assert steps_from(layer, exact_sum(layer, originals[name], ["default"])) <= 1.0, name
    model.unmerge_adapter()
    for name, layer in layers:
        assert same_bits(snapshot_bits(layer), bits[name]), name


@pytest.mark.parametrize("quant", ["nf4-dq", "int8"])
def test_broken_adapter_is_refused_and_nothing_is_written(base_dir: Path, quant: str) -> None:
    model = vb_model(load_quantized(base_dir, quant))
    layers = quantized_layers(model)
    bits = {n: snapshot_bits(m) for n, m in layers}
    with torch.no_grad():
        model.base_model.vblora_vector_bank["default"][0, 0] = float("nan")
    _, layer = layers[0]
    for safe in (True, False):  # one NaN would spoil a whole block's scale: refused either way
        with pytest.raises(ValueError, match="NaNs detected in the merged weights. The adapter default"):
            model.merge_adapter(safe_merge=safe) if safe else layer.merge()
    for name, layer in layers:
        assert not layer.merged and same_bits(snapshot_bits(layer), bits[name]), name


@pytest.mark.parametrize("quant", ["fp4", "int8"])
def test_merge_and_unload_keeps_the_quantized_layers(base_dir: Path, quant: str) -> None:
    model = vb_model(load_quantized(base_dir, quant))
    layers = dict(quantized_layers(model))
    wants = {
        n.removeprefix("base_model.model."): exact_sum(
            m, bnb_weights.dequantize(bnb_weights.snapshot(m.get_base_layer())), ["default"]
        )
        for n, m in layers.items()
    }
    twin = vb_model(load_quantized(base_dir, quant))  # the same seed: the same adapter
    twin.merge_adapter()
    with torch.no_grad():
        merged_in_place = twin(ids()).logits
    merged = model.merge_and_unload(safe_merge=True)
    assert not any(isinstance(m, VBLoRALayer) for m in merged.modules())
    for name, want in wants.items():
        base = merged.get_submodule(name)
        assert bnb_weights.kind_of(base) == ("8bit" if quant == "int8" else "4bit")
        got = bnb_weights.dequantize(bnb_weights.snapshot(base)).double()
        assert float(((got - want).abs() / bnb_weights.quantization_step(base)).max()) <= merge_bound(quant) + 0.5
    with torch.no_grad():
        merged_out = merged(ids()).logits
    # unloading keeps the merged bitsandbytes layers as they are: the model computes what the merged one did
    assert torch.equal(merged_out, merged_in_place)


# --- the deployment: trained on 4-bit, merged into the bf16 base by `vblora merge` -----------------------------


def test_adapter_from_4bit_base_merged_into_bf16_base_by_the_cli(tmp_path: Path) -> None:
    mini_models.save("llama", tmp_path / "bf16", dtype=torch.bfloat16, **WIDER)
    quant = {**QUANT["nf4-dq"], "bnb_4bit_compute_dtype": torch.bfloat16}
    q = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", quantization_config=BitsAndBytesConfig(**quant))
    model = vb_model(peft.prepare_model_for_kbit_training(q)).train()
    optimizer = torch.optim.AdamW(vblora_rs.param_groups(model, lr_bank=1e-2, lr_logits=1e-1))
    for _ in range(3):
        model(ids(4), labels=ids(4)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(tmp_path / "adapter")
    assert cli_main(["merge", str(tmp_path / "bf16"), str(tmp_path / "adapter"), "-o", str(tmp_path / "out")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16)
    full = peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16), tmp_path / "adapter"
    )
    layers = [(n, m) for n, m in full.named_modules() if isinstance(m, VBLoRALayer)]
    assert layers
    u = tolerances.unit_roundoff(torch.bfloat16)
    for name, layer in layers:
        base = layer.get_base_layer().weight
        exact = base.float() + layer.get_delta_weight("default")
        got = merged.get_submodule(name.removeprefix("base_model.model.")).weight
        assert got.dtype == torch.bfloat16
        f32 = tolerances.delta(FP32, ADAPTER["r"], float(exact.abs().max()))["atol"]
        # one rounding of the float32 sum into bfloat16
        assert ((got.float() - exact).abs() <= u * exact.abs() + f32).all(), name


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_cli_refuses_a_quantized_checkpoint_as_base(
    base_dir: Path, tmp_path: Path, quant: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`vblora merge` merges into full-precision checkpoints; a saved bitsandbytes model is refused in one line."""
    model = vb_model(load_quantized(base_dir, quant))
    model.save_pretrained(tmp_path / "adapter")
    load_quantized(base_dir, quant).save_pretrained(tmp_path / "q")
    capsys.readouterr()
    assert cli_main(["merge", str(tmp_path / "q"), str(tmp_path / "adapter"), "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        f"vblora merge: error: {tmp_path / 'q' / 'config.json'}: the model is quantized (bitsandbytes); vblora merge "
        "merges into full-precision checkpoints: give it the float32/float16/bfloat16 model the quantized one was "
        "made from, or use merge_and_unload in Python, which merges into the quantized layers"
    )
    assert not (tmp_path / "out").exists()


# --- what is refused ---------------------------------------------------------------------------------------------


class Int8Linear(nn.Linear):
    """A quantized linear layer from another library: int8 codes and a scale, nothing VB-LoRA knows."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear.in_features, linear.out_features, bias=False)
        scale = linear.weight.abs().amax() / 127
        codes = torch.round(linear.weight / scale).to(torch.int8)
        self.weight = nn.Parameter(codes, requires_grad=False)
        self.register_buffer("scale", scale.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight.float() * self.scale)


def test_unsupported_quantized_layer_is_named_and_nothing_is_left(base_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    attn = model.model.layers[1].self_attn
    attn.v_proj = Int8Linear(attn.v_proj)
    before = dict(model.named_modules())
    with pytest.raises(TypeError, match=r"module 'model\.layers\.1\.self_attn\.v_proj'.*Int8Linear.*torch\.int8"):
        vb_model(model)
    assert dict(model.named_modules()).keys() == before.keys()
    assert all(before[n] is m for n, m in model.named_modules())
    assert not any(isinstance(m, VBLoRALayer) for m in model.modules())


def test_quantized_layers_after_dispatch_keep_peft_save_format(base_dir: Path, tmp_path: Path) -> None:
    """The saved adapter of a 4-bit model holds exactly the keys of the same adapter on the full-precision base."""
    vb_model(load_quantized(base_dir, "nf4"), save_only_topk_weights=True).save_pretrained(tmp_path / "q")
    vb_model(AutoModelForCausalLM.from_pretrained(base_dir), save_only_topk_weights=True).save_pretrained(
        tmp_path / "f"
    )
    from safetensors import safe_open

    def keys(folder: Path) -> dict[str, tuple[str, list[int]]]:
        with safe_open(folder / "adapter_model.safetensors", "pt") as f:
            return {k: (str(f.get_slice(k).get_dtype()), f.get_slice(k).get_shape()) for k in f.keys()}

    assert keys(tmp_path / "q") == keys(tmp_path / "f")
    config = json.loads((tmp_path / "q" / "adapter_config.json").read_text())
    assert config["peft_type"] == "VBLORA" and math.isclose(config["init_logits_std"], BIG["init_logits_std"])


# --- quantized in code: settings BitsAndBytesConfig does not expose -------------------------------------------


def quantized_in_code(linear: nn.Linear, blocksize: int, quant_type: str, double: bool) -> nn.Module:
    """A ``bnb.nn.Linear4bit`` quantized from ``linear`` with the given block size (transformers' config has no
    block-size field), as bitsandbytes quantizes: when the layer moves to a device."""
    layer = bnb.nn.Linear4bit(
        linear.in_features, linear.out_features, bias=linear.bias is not None, compute_dtype=FP32, quant_type=quant_type
    )
    layer.weight = bnb.nn.Params4bit(
        linear.weight.data.clone(),
        requires_grad=False,
        blocksize=blocksize,
        compress_statistics=double,
        quant_type=quant_type,
        module=layer,
    )
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return layer.to("cpu")


@pytest.mark.parametrize(("blocksize", "quant_type", "double"), [(128, "nf4", True), (256, "fp4", False)])
def test_requantizes_with_the_layers_block_size(blocksize: int, quant_type: str, double: bool) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(quantized_in_code(nn.Linear(64, 96), blocksize, quant_type, double))
    base = model[0]
    assert base.weight.quant_state.blocksize == blocksize
    peft_model = vb_model(model, target_modules=["0"])
    layer = peft_model.base_model.model[0]
    assert isinstance(layer, Linear4bit)
    original = bnb_weights.dequantize(bnb_weights.snapshot(base))
    bits = snapshot_bits(layer)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        unmerged_out = peft_model(x)
    layer.merge()
    state = base.weight.quant_state
    assert (state.blocksize, state.quant_type, state.nested) == (blocksize, quant_type, double)
    assert steps_from(layer, exact_sum(layer, original, ["default"])) <= 1.0
    layer.unmerge()
    assert same_bits(snapshot_bits(layer), bits)
    with torch.no_grad():
        assert torch.equal(peft_model(x), unmerged_out)


def test_topk_adapter_loaded_on_a_4bit_base_merges(base_dir: Path, tmp_path: Path) -> None:
    """A save_only_topk_weights adapter loads compact onto a 4-bit base and merges from its top-K table."""
    trained = vb_model(AutoModelForCausalLM.from_pretrained(base_dir), save_only_topk_weights=True)
    trained.save_pretrained(tmp_path / "adapter")
    model = peft.PeftModel.from_pretrained(load_quantized(base_dir, "nf4-dq"), tmp_path / "adapter")
    layers = quantized_layers(model)
    assert layers and all(m.is_compact("default") for _, m in layers)
    originals = {n: bnb_weights.dequantize(bnb_weights.snapshot(m.get_base_layer())) for n, m in layers}
    model.merge_adapter()
    for name, layer in layers:
        assert steps_from(layer, exact_sum(layer, originals[name], ["default"])) <= 1.0, name


def test_mixed_batch_over_a_4bit_base(base_dir: Path) -> None:
    """``adapter_names`` rows over a 4-bit base: each row is what the whole batch gives with its adapter."""
    model = vb_model(load_quantized(base_dir, "nf4"))
    torch.manual_seed(5)
    model.add_adapter("other", peft.VBLoRAConfig(**ADAPTER, **BIG))
    model.eval()
    batch = ids(2)
    with torch.no_grad():
        mixed = model(batch, adapter_names=["default", "other"]).logits
        model.set_adapter("other")
        other = model(batch).logits
        model.set_adapter("default")
        default = model(batch).logits
    torch.testing.assert_close(mixed[0], default[0], **model_tol())
    torch.testing.assert_close(mixed[1], other[1], **model_tol())


# --- FSDP over a quantized base: refused -------------------------------------------------------------------------


@pytest.fixture
def one_rank_group(tmp_path: Path) -> Iterator[None]:
    """A gloo process group of one rank (fully_shard needs a group; one rank shows the same parameter swap)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_fully_shard_model_refuses_a_quantized_base_before_sharding(base_dir: Path, one_rank_group: None) -> None:
    from vblora_rs.training import fsdp as vd

    model = vb_model(load_quantized(base_dir, "nf4"))
    with pytest.raises(VBLoRAError, match=r"rank 0: module '.*' is a bitsandbytes 4bit layer: FSDP2"):
        vd.fully_shard_model(model)
    assert all(isinstance(m.get_base_layer().weight, bnb.nn.Params4bit) for _, m in quantized_layers(model))


def test_a_quantized_base_sharded_by_hand_is_refused_at_forward_and_by_check_sharding(
    base_dir: Path, one_rank_group: None
) -> None:
    from torch.distributed.fsdp import fully_shard
    from vblora_rs.training import fsdp as vd

    model = vb_model(load_quantized(base_dir, "int8"))
    for block in model.base_model.model.model.layers:
        fully_shard(block)
    fully_shard(model)
    with pytest.raises(VBLoRAError, match="bitsandbytes 8bit layer under this VB-LoRA layer .* without its"):
        model(ids())
    with pytest.raises(VBLoRAError, match=r"module '.*' is a bitsandbytes 8bit layer"):
        vd.check_sharding(model)
