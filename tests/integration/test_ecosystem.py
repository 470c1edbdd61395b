"""The model families PEFT users adapt (tiny configs, no downloads) with their default target modules, and the
torch plumbing they rely on: state dicts, copies, pickles, dtype moves, frozen inactive adapters, gradient
checkpointing, ``modules_to_save`` and ``task_type="SEQ_CLS"`` heads. Models are PEFT's own ``PeftModel``s built
with vblora_rs's backend; where PEFT's own VB-LoRA classes define the expected result, they are run side by side."""

from __future__ import annotations

import copy
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
import vblora_rs
from peft.tuners.vblora import Linear as PeftLinear
from safetensors.torch import load_file
from support import tolerances
from support.ecosystem import ECOSYSTEM, adapted_model, causal_inputs, classification_inputs, config
from support.models import make_mlp, randomize
from support.peft_reference import bank_named_once
from torch import nn
from vblora_rs import Linear, PeftModel, VBLoRAConfig, get_peft_model
from vblora_rs.demo.mini_models import build
from vblora_rs.tuner.peft_backend import peft_classes


@contextmanager
def peft_own_classes() -> Iterator[None]:
    """Inside the block PEFT serves VB-LoRA with its own classes; the backend is put back after."""
    with peft_classes():
        yield


def peft_twin(case: str, model: nn.Module, **kw: Any) -> nn.Module:
    """``model``'s adapter in PEFT's own classes: PEFT's get_peft_model on a fresh base, then ``model``'s state
    dict (PEFT draws its own bank, so the weights are copied over)."""
    with peft_own_classes():
        twin = peft.get_peft_model(ECOSYSTEM[case][0](), config(case, **kw))
    layers = [type(m) for m in twin.modules() if isinstance(m, PeftLinear)]
    assert layers and set(layers) == {PeftLinear}  # PEFT's own layers, not ours (ours subclass them)
    twin.load_state_dict(model.state_dict())
    return twin


def logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


DEFAULT_TARGETS = {
    "gpt2": {"c_attn"},
    "opt": {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"},
    "llama": {"q_proj", "v_proj"},
    "bert": {"query", "value"},
    "roberta": {"query", "value"},
    "t5": {"q", "k", "v", "o", "wi", "wo"},
    "bart": {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"},
}


@pytest.mark.parametrize("case", sorted(ECOSYSTEM))
def test_forward_backward_save_load_merge(case: str, tmp_path) -> None:
    builder, make_inputs, _ = ECOSYSTEM[case]
    inputs = make_inputs()
    model = adapted_model(case)
    adapted = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, Linear)}
    assert adapted == DEFAULT_TARGETS[case]
    with torch.no_grad():
        base_out = builder()(**inputs).logits
    out = logits(model, inputs)
    assert not torch.allclose(out, base_out, atol=1e-4)
    twin = peft_twin(case, model)
    # PEFT's own classes, same weights: bit for bit (within the reordering bound on the portable kernels)
    tolerances.assert_same(logits(twin, inputs), out, tolerances.model(case))

    # backward: gradients reach the logits and the (shared) bank, nothing frozen gets one
    model.train()
    model(**inputs).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert any("vblora_logits_A" in n for n in grads) and any("vblora_vector_bank" in n for n in grads)
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    model.eval()

    model.save_pretrained(tmp_path / case)
    loaded = PeftModel.from_pretrained(builder(), tmp_path / case)
    torch.testing.assert_close(logits(loaded, inputs), out, atol=0, rtol=0)

    if case == "roberta":
        # PEFT's own merge_and_unload cannot unload a composite modules_to_save head (RobertaClassificationHead
        # has no .weight; peft 0.21 raises AttributeError with its own classes too): merge in place instead
        loaded.merge_adapter()
        twin.merge_adapter()
        merged, twin_merged = loaded, twin
    else:
        merged, twin_merged = loaded.merge_and_unload(), twin.merge_and_unload()
        assert not any(isinstance(m, Linear) for m in merged.modules())
    # merging rounds W + B @ A once, so the outputs move off the unmerged ones, but exactly as PEFT's own merge
    merged_out = logits(merged, inputs)
    tolerances.assert_same(merged_out, logits(twin_merged, inputs), tolerances.model(case))
    assert not torch.equal(merged_out, base_out)


