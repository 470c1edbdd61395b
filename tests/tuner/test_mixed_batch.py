"""Many adapters in one batch: ``model(..., adapter_names=[...])`` and ``generate(..., adapter_names=[...])`` give
every sample what it gets with its adapter alone; the work grows with the distinct adapters, not the batch."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from peft.utils import ModulesToSaveWrapper
from support import tolerances
from support.ecosystem import ECOSYSTEM, adapted_model, config
from support.models import make_mlp, randomize
from torch import nn
from vblora_rs import Linear, VBLoRAConfig, VBLoRAError, get_peft_model
from vblora_rs.demo.mini_models import build

NAMES = ["default", "second", "__base__", "default", "second", "second"]
# matmul rounding over different row counts, through the deepest of the models tested here
TOL = max((tolerances.model(case) for case in ECOSYSTEM), key=lambda t: t["rtol"])


def with_adapters(case: str, compact_second: bool = False) -> nn.Module:
    model = adapted_model(case)
    model.add_adapter("second", config(case))
    randomize(model, seed=11)  # every adapter (and modules_to_save copy) gets its own values
    if compact_second:
        model.compact_("second")
    return model.eval()


def inputs_for(case: str, batch: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    inputs = {"input_ids": torch.randint(3, 64, (batch, 7), generator=gen)}
    if case in ("t5", "bart"):
        inputs["decoder_input_ids"] = torch.randint(3, 64, (batch, 4), generator=gen)
    return inputs


def alone(model: nn.Module, adapter: str, inputs: dict[str, Any]) -> torch.Tensor:
    """The whole batch with one adapter active (or none)."""
    with torch.no_grad():
        if adapter == "__base__":
            with model.disable_adapter():
                return model(**inputs).logits
        model.set_adapter(adapter)
        return model(**inputs).logits


@pytest.mark.parametrize("case", sorted(ECOSYSTEM))
def test_every_row_gets_its_own_adapter(case: str) -> None:
    if case == "roberta":
        # its classification head (modules_to_save) is no Linear: PEFT's ModulesToSaveWrapper refuses mixed batches
        with pytest.raises(TypeError, match="Mixed batching is only supported"):
            with torch.no_grad():
                with_adapters(case)(**inputs_for(case, len(NAMES)), adapter_names=NAMES)
        return
    model = with_adapters(case, compact_second=case == "llama")
    inputs = inputs_for(case, len(NAMES))
    with torch.no_grad():
        mixed = model(**inputs, adapter_names=NAMES).logits
    assert model.active_adapter == "default"
    # the same rows of the same batch run with that adapter alone (equal up to rounding: an adapter's product and
    # a modules_to_save head run over its rows only, and a matmul over fewer rows may round differently)
    for adapter in set(NAMES):
        rows = [i for i, n in enumerate(NAMES) if n == adapter]
        torch.testing.assert_close(mixed[rows], alone(model, adapter, inputs)[rows], **TOL)
    # and each sample run on its own (other batch shapes: matmul rounding may differ)
    model.set_adapter("default")
    for i, adapter in enumerate(NAMES[:3]):
        single = {k: v[i : i + 1] for k, v in inputs.items()}
        torch.testing.assert_close(mixed[i : i + 1], alone(model, adapter, single), **TOL)
    # the adapters really differ, or the test proves nothing
    assert not torch.allclose(alone(model, "default", inputs), alone(model, "second", inputs), atol=1e-3)


def test_work_grows_with_distinct_adapters_not_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    model = with_adapters("gpt2")
    calls: list[int] = []
    original = Linear._adapter_output

    def counting(self: Linear, adapter: str, x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return original(self, adapter, x)

    monkeypatch.setattr(Linear, "_adapter_output", counting)
    n_layers = sum(isinstance(m, Linear) for m in model.modules())
    names = ["default", "second"] * 8 + ["__base__"] * 4
    with torch.no_grad():
        model(**inputs_for("gpt2", len(names)), adapter_names=names)
    assert len(calls) == 2 * n_layers  # one low-rank product per distinct adapter per layer
    assert sorted(set(calls)) == [8]  # over that adapter's rows only


def test_generate_with_adapter_names() -> None:
    model = with_adapters("gpt2")
    names = ["second", "__base__", "default"]
    prompt = inputs_for("gpt2", 3)["input_ids"]
    kw = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        mixed = model.generate(input_ids=prompt, adapter_names=names, **kw)
        for i, adapter in enumerate(names):
            if adapter == "__base__":
                with model.disable_adapter():
                    expected = model.generate(input_ids=prompt, **kw)
            else:
                model.set_adapter(adapter)
                expected = model.generate(input_ids=prompt, **kw)
            assert torch.equal(mixed[i], expected[i]), adapter
        # beams: each sample's beams keep its adapter
        model.set_adapter("second")
        beams = model.generate(input_ids=prompt, adapter_names=["second"] * 3, num_beams=2, **kw)
        expected = model.generate(input_ids=prompt, num_beams=2, **kw)
    assert torch.equal(beams, expected)
    assert not any(m._forward_pre_hooks for m in model.modules() if isinstance(m, Linear))


@pytest.mark.parametrize("case", ["t5", "bart"])
def test_generate_encoder_decoder_with_beams(case: str) -> None:
    model = with_adapters(case)
    names = ["second", "default", "__base__"]
    prompt = inputs_for(case, 3)["input_ids"]
    kw = {"max_new_tokens": 4, "do_sample": False, "num_beams": 2}
    with torch.no_grad():
        mixed = model.generate(input_ids=prompt, adapter_names=names, **kw)
        for i, adapter in enumerate(names):
            if adapter == "__base__":
                with model.disable_adapter():
                    expected = model.generate(input_ids=prompt, **kw)
            else:
                model.set_adapter(adapter)
                expected = model.generate(input_ids=prompt, **kw)
            n = min(mixed.shape[1], expected.shape[1])
            assert torch.equal(mixed[i, :n], expected[i, :n]), adapter


def test_modules_to_save_per_row() -> None:
    model = with_adapters("bert")
    head = model.get_base_model().classifier
    assert isinstance(head, ModulesToSaveWrapper) and set(head.modules_to_save) == {"default", "second"}
    inputs = inputs_for("bert", len(NAMES))
    with torch.no_grad():
        mixed = model(**inputs, adapter_names=NAMES).logits
    for adapter in set(NAMES):
        rows = [i for i, n in enumerate(NAMES) if n == adapter]
        torch.testing.assert_close(mixed[rows], alone(model, adapter, inputs)[rows], **TOL)


def test_errors() -> None:
    model = with_adapters("gpt2")
    inputs = inputs_for("gpt2", 2)
    with pytest.raises(VBLoRAError, match="non-existing adapter"):
        model(**inputs, adapter_names=["default", "typo"])
    with pytest.raises(VBLoRAError, match="Length of `adapter_names`"):
        model(**inputs, adapter_names=["default"])
    with pytest.raises(VBLoRAError, match="list of adapter names"):
        model(**inputs, adapter_names="default")
    model.train()
    with pytest.raises(VBLoRAError, match="training mode"):
        model(**inputs, adapter_names=["default", "second"])
    model.eval()
    model.merge_adapter()
    with pytest.raises(VBLoRAError, match="merged adapters"):
        model(**inputs, adapter_names=["default", "second"])
    model.unmerge_adapter()
    # a layer called with a batch that is not a multiple of the names
    layer = next(m for m in model.modules() if isinstance(m, Linear))
    with pytest.raises(VBLoRAError, match="number of inputs"):
        layer(torch.randn(3, 2, 32), adapter_names=["default", "second"])
    # nothing left behind by the failed calls
    assert not any(m._forward_pre_hooks for m in model.modules())
    with torch.no_grad():
        model(**inputs, adapter_names=["default", "second"])


def test_disabled_adapters_win() -> None:
    model = with_adapters("gpt2")
    inputs = inputs_for("gpt2", 2)
    with torch.no_grad(), model.disable_adapter():
        mixed = model(**inputs, adapter_names=["default", "second"]).logits
    with torch.no_grad():
        base = build("gpt2")(**inputs).logits
    torch.testing.assert_close(mixed, base, atol=0, rtol=0)


def test_layer_takes_a_plain_list_and_repeated_rows() -> None:
    # (batch * seq, features) inputs, as some models flatten them: each sample owns its consecutive rows
    model = get_peft_model(make_mlp(), VBLoRAConfig(target_modules=["lin0"], vector_length=8, num_vectors=16))
    model.add_adapter("b", VBLoRAConfig(target_modules=["lin0"], vector_length=8, num_vectors=16))
    randomize(model)
    layer = model.lin0
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mixed = layer(x, adapter_names=["b", "default"])  # rows 0-2 -> b, rows 3-5 -> default
        layer.set_adapter("b")
        b = layer(x)
        layer.set_adapter("default")
        default = layer(x)
    torch.testing.assert_close(mixed[:3], b[:3], **TOL)
    torch.testing.assert_close(mixed[3:], default[3:], **TOL)
    assert not torch.allclose(b, default, atol=1e-3)
