"""One owner for the shared bank: the tuner registers it, the layers hold a reference (what lets FSDP2 shard each
decoder layer without taking the bank away from the others), with PEFT's state-dict keys, dtypes and
trainability kept as PEFT's own classes have them."""

from __future__ import annotations

import peft
import pytest
import torch
from peft.utils.save_and_load import get_base_model_state_dict
from support.models import MODEL_CASES
from support.peft_reference import bank_named_once, peft_get_peft_model
from torch import nn
from vblora_rs import Linear, VBLoRAConfig, get_peft_model


def pair(**kwargs: object) -> tuple[nn.Module, nn.Module]:
    builder, kw, _ = MODEL_CASES["llama"]
    theirs = peft_get_peft_model(builder(), peft.VBLoRAConfig(**kw), **kwargs)
    ours = get_peft_model(builder(), VBLoRAConfig(**kw), **kwargs)
    return theirs, ours


def test_the_tuner_owns_the_bank_and_layers_refer_to_it() -> None:
    theirs, ours = pair()
    bank = ours.base_model.vblora_vector_bank
    layers = [m for m in ours.modules() if isinstance(m, Linear)]
    assert layers and all(layer.vblora_vector_bank["default"] is bank["default"] for layer in layers)
    # no layer's subtree reaches the bank: a walk that claims parameters per subtree (fully_shard) leaves it alone
    assert not any(p is bank["default"] for layer in layers for p in layer.parameters())
    assert [n for n, p in ours.named_parameters() if p is bank["default"]] == ["base_model.vblora_vector_bank.default"]
    # PEFT's state-dict keys, in PEFT's order, so state dicts load strictly both ways
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    trainable_t = sorted(bank_named_once(n) for n, p in theirs.named_parameters() if p.requires_grad)
    assert sorted(n for n, p in ours.named_parameters() if p.requires_grad) == trainable_t
    # PEFT's structural key helpers see the layers' bank entries as adapter keys (FSDP recipes use these)
    assert get_base_model_state_dict(ours).keys() == get_base_model_state_dict(theirs).keys()


def test_a_state_dict_fills_the_one_bank() -> None:
    theirs, ours = pair()
    with torch.no_grad():
        theirs.base_model.vblora_vector_bank["default"].add_(1.0)
    bank = ours.base_model.vblora_vector_bank["default"]
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert ours.base_model.vblora_vector_bank["default"] is bank  # filled in place, still shared
    assert torch.equal(bank, theirs.base_model.vblora_vector_bank["default"])


@pytest.mark.parametrize("autocast", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bank_dtype_over_a_half_precision_base_is_peft_s(dtype: torch.dtype, autocast: bool) -> None:
    builder, kw, _ = MODEL_CASES["llama"]
    theirs = peft_get_peft_model(builder().to(dtype), peft.VBLoRAConfig(**kw), autocast_adapter_dtype=autocast)
    ours = get_peft_model(builder().to(dtype), VBLoRAConfig(**kw), autocast_adapter_dtype=autocast)
    want = theirs.base_model.vblora_vector_bank["default"].dtype
    assert want == (torch.float32 if autocast else dtype)
    assert ours.base_model.vblora_vector_bank["default"].dtype == want
    layer = next(m for m in ours.modules() if isinstance(m, Linear))
    assert layer.vblora_vector_bank["default"] is ours.base_model.vblora_vector_bank["default"]


def test_a_layer_built_by_hand_registers_its_bank() -> None:
    bank = nn.ParameterDict({"default": nn.Parameter(torch.randn(16, 8))})
    layer = Linear(nn.Linear(16, 16), bank, "default", r=2, num_vectors=16, vector_length=8)
    # no tuner owns this bank: the layer's parameters, state dict and .to() reach it as before
    assert any(p is bank["default"] for p in layer.parameters())
    assert list(layer.state_dict()).count("vblora_vector_bank.default") == 1
    layer.to(torch.float64)
    assert bank["default"].dtype == torch.float64