def test_state_dict_round_trip_and_layout() -> None:
    model = adapted_model("llama")
    other = adapted_model("llama")
    randomize(other, seed=7)
    inputs = causal_inputs()
    state = model.state_dict()
    # the bank is one tensor however many layers hold it
    banks = {k: v for k, v in state.items() if k.endswith("vblora_vector_bank.default")}
    assert len({v.data_ptr() for v in banks.values()}) == 1
    other.load_state_dict(state)
    torch.testing.assert_close(logits(other, inputs), logits(model, inputs), atol=0, rtol=0)


def test_deepcopy_and_pickle_keep_the_shared_bank_shared() -> None:
    model = adapted_model("gpt2")
    inputs = causal_inputs()
    expected = logits(model, inputs)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        torch.testing.assert_close(logits(clone, inputs), expected, atol=0, rtol=0)
        bank = clone.base_model.vblora_vector_bank["default"]
        layers = [m for m in clone.modules() if isinstance(m, Linear)]
        assert all(layer.vblora_vector_bank["default"] is bank for layer in layers)
        with torch.no_grad():
            bank.add_(1.0)  # an edit of the copy reaches every layer of the copy, not the original
        assert not torch.allclose(logits(clone, inputs), expected)
    torch.testing.assert_close(logits(model, inputs), expected, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_model_to_dtype(dtype: torch.dtype) -> None:
    """``model.to(dtype)`` moves every adapter tensor, and the model then computes (forward, and training's
    backward) exactly as PEFT's own classes do in that dtype."""
    model = adapted_model("llama")
    inputs = causal_inputs()
    twin = peft_twin("llama", model)
    float32_out = logits(model, inputs)
    model.to(dtype)
    twin.to(dtype)
    for name, param in model.named_parameters():
        assert param.dtype == dtype, name
    out = logits(model, inputs)
    assert out.dtype == dtype
    assert torch.equal(out, logits(twin, inputs))
    assert not torch.equal(out.float(), float32_out)  # it did compute in the new dtype
    for m in (model, twin):
        m.train()
        m(**inputs).loss.backward()  # trains in that dtype too
    bank = model.base_model.vblora_vector_bank["default"].grad
    assert bank.dtype == dtype
    assert torch.equal(bank, twin.base_model.vblora_vector_bank["default"].grad)


def test_requires_grad_follows_the_active_adapter() -> None:
    model = adapted_model("opt")
    model.add_adapter("other", config("opt"))

    def trainable(adapter: str) -> set[bool]:
        return {p.requires_grad for n, p in model.named_parameters() if n.endswith(f".{adapter}")}

    assert trainable("default") == {True} and trainable("other") == {False}
    model.set_adapter("other")
    assert trainable("default") == {False} and trainable("other") == {True}
    model.train()
    model(**causal_inputs()).loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n.endswith(".default"))
    assert all(p.grad is not None for n, p in model.named_parameters() if n.endswith(".other"))
    with model.disable_adapter():
        assert trainable("other") == {False}
    assert trainable("other") == {True}


