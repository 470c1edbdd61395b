"""Issue 15: a layer built by hand over a float16/bfloat16 ``nn.Linear`` or transformers ``Conv1D`` casts its new
adapter to the base layer's device and dtype, as PEFT's layer does, and then computes what PEFT's layer computes."""

from __future__ import annotations

import copy

import pytest
import torch
from peft.tuners.vblora.layer import Linear as PeftLinear
from support import tolerances
from support.peft_reference import peft_only
from torch import nn
from transformers.pytorch_utils import Conv1D
from vblora_rs import Linear, VBLoRAConfig

IN, OUT, R, L, NV, K = 32, 48, 4, 8, 16, 2


def bases(dtype: torch.dtype) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    linear = nn.Linear(IN, OUT).to(dtype)
    conv = Conv1D(OUT, IN)
    nn.init.normal_(conv.weight, std=0.2)
    return {"linear": linear, "conv1d": conv.to(dtype)}


def pair(kind: str, dtype: torch.dtype) -> tuple[nn.Module, nn.Module]:
    """PEFT's layer and ours over copies of one base, with PEFT's adapter values copied into ours."""
    base = bases(dtype)[kind]
    config = VBLoRAConfig(
        r=R, num_vectors=NV, vector_length=L, topk=K, init_logits_std=1.0, fan_in_fan_out=kind == "conv1d"
    )
    torch.manual_seed(1)
    bank = nn.ParameterDict({"default": nn.Parameter(torch.rand(NV, L) - 0.5)})
    with peft_only():
        theirs = PeftLinear(copy.deepcopy(base), copy.deepcopy(bank), "default", config=config, r=R)
    ours = Linear(
        copy.deepcopy(base),
        copy.deepcopy(bank),
        "default",
        r=R,
        num_vectors=NV,
        vector_length=L,
        topk=K,
        fan_in_fan_out=kind == "conv1d",
    )
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_new_adapter_takes_the_base_dtype_and_matches_peft(kind: str, dtype: torch.dtype) -> None:
    theirs, ours = pair(kind, dtype)
    for layer in (theirs, ours):
        assert layer.vblora_logits_A["default"].dtype == dtype
        assert layer.vblora_logits_B["default"].dtype == dtype
        assert layer.vblora_vector_bank["default"].dtype == dtype
    x = torch.randn(3, 5, IN, generator=torch.Generator().manual_seed(2)).to(dtype)
    with torch.no_grad():
        out_t, out_o = theirs(x), ours(x)  # the first forward used to fail: Half/BFloat16 != float
    assert out_o.dtype == dtype and torch.equal(out_o, out_t)
    with torch.enable_grad():
        assert torch.equal(ours(x).detach(), out_t)
    # PEFT builds the delta in float32 on CPU
    with torch.no_grad():
        delta_t, delta_o = theirs.get_delta_weight("default"), ours.get_delta_weight("default")
    assert delta_o.dtype == delta_t.dtype == torch.float32
    # bit for bit on the FMA kernels, within the reordering bound of a delta on the portable ones
    tolerances.assert_same(delta_o, delta_t, tolerances.delta(torch.float32, max(K, R), float(delta_t.abs().max())))
    before = ours.get_base_layer().weight.detach().clone()
    theirs.merge()
    ours.merge()
    merged = theirs.get_base_layer().weight.detach()
    # rounded once to the half type: equal, or (portable kernels, a delta a few float32 ulps off) one half ulp
    one_rounding = tolerances.reordered(dtype, 1, 1, float(merged.float().abs().max()))
    tolerances.assert_same(ours.get_base_layer().weight, merged, one_rounding)
    with torch.no_grad():
        tolerances.assert_same(ours(x), theirs(x), tolerances.reordered(dtype, IN, 2, float(out_t.float().abs().max())))
    ours.unmerge()
    # W + d - d: back within one rounding of the merged value (an ulp at the merged weight's magnitude)
    ulp = torch.finfo(dtype).eps * torch.maximum(merged.float().abs(), before.float().abs())
    back = (ours.get_base_layer().weight.float() - before.float()).abs()
    assert bool((back <= ulp).all()), float((back / ulp.clamp_min(torch.finfo(dtype).tiny)).max())
