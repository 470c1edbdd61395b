"""The model families PEFT users adapt (tiny configs, no downloads) with their default target modules, and the
torch plumbing they rely on: state dicts, copies, pickles, dtype moves, frozen inactive adapters, gradient
checkpointing."""

from __future__ import annotations

import copy
import pickle
from typing import Any, Callable

import pytest
import tolerances
import torch
from conftest import make_gpt2, make_llama, make_mlp, make_opt
from torch import nn
from vblora_rs import Linear, PeftModel, VBLoRAConfig, get_peft_model

VOCAB = 64


def make_bert(seed: int = 0) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        num_labels=3,
    )
    return BertForSequenceClassification(cfg).eval()


def make_roberta(seed: int = 0) -> nn.Module:
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(seed)
    cfg = RobertaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        num_labels=3,
    )
    return RobertaForSequenceClassification(cfg).eval()


def make_t5(seed: int = 0) -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = T5Config(
        d_model=32,
        d_ff=64,
        d_kv=8,
        num_layers=2,
        num_heads=4,
        vocab_size=VOCAB,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5ForConditionalGeneration(cfg).eval()


def make_bart(seed: int = 0) -> nn.Module:
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(seed)
    cfg = BartConfig(
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
        forced_eos_token_id=None,
    )
    return BartForConditionalGeneration(cfg).eval()


def ids(batch: int = 3, seq: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def causal_inputs() -> dict[str, torch.Tensor]:
    x = ids()
    return {"input_ids": x, "labels": x}


def classification_inputs() -> dict[str, torch.Tensor]:
    return {"input_ids": ids(), "labels": torch.tensor([0, 2, 1])}


def seq2seq_inputs() -> dict[str, torch.Tensor]:
    return {"input_ids": ids(), "labels": ids(seq=4, seed=2)}


# name -> (builder, inputs with labels, extra config); every case uses the model type's default targets
ECOSYSTEM: dict[str, tuple[Callable[[], nn.Module], Callable[[], dict[str, torch.Tensor]], dict[str, Any]]] = {
    "gpt2": (make_gpt2, causal_inputs, {"fan_in_fan_out": True}),
    "opt": (make_opt, causal_inputs, {}),
    "llama": (make_llama, causal_inputs, {}),
    "bert": (make_bert, classification_inputs, {"modules_to_save": ["classifier"]}),
    "roberta": (make_roberta, classification_inputs, {"modules_to_save": ["classifier"]}),
    "t5": (make_t5, seq2seq_inputs, {}),
    "bart": (make_bart, seq2seq_inputs, {}),
}


def config(case: str, **kw: Any) -> VBLoRAConfig:
    return VBLoRAConfig(vector_length=8, num_vectors=32, r=2, **{**ECOSYSTEM[case][2], **kw})


def randomize(model: nn.Module, seed: int = 0) -> None:
    """Adapter values large enough that every adapted layer changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "vblora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen))


def build(case: str, **kw: Any) -> nn.Module:
    model = get_peft_model(ECOSYSTEM[case][0](), config(case, **kw))
    randomize(model)
    return model


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
    model = build(case)
    adapted = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, Linear)}
    assert adapted == DEFAULT_TARGETS[case]
    with torch.no_grad():
        base_out = builder()(**inputs).logits
    out = logits(model, inputs)
    assert not torch.allclose(out, base_out, atol=1e-4)

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

    merged = loaded.merge_and_unload()
    assert not any(isinstance(m, Linear) for m in merged.modules())
    torch.testing.assert_close(logits(merged, inputs), out, **tolerances.model(case))


def test_state_dict_round_trip_and_layout() -> None:
    model = build("llama")
    other = build("llama")
    randomize(other, seed=7)
    inputs = causal_inputs()
    state = model.state_dict()
    # the bank is one tensor however many layers hold it
    banks = {k: v for k, v in state.items() if k.endswith("vblora_vector_bank.default")}
    assert len({v.data_ptr() for v in banks.values()}) == 1
    other.load_state_dict(state)
    torch.testing.assert_close(logits(other, inputs), logits(model, inputs), atol=0, rtol=0)


def test_deepcopy_and_pickle_keep_the_shared_bank_shared() -> None:
    model = build("gpt2")
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
    model = build("llama")
    inputs = causal_inputs()
    expected = logits(model, inputs)
    model.to(dtype)
    for name, param in model.named_parameters():
        assert param.dtype == dtype, name
    out = logits(model, inputs)
    assert out.dtype == dtype
    # the less precise of the two sides bounds the difference
    tol = tolerances.model("llama") if dtype == torch.float64 else tolerances.half_model("llama", dtype)
    torch.testing.assert_close(out.float(), expected, **tol)
    model.train()
    model(**inputs).loss.backward()  # trains in that dtype too
    assert model.base_model.vblora_vector_bank["default"].grad.dtype == dtype


def test_requires_grad_follows_the_active_adapter() -> None:
    model = build("opt")
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


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_of_the_base_model(reentrant: bool) -> None:
    inputs = causal_inputs()
    reference = build("llama")
    reference.train()
    reference(**inputs).loss.backward()
    expected = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}

    model = build("llama")
    model.train()
    base = model.get_base_model()
    # (transformers makes the embeddings' output require grad, which reentrant checkpointing needs with frozen
    # embeddings; its first forward runs under no_grad, where the layers may cache A and B)
    base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    assert any(getattr(m, "gradient_checkpointing", False) for m in base.modules())
    model(**inputs).loss.backward()
    got = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], **tolerances.model("llama", backward=True), msg=name)


def test_modules_to_save_copies_train_and_round_trip(tmp_path) -> None:
    model = build("bert")
    inputs = classification_inputs()
    wrapper = model.get_base_model().classifier
    assert {n for n, p in wrapper.named_parameters() if p.requires_grad} == {
        "modules_to_save.default.weight",
        "modules_to_save.default.bias",
    }
    model.train()
    model(**inputs).loss.backward()
    assert wrapper.modules_to_save["default"].weight.grad is not None
    assert wrapper.original_module.weight.grad is None


def test_mlp_plain_module_still_works() -> None:
    # not a transformers model: explicit targets, positional input
    model = get_peft_model(make_mlp(), VBLoRAConfig(target_modules=["lin0", "lin2"], vector_length=8, num_vectors=16))
    x = torch.randn(4, 16)
    assert model(x).shape == (4, 4)