def test_a_second_adapter_stays_frozen_also_on_modules_only_it_targets() -> None:
    """Llama's default targets are q_proj and v_proj; the second adapter adds o_proj, which it alone holds: the
    new layers there must not make it (or their base weights) trainable, as with PEFT's own classes."""
    model = adapted_model("llama")
    model.add_adapter("other", config("llama", target_modules=["v_proj", "o_proj"]))
    only_other = [n for n, m in model.named_modules() if isinstance(m, Linear) and n.endswith("o_proj")]
    assert only_other and all(not model.get_submodule(n).has_adapter("default") for n in only_other)

    def trainable(model: nn.Module) -> list[str]:
        return sorted(bank_named_once(n) for n, p in model.named_parameters() if p.requires_grad)

    names = trainable(model)
    assert names and all(n.endswith(".default") for n in names)
    assert model.active_adapters == ["default"]
    with peft_own_classes():
        theirs = peft.get_peft_model(build("llama"), config("llama"))
        theirs.add_adapter("other", config("llama", target_modules=["v_proj", "o_proj"]))
    assert names == trainable(theirs)  # PEFT's own classes freeze the same set

    model.train()
    model(**causal_inputs()).loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if not n.endswith(".default"))
    # and switching makes exactly the second adapter trainable, on all of its modules
    model.set_adapter("other")
    theirs.set_adapter("other")
    names = trainable(model)
    assert any(".o_proj." in n for n in names) and all(n.endswith(".other") for n in names)
    assert names == trainable(theirs)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_of_the_base_model(reentrant: bool) -> None:
    inputs = causal_inputs()
    reference = adapted_model("llama")
    reference.train()
    reference(**inputs).loss.backward()
    expected = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}

    def checkpointed(model: nn.Module) -> dict[str, torch.Tensor]:
        model.train()
        base = model.get_base_model()
        # (transformers makes the embeddings' output require grad, which reentrant checkpointing needs with frozen
        # embeddings; its first forward runs under no_grad, where our layers may cache A and B)
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
        assert any(getattr(m, "gradient_checkpointing", False) for m in base.modules())
        model(**inputs).loss.backward()
        return {bank_named_once(n): p.grad for n, p in model.named_parameters() if p.requires_grad}

    model = adapted_model("llama")
    twin = peft_twin("llama", model)
    got = checkpointed(model)
    assert got.keys() == expected.keys()
    theirs = checkpointed(twin)
    for name in expected:
        assert torch.equal(got[name], theirs[name]), name  # PEFT's own classes, checkpointed the same way
    uses = 2 * sum(isinstance(m, Linear) for m in model.modules())  # A and B of every layer come from the bank
    for name in expected:
        if "vblora_vector_bank" in name and reentrant:
            # reentrant backward adds each layer's contribution to the shared bank's gradient in another grouping:
            # a reordered float32 sum of `uses` terms
            atol = uses * torch.finfo(torch.float32).eps * expected[name].abs().max().item()
            torch.testing.assert_close(got[name], expected[name], atol=atol, rtol=0, msg=name)
        else:  # the recomputed forward runs the same ops on the same values
            assert torch.equal(got[name], expected[name]), name


def train_step(model: nn.Module, inputs: dict[str, torch.Tensor], lr: float = 0.1) -> None:
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    model(**inputs).loss.backward()
    optimizer.step()
    model.eval()


def test_modules_to_save_copies_train_and_round_trip(tmp_path: Path) -> None:
    model = adapted_model("bert")
    inputs = classification_inputs()
    wrapper = model.get_base_model().classifier
    assert {n for n, p in wrapper.named_parameters() if p.requires_grad} == {
        "modules_to_save.default.weight",
        "modules_to_save.default.bias",
    }
    original = wrapper.original_module.weight.detach().clone()
    train_step(model, inputs)
    copy_weight = wrapper.modules_to_save["default"].weight
    assert not torch.equal(copy_weight, original)  # the copy trained
    assert torch.equal(wrapper.original_module.weight, original)  # the original did not
    assert wrapper.original_module.weight.grad is None

    model.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert torch.equal(saved["base_model.model.classifier.weight"], copy_weight)  # PEFT's key for the copy
    loaded = PeftModel.from_pretrained(build("bert-seq-cls"), tmp_path)
    assert torch.equal(loaded.get_base_model().classifier.modules_to_save["default"].weight, copy_weight)
    assert torch.equal(logits(loaded, inputs), logits(model, inputs))


# name -> (builder, the head PEFT makes trainable for SEQ_CLS)
SEQ_CLS = {
    "bert": (partial(build, "bert-seq-cls"), "classifier"),
    "roberta": (partial(build, "roberta-seq-cls"), "classifier"),
    "llama": (partial(build, "llama-seq-cls"), "score"),
}


