"""Cached A and B: reused while nothing they come from changes, rebuilt exactly when something does, outputs bit
for bit those of a rebuild, never used where autograd needs the graph."""

from __future__ import annotations

import copy
import pickle
from collections.abc import Iterator

import pytest
import torch
import vblora_rs
from support import tolerances
from support.models import MODEL_CASES, make_mlp, output_tensor, randomize
from torch import nn
from vblora_rs import Linear, VBLoRAConfig, get_peft_model
from vblora_rs.demo.mini_models import build


@pytest.fixture
def rebuilds(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Records every (adapter) rebuild of A and B."""
    calls: list[str] = []
    original = Linear._get_lora_matrices

    def counting(self: Linear, adapter: str, cast_to_fp32: bool = False):  # type: ignore[no-untyped-def]
        calls.append(adapter)
        return original(self, adapter, cast_to_fp32)

    monkeypatch.setattr(Linear, "_get_lora_matrices", counting)
    yield calls


def mlp_model(**kw: object) -> nn.Module:
    cfg = {"target_modules": ["lin0", "lin1", "lin2"], "vector_length": 8, "num_vectors": 32, "r": 4, **kw}
    model = get_peft_model(make_mlp(), VBLoRAConfig(**cfg))
    randomize(model)
    return model.eval()


def x_input() -> torch.Tensor:
    return torch.randn(5, 16, generator=torch.Generator().manual_seed(1))


def fresh(model: nn.Module, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
    """The output of a copy with an empty cache (A and B built from scratch)."""
    with torch.no_grad():
        return output_tensor(copy.deepcopy(model)(*args, **kwargs))


def n_layers(model: nn.Module) -> int:
    return sum(isinstance(m, Linear) for m in model.modules())


@pytest.mark.parametrize("case", ["gpt2", "llama", "opt"])
def test_cached_output_is_bit_identical_to_uncached(case: str, rebuilds: list[str]) -> None:
    builder, kw, inputs = MODEL_CASES[case]
    model = get_peft_model(builder(), VBLoRAConfig(**kw)).eval()
    randomize(model)
    with torch.no_grad():
        first = output_tensor(model(**inputs()))
        built = len(rebuilds)
        second = output_tensor(model(**inputs()))
    assert built == n_layers(model) and len(rebuilds) == built  # the second forward rebuilt nothing
    vblora_rs.set_lora_cache_size(0)
    try:
        with torch.no_grad():
            uncached = output_tensor(model(**inputs()))
    finally:
        vblora_rs.set_lora_cache_size(32)
    assert len(rebuilds) == 2 * built
    assert torch.equal(first, second) and torch.equal(second, uncached)


def test_no_cache_while_autograd_needs_the_graph(rebuilds: list[str]) -> None:
    model = mlp_model()
    model.train()
    out = model(x_input()).sum()
    out.backward()
    assert all(not m._lora_cache for m in model.modules() if isinstance(m, Linear))
    assert model.lin0.vblora_logits_A["default"].grad is not None
    assert model.vblora_vector_bank["default"].grad is not None
    # training mode under no_grad (e.g. an evaluation loop that forgot eval()) may cache: no gradient is wanted
    with torch.no_grad():
        model(x_input())
    assert model.lin0._lora_cache


def test_optimizer_step_invalidates(rebuilds: list[str]) -> None:
    model = mlp_model()
    x = x_input()
    with torch.no_grad():
        before = model(x)
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(x).pow(2).sum().backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        after = model(x)
    assert not torch.equal(before, after)
    assert torch.equal(after, fresh(model, x))


@pytest.mark.parametrize("edit", ["logits", "bank", "slice_of_bank"])
def test_in_place_edits_invalidate(edit: str) -> None:
    model = mlp_model()
    x = x_input()
    with torch.no_grad():
        before = model(x)
        if edit == "logits":
            model.lin1.vblora_logits_B["default"].mul_(3)
        elif edit == "bank":
            model.vblora_vector_bank["default"].add_(0.5)
        else:
            model.vblora_vector_bank["default"][3:7].zero_()  # a view: shares the version counter
        after = model(x)
    assert not torch.equal(before, after)
    assert torch.equal(after, fresh(model, x))


def test_load_state_dict_invalidates() -> None:
    model = mlp_model()
    other = mlp_model()
    randomize(other, seed=5)
    x = x_input()
    with torch.no_grad():
        model(x)
    model.load_state_dict(other.state_dict())
    with torch.no_grad():
        assert torch.equal(model(x), other(x))
    # assign=True swaps in the other model's Parameter objects
    fresh_model = mlp_model()
    with torch.no_grad():
        fresh_model(x)
    randomize(other, seed=6)
    fresh_model.load_state_dict(copy.deepcopy(other.state_dict()), assign=True)
    with torch.no_grad():
        assert torch.equal(fresh_model(x), other(x))


def test_dtype_and_data_swaps_invalidate() -> None:
    model = mlp_model()
    x = x_input()
    with torch.no_grad():
        model(x)
        # there and back: the float32 storage may land at the old address with the old version number
        model.half().float()
        assert torch.equal(model(x), fresh(model, x))
        model.to(torch.bfloat16)
        out = model(x.bfloat16())
        assert out.dtype == torch.bfloat16 and torch.equal(out, fresh(model, x.bfloat16()))
        model.float()
        # swapping .data directly (no _apply), twice before a forward
        logits = model.lin0.vblora_logits_A["default"]
        model(x)
        logits.data = logits.data + 1
        logits.data = logits.data - 2
        assert torch.equal(model(x), fresh(model, x))


def test_new_storage_at_the_old_address_invalidates() -> None:
    """Memory freed and reused: same address, same version counter, but another storage (and other values)."""
    model = mlp_model()
    x = x_input()
    logits = model.lin0.vblora_logits_A["default"]
    buffer = logits.detach().numpy().copy()
    logits.data = torch.from_numpy(buffer)
    with torch.no_grad():
        before = model(x)
    buffer *= 2  # behind torch's back: no version bump
    logits.data = torch.from_numpy(buffer)  # a second storage over the same memory
    with torch.no_grad():
        after = model(x)
    assert not torch.equal(before, after)
    assert torch.equal(after, fresh(model, x))


def test_adapters_keep_their_own_entries(rebuilds: list[str]) -> None:
    model = mlp_model()
    model.add_adapter("other", VBLoRAConfig(target_modules=["lin0", "lin1", "lin2"], vector_length=8, num_vectors=32))
    randomize(model, seed=3)
    x = x_input()
    with torch.no_grad():
        a = model(x)
        model.set_adapter("other")
        b = model(x)
        count = len(rebuilds)
        model.set_adapter("default")
        assert torch.equal(model(x), a)
        model.set_adapter("other")
        assert torch.equal(model(x), b)
    assert len(rebuilds) == count  # switching back and forth rebuilt nothing
    model.delete_adapter("other")
    assert all("other" not in m._lora_cache for m in model.modules() if isinstance(m, Linear))


def test_least_recently_used_entries_go_first() -> None:
    model = mlp_model()
    for name in ("a", "b", "c"):
        model.add_adapter(name, VBLoRAConfig(target_modules=["lin0"], vector_length=8, num_vectors=32))
    vblora_rs.set_lora_cache_size(2)
    try:
        with torch.no_grad():
            for name in ("a", "b", "a", "c"):
                model.set_adapter(name)
                model(x_input())
        assert list(model.lin0._lora_cache) == ["a", "c"]
    finally:
        vblora_rs.set_lora_cache_size(32)
    with pytest.raises(ValueError, match="non-negative int"):
        vblora_rs.set_lora_cache_size(-1)


def test_compact_adapter_cache_follows_its_table(tmp_path) -> None:
    model = mlp_model(save_only_topk_weights=True)
    model.compact_("default")
    x = x_input()
    with torch.no_grad():
        before = model(x)
        table = model.base_model.vblora_topk["default"]
        table.weights.mul_(0.5)  # the stored top-K weights change in place
        after = model(x)
    assert not torch.equal(before, after)
    assert torch.equal(after, fresh(model, x))


def test_copies_and_pickles_start_empty_and_state_dict_has_no_cache() -> None:
    model = mlp_model()
    x = x_input()
    with torch.no_grad():
        out = model(x)
    assert model.lin0._lora_cache
    assert not any("cache" in k for k in model.state_dict())
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert not clone.lin0._lora_cache
        with torch.no_grad():
            assert torch.equal(clone(x), out)
        assert clone.lin0._lora_cache  # and it caches again
    assert model.lin0._lora_cache  # the original kept its entries


def test_inference_mode_entries_are_not_saved_for_backward() -> None:
    model = get_peft_model(build("gpt2"), VBLoRAConfig(**MODEL_CASES["gpt2"][1]))
    model.eval()
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = model(ids).logits.clone()
    # frozen adapter, gradient wanted for the input embeddings: the inference tensors cannot be reused
    for param in model.parameters():
        param.requires_grad_(False)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    out = model(inputs_embeds=embeds).logits
    out.sum().backward()
    assert embeds.grad is not None
    assert torch.equal(out.detach(), expected)


def test_threads_with_their_own_adapter_names_and_a_small_cache() -> None:
    """Forwards in several threads (the kernels release the GIL), each with its own adapter_names, on one model:
    each gets its own adapter (the pre-hooks of one call do not leak into another thread's call) and the threads
    evict each other's cache entries without error."""
    from concurrent.futures import ThreadPoolExecutor

    model = mlp_model()
    names = ["default", "a", "b", "c"]
    for name in names[1:]:
        model.add_adapter(name, VBLoRAConfig(target_modules=["lin0", "lin1", "lin2"], vector_length=8, num_vectors=32))
    randomize(model, seed=4)
    x = x_input()
    expected = {}
    with torch.no_grad():
        for name in names:
            expected[name] = model(x, adapter_names=[name] * x.shape[0])

    def run(name: str) -> tuple[str, list[torch.Tensor]]:
        with torch.no_grad():
            return name, [model(x, adapter_names=[name] * x.shape[0]) for _ in range(20)]

    vblora_rs.set_lora_cache_size(1)
    try:
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(run, names * 3))
    finally:
        vblora_rs.set_lora_cache_size(32)
    # Within the reordering bound, not bit for bit: the base layers' matmuls run on MKL, whose thread count is a
    # per-thread setting (torch.set_num_threads in the main thread, e.g. by an earlier test, does not reach a
    # worker thread), so a worker may sum in another order than the main thread did. Another adapter's output is
    # off by orders of magnitude more.
    tol = tolerances.model("mlp")
    for name, outs in results:
        for out in outs:
            torch.testing.assert_close(out, expected[name], **tol, msg=name)


@pytest.mark.parametrize("kind", ["fused", "foreach"])
def test_fused_and_foreach_optimizer_steps_invalidate(kind: str) -> None:
    # these optimizers write the parameters in place without bumping their version counters
    model = get_peft_model(make_mlp(), VBLoRAConfig(target_modules=["lin0"], vector_length=8, num_vectors=16))
    model.eval()
    x = torch.randn(2, 16)
    with torch.no_grad():
        before = model(x)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.5, **{kind: True})
    model.train()
    model(x).sum().backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        after = model(x)
        vblora_rs.set_lora_cache_size(0)
        try:
            rebuilt = model(x)
        finally:
            vblora_rs.set_lora_cache_size(32)
    assert not torch.equal(after, before)
    assert torch.equal(after, rebuilt)
