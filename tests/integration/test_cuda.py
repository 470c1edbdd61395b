"""The same parity and training checks on CUDA, in float32 and bfloat16 (skipped without a GPU). On CUDA the layers
build A and B with torch ops (the Rust kernels take CPU tensors), cache them the same way, and must agree with
PEFT running on the same device."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
import vblora_rs
from support import tolerances
from support.models import MODEL_CASES, output_tensor
from support.peft_reference import bank_named_once, peft_get_peft_model
from vblora_rs.training.optim import create_optimizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DTYPES = [torch.float32, torch.bfloat16]
# float32 on GPUs may use TF32 matmuls in some settings: compare against PEFT on the same device and settings
# (tolerances.unit_roundoff counts TF32 when torch allows it); the deepest of the models tested here
TOL = {torch.float32: tolerances.model("gpt2"), torch.bfloat16: tolerances.half_model("gpt2", torch.bfloat16)}


def pair(case: str, dtype: torch.dtype):  # type: ignore[no-untyped-def]
    builder, kw, make_inputs = MODEL_CASES[case]
    base = builder().to("cuda", dtype)
    kwargs = {"init_vector_bank_bound": 0.5, "init_logits_std": 1.0, **kw}
    torch.manual_seed(1234)
    theirs = peft_get_peft_model(copy.deepcopy(base), peft.VBLoRAConfig(**kwargs))
    ours = vblora_rs.get_peft_model(copy.deepcopy(base), vblora_rs.VBLoRAConfig(**kwargs))
    theirs.to("cuda", dtype)
    ours.to("cuda", dtype)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    inputs = {k: v.to("cuda") if v.dtype != torch.float32 else v.to("cuda", dtype) for k, v in make_inputs().items()}
    return theirs, ours, inputs


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["gpt2", "llama", "mlp"])
def test_forward_matches_peft_and_cache_is_bit_identical(case: str, dtype: torch.dtype) -> None:
    theirs, ours, inputs = pair(case, dtype)
    theirs.eval()
    ours.eval()
    with torch.no_grad():
        expected = output_tensor(theirs(**inputs))
        first = output_tensor(ours(**inputs))
        cached = output_tensor(ours(**inputs))
    assert first.device.type == "cuda" and first.dtype == expected.dtype
    torch.testing.assert_close(first, expected, **TOL[dtype])
    torch.testing.assert_close(cached, first, atol=1e-6, rtol=1e-6)  # GPU matmuls: allow run-to-run noise
    layers = [m for m in ours.modules() if isinstance(m, vblora_rs.Linear)]
    for layer in layers:
        entry = layer._lora_cache["default"]
        with torch.no_grad():
            A, B = layer._get_lora_matrices("default")
        assert torch.equal(entry.A, A) and torch.equal(entry.B, B)


@pytest.mark.parametrize("dtype", DTYPES)
def test_training_step_matches_peft(dtype: torch.dtype) -> None:
    theirs, ours, inputs = pair("llama", dtype)
    for model in (theirs, ours):
        model.train()
        optimizer = create_optimizer(model)
        output_tensor(model(**inputs)).float().square().mean().backward()
        optimizer.step()
    t = {bank_named_once(n): p for n, p in theirs.named_parameters()}
    for name, param in ours.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param, t[name], **TOL[dtype], msg=name)
    # evaluation after the step builds A and B from the updated values
    ours.eval()
    theirs.eval()
    with torch.no_grad():
        torch.testing.assert_close(output_tensor(ours(**inputs)), output_tensor(theirs(**inputs)), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_mixed_batch_on_cuda(dtype: torch.dtype) -> None:
    _, ours, inputs = pair("gpt2", dtype)
    ours.add_adapter("second", vblora_rs.VBLoRAConfig(**MODEL_CASES["gpt2"][1]))
    ours.to("cuda", dtype)
    ours.eval()
    names = ["second", "__base__"]
    with torch.no_grad():
        mixed = ours(**inputs, adapter_names=names).logits
        ours.set_adapter("second")
        second = ours(**inputs).logits
        with ours.disable_adapter():
            base = ours(**inputs).logits
    torch.testing.assert_close(mixed[0], second[0], **TOL[dtype])
    torch.testing.assert_close(mixed[1], base[1], **TOL[dtype])


def test_cache_follows_a_move_between_devices() -> None:
    _, ours, inputs = pair("llama", torch.float32)
    ours.eval()
    with torch.no_grad():
        on_gpu = output_tensor(ours(**inputs))
        ours.to("cpu")
        on_cpu = output_tensor(ours(**{k: v.cpu() for k, v in inputs.items()}))
        ours.to("cuda")
        again = output_tensor(ours(**inputs))
    assert on_cpu.device.type == "cpu" and again.device.type == "cuda"
    torch.testing.assert_close(on_cpu, on_gpu.cpu(), **tolerances.model("llama"))
    torch.testing.assert_close(again, on_gpu, atol=1e-6, rtol=1e-6)