@pytest.mark.parametrize("case", sorted(SEQ_CLS))
def test_seq_cls_task_makes_the_head_trainable_and_saves_it(case: str, tmp_path: Path) -> None:
    """``task_type="SEQ_CLS"`` without modules_to_save: PEFT wraps the classification head itself, trains and saves
    it; with our backend the same parameters train and the head comes back from the adapter folder."""
    builder, head = SEQ_CLS[case]
    kw = {"task_type": "SEQ_CLS", "vector_length": 8, "num_vectors": 32, "r": 2}
    model = get_peft_model(builder(), VBLoRAConfig(**kw))
    assert isinstance(model, peft.PeftModelForSequenceClassification)
    with peft_own_classes():
        theirs = peft.get_peft_model(builder(), VBLoRAConfig(**kw))

    def trainable(model: nn.Module) -> list[str]:
        return sorted(bank_named_once(n) for n, p in model.named_parameters() if p.requires_grad)

    names = trainable(model)
    assert names == trainable(theirs)
    assert any(f".{head}.modules_to_save.default." in n for n in names)
    assert any("vblora_logits_A" in n for n in names)

    inputs = classification_inputs()
    wrapper = model.get_base_model().get_submodule(head)
    before = {n: p.detach().clone() for n, p in wrapper.modules_to_save["default"].named_parameters()}
    train_step(model, inputs)
    trained = dict(wrapper.modules_to_save["default"].named_parameters())
    assert all(not torch.equal(trained[n], before[n]) for n in before)

    model.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    for name, value in trained.items():
        assert torch.equal(saved[f"base_model.model.{head}.{name}"], value), name
    loaded = PeftModel.from_pretrained(builder(), tmp_path)
    assert torch.equal(logits(loaded, inputs), logits(model, inputs))
    with peft_own_classes():
        theirs_loaded = PeftModel.from_pretrained(builder(), tmp_path)
    assert torch.equal(logits(theirs_loaded, inputs), logits(model, inputs))  # PEFT reads what we saved


def test_mlp_plain_module_still_works() -> None:
    # not a transformers model: explicit targets, positional input
    model = get_peft_model(make_mlp(), VBLoRAConfig(target_modules=["lin0", "lin2"], vector_length=8, num_vectors=16))
    x = torch.randn(4, 16)
    assert model(x).shape == (4, 4)


# PEFT looks the save hooks up by method at call time; ours handle a model of PEFT's own classes as PEFT does
def test_a_peft_built_model_saves_after_apply_to_peft(tmp_path: Path) -> None:
    with peft_own_classes():
        theirs = peft.get_peft_model(build("llama"), config("llama"))
        theirs.save_pretrained(tmp_path / "before")
    vblora_rs.apply_to_peft()
    theirs.save_pretrained(tmp_path / "after")
    before = load_file(str(tmp_path / "before" / "adapter_model.safetensors"))
    after = load_file(str(tmp_path / "after" / "adapter_model.safetensors"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_remove_from_peft_refuses_while_a_compact_adapter_is_alive(tmp_path: Path) -> None:
    # PEFT's own hooks would save a compact adapter as its bank alone: the switch back refuses instead
    vblora_rs.apply_to_peft()
    model = get_peft_model(build("llama"), config("llama", save_only_topk_weights=True))
    model.save_pretrained(tmp_path / "topk")
    loaded = PeftModel.from_pretrained(build("llama"), tmp_path / "topk")  # compact: no dense logits
    with pytest.raises(vblora_rs.VBLoRAError, match="compact adapters"):
        vblora_rs.remove_from_peft()
    loaded.save_pretrained(tmp_path / "again")
    expected = load_file(str(tmp_path / "topk" / "adapter_model.safetensors"))
    again = load_file(str(tmp_path / "again" / "adapter_model.safetensors"))
    assert again.keys() == expected.keys() and all(torch.equal(again[k], expected[k]) for k in again)
