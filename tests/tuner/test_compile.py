"""torch.compile: VB-LoRA layers trace into one graph (no break of ours), in training and in eval, dense and
compact adapters, with the results of eager mode; training a top-K adapter is refused without PEFT's
``isinf().any()`` check (a data-dependent branch that breaks graphs)."""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator

import pytest
import torch
import torch._dynamo as dynamo
import vblora_rs
from support import tolerances
from support.models import MODEL_CASES, make_mlp
from torch import nn
from vblora_rs import VBLoRAConfig, get_peft_model
from vblora_rs.tuner.layer import TOPK_TRAINING_ERROR

# dynamo and aot_autograd, without inductor's code generation (minutes on a busy CPU); inductor runs on the MLP
BACKEND = "aot_eager"


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    dynamo.reset()
    yield
    dynamo.reset()


def model_for(case: str, compact: bool = False) -> nn.Module:
    builder, kw, _ = MODEL_CASES[case]
    model = get_peft_model(builder(), VBLoRAConfig(**kw))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "vblora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen))
    if compact:
        model.compact_("default")
    return model


def our_breaks(explanation) -> list[str]:  # type: ignore[no-untyped-def]
    """Graph-break reasons whose stack passes through vblora_rs (its package folder: a virtualenv under a path
    named vblora_rs holds torch and transformers too)."""
    package = os.path.dirname(vblora_rs.__file__) + os.sep
    return [
        reason.reason
        for reason in explanation.break_reasons
        if any(frame.filename.startswith(package) for frame in reason.user_stack)
    ]


@pytest.mark.parametrize(
    "case, mode, compact",
    [
        ("llama", "eval", False),
        ("llama", "train", False),
        ("llama", "eval", True),
        ("gpt2", "eval", False),
        ("gpt2", "train", False),
        ("opt", "eval", True),
    ],
)
def test_no_graph_break_in_our_code(case: str, mode: str, compact: bool) -> None:
    model = model_for(case, compact)
    getattr(model, mode)()
    inputs = MODEL_CASES[case][2]()
    if mode == "train":
        explanation = dynamo.explain(model)(**inputs, labels=inputs["input_ids"])
    else:
        with torch.no_grad():
            explanation = dynamo.explain(model)(**inputs)
    assert our_breaks(explanation) == []
    if case == "llama":  # a model that traces whole: one graph
        assert explanation.graph_break_count == 0 and explanation.graph_count == 1


@pytest.mark.parametrize("compact", [False, True])
def test_fullgraph_eval_matches_eager(compact: bool) -> None:
    model = model_for("llama", compact).eval()
    inputs = MODEL_CASES["llama"][2]()
    compiled = torch.compile(model, backend=BACKEND, fullgraph=True)
    with torch.no_grad():
        eager = model(**inputs).logits
        got = compiled(**inputs).logits
        # eager again, now from the layers' cache: compiled calls neither read nor wrote it
        assert torch.equal(model(**inputs).logits, eager)
    torch.testing.assert_close(got, eager, **tolerances.model("llama"))


def test_fullgraph_training_matches_eager() -> None:
    model = model_for("llama").train()
    twin = copy.deepcopy(model)
    inputs = MODEL_CASES["llama"][2]()
    compiled = torch.compile(twin, backend=BACKEND, fullgraph=True)
    eager_loss = model(**inputs, labels=inputs["input_ids"]).loss
    eager_loss.backward()
    loss = compiled(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    torch.testing.assert_close(loss, eager_loss, **tolerances.model("llama"))
    expected = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    got = {n: p.grad for n, p in twin.named_parameters() if p.requires_grad}
    assert got.keys() == expected.keys() and expected
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], **tolerances.model("llama", backward=True), msg=name)


def test_inductor_training_step_and_eval_match_eager() -> None:
    torch.manual_seed(0)
    config = VBLoRAConfig(target_modules=["lin0", "lin1", "lin2"], vector_length=8, num_vectors=32, r=4, topk=3)
    model = get_peft_model(make_mlp(), config)
    twin = copy.deepcopy(model)
    compiled = torch.compile(twin, fullgraph=True)
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(2))
    for m in (model, twin):
        m.train()
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (model, twin)]
    for run, optimizer in zip((model, compiled), optimizers):
        run(x).pow(2).mean().backward()
        optimizer.step()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(q, p, **tolerances.model("mlp", backward=True), msg=name)
    model.eval()
    twin.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), **tolerances.model("mlp"))


def test_training_a_topk_adapter_is_refused_when_compiled() -> None:
    model = model_for("llama", compact=True).train()
    inputs = MODEL_CASES["llama"][2]()
    with pytest.raises(RuntimeError, match="infinity values"):
        torch.compile(model, backend=BACKEND)(**inputs)
    assert "infinity values" in TOPK_TRAINING_ERROR
