"""FSDP2 (``fully_shard`` on each decoder layer, then on the PeftModel) over two CPU processes (gloo).

One spawn runs everything the ranks do: a few AdamW steps on half batches, the adapter saved from the sharded model
(full and top-K) with ``vblora_rs.training.fsdp.save_pretrained``, and the bad inputs (PEFT's own save on a rank's
shards, a merge and ``compact_`` on shards, a bank sharded on its own or left out of every group). The test process
then trains the same model in one process on the full batches and compares."""

from __future__ import annotations

import os
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from support import tolerances
from support.fsdp_reference import (
    DEPTH,
    WIDEST,
    assert_adapter_matches,
    assert_losses_match,
    eval_ids,
    optimizer,
    param_bounds,
    reference,
    tiny,
)
from vblora_rs import PeftModel, VBLoRAError

WORLD = 2


def adapter_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Logits and bank (the bank under the tuner's key only: the layers' keys repeat it)."""
    return {
        k: v.detach().clone()
        for k, v in state.items()
        if "vblora_logits" in k or k.startswith("base_model.vblora_vector_bank.")
    }


def _attempt(results: dict[str, Any], key: str, action: Any) -> None:
    try:
        action()
        results[key] = "no error"
    except VBLoRAError as exc:
        results[key] = str(exc)


def _bad_shardings(results: dict[str, Any]) -> None:
    from torch.distributed.fsdp import FSDPModule, fully_shard
    from vblora_rs.training.fsdp import check_sharding, fully_shard_model

    ids = eval_ids()
    # the helper: the decoder layers found from _no_split_modules, then the root
    model = fully_shard_model(tiny.peft_model())
    layers = model.base_model.model.model.layers
    results["helper_groups"] = [isinstance(m, FSDPModule) for m in (*layers, model)]
    results["helper_bank"] = type(model.base_model.vblora_vector_bank["default"]).__name__
    # no-grad forwards of the sharded model (the Rust kernels, the A/B cache): an in-place edit of the shards
    # between two forwards must reach the output (the gathered tensors are new each forward)
    model.eval()
    with torch.no_grad():
        first = model(input_ids=ids).logits
        again = model(input_ids=ids).logits
        model.base_model.vblora_vector_bank["default"].mul_(3.0)
        edited = model(input_ids=ids).logits
    results["no_grad_repeat_equal"] = torch.equal(first, again)
    results["no_grad_sees_edit"] = not torch.equal(again, edited)
    # the bank dict given a group of its own: it is never called, so the layers would meet its shards
    model = tiny.peft_model()
    fully_shard(model.base_model.vblora_vector_bank)
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    _attempt(results, "bank_own_group_check", lambda: check_sharding(model))
    _attempt(results, "bank_own_group_forward", lambda: model(input_ids=ids))
    # the bank left out of every group: its gradient would never be reduced over the ranks
    model = tiny.peft_model()
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model, ignored_params=set(model.base_model.vblora_vector_bank.values()))
    _attempt(results, "bank_ignored_check", lambda: check_sharding(model))
    # decoder layers sharded, no root
    model = tiny.peft_model()
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    _attempt(results, "no_root_check", lambda: check_sharding(model))


def _rank(rank: int, init_file: str, out_dir: str) -> None:
    from torch.distributed.fsdp import fully_shard
    from vblora_rs.training.fsdp import check_sharding, full_state_dict, save_pretrained

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    out = Path(out_dir)
    results: dict[str, Any] = {}
    try:
        model = tiny.peft_model()
        # the plain FSDP2 recipe: each decoder layer, then the root
        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        check_sharding(model)
        bank = model.base_model.vblora_vector_bank["default"]
        results["bank_is_shard"] = type(bank).__name__
        opt = optimizer(model)
        model.train()
        half = tiny.BATCH // WORLD
        losses = []
        for step in range(tiny.STEPS):
            part = tiny.batch(step)[rank * half : (rank + 1) * half]
            loss = model(input_ids=part, labels=part).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            total = loss.detach().clone()
            dist.all_reduce(total)  # equal token counts per rank: the full batch's mean is the ranks' mean
            losses.append(total.item() / WORLD)
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=eval_ids()).logits
        state = full_state_dict(model)
        # bad input: PEFT's own save on this rank's shards (every rank would write its slice to one folder)
        direct = out / f"direct{rank}"
        _attempt(results, "direct_save", lambda: model.save_pretrained(str(direct)))
        results["direct_files"] = sorted(os.listdir(direct)) if direct.exists() else []
        q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
        _attempt(results, "merge", lambda: q_proj.merge())
        results["merged_after_refusal"] = list(q_proj.merged_adapters)
        _attempt(results, "compact", lambda: model.base_model.compact_("default"))
        # the adapter from the sharded model: full, then top-K
        save_pretrained(model, str(out / "full"))
        model.peft_config["default"].save_only_topk_weights = True
        save_pretrained(model, str(out / "topk"))
        if rank == 0:
            torch.save({"losses": losses, "logits": logits, "state": adapter_tensors(state)}, out / "trained.pt")
        results["state_keys"] = len(state)
        _bad_shardings(results)
    except Exception:
        results["error"] = traceback.format_exc()
    finally:
        torch.save(results, out / f"rank{rank}.pt")
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def spawned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fsdp")
    mp.spawn(_rank, args=(str(out / "rendezvous"), str(out)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        assert "error" not in torch.load(out / f"rank{rank}.pt"), torch.load(out / f"rank{rank}.pt")["error"]
    return out


def test_training_matches_one_process_on_the_full_batch(spawned: Path) -> None:
    got = torch.load(spawned / "trained.pt")
    ref = reference()
    bounds = param_bounds(ref)
    assert_losses_match(got["losses"], ref, bounds)
    assert_adapter_matches(got["state"], ref, bounds[-1])
    # one bank, updated: every layer's gradient reached it
    (bank_key,) = [k for k in got["state"] if k.startswith("base_model.vblora_vector_bank.")]
    assert not torch.equal(got["state"][bank_key], tiny.peft_model().base_model.vblora_vector_bank["default"])


def test_adapter_saved_from_the_sharded_model_loads_in_one_process(spawned: Path) -> None:
    got = torch.load(spawned / "trained.pt")
    assert not (spawned / "direct0" / "adapter_model.safetensors").exists()
    saved = load_file(spawned / "full" / "adapter_model.safetensors")
    # PEFT's keys: the bank once, logits per layer
    assert "base_model.vblora_vector_bank" in saved and sum("vblora_logits_A" in k for k in saved) == 4
    loaded = PeftModel.from_pretrained(tiny.base_model(), str(spawned / "full"))
    loaded.eval()
    state = loaded.state_dict()
    for key, value in got["state"].items():
        assert torch.equal(state[key], value), key  # the gathered tensors, bit for bit
    with torch.no_grad():
        out = loaded(input_ids=eval_ids()).logits
    torch.testing.assert_close(out, got["logits"], **tolerances.reordered(torch.float32, WIDEST, DEPTH))

    # top-K: what a single process gets by compacting the same adapter
    topk = load_file(spawned / "topk" / "adapter_model.safetensors")
    assert any(k.endswith("_topk_indices") for k in topk) and not any(k.endswith("vblora_logits_A") for k in topk)
    compact = PeftModel.from_pretrained(tiny.base_model(), str(spawned / "topk"))
    expected = PeftModel.from_pretrained(tiny.base_model(), str(spawned / "full"))
    expected.base_model.compact_("default")
    compact.eval()
    expected.eval()
    with torch.no_grad():
        tolerances.assert_same(
            compact(input_ids=eval_ids()).logits,
            expected(input_ids=eval_ids()).logits,
            tolerances.reordered(torch.float32, WIDEST, DEPTH),
        )


def test_bad_inputs_get_named_errors(spawned: Path) -> None:
    for rank in range(WORLD):
        res = torch.load(spawned / f"rank{rank}.pt")
        assert res["bank_is_shard"] == "DTensor"
        assert res["helper_groups"] == [True] * (tiny.LLAMA["num_hidden_layers"] + 1)
        assert res["helper_bank"] == "DTensor"
        assert res["no_grad_repeat_equal"] and res["no_grad_sees_edit"]
        # PEFT's save of one rank's shards: refused on that rank, no adapter file written
        assert res["direct_save"].startswith(f"rank {rank}: adapter 'default' cannot be saved"), res["direct_save"]
        assert "vblora_rs.training.fsdp.save_pretrained" in res["direct_save"]
        assert not {"adapter_model.safetensors", "adapter_config.json"} & set(res["direct_files"])
        # the Rust no-grad paths never see a shard
        assert res["merge"].startswith(f"rank {rank}: adapter 'default' is sharded by FSDP"), res["merge"]
        assert res["merged_after_refusal"] == []
        assert res["compact"].startswith(f"rank {rank}: adapter 'default' is sharded by FSDP"), res["compact"]
        # shardings that break the sharing, named
        assert "fully_shard was applied to base_model.vblora_vector_bank" in res["bank_own_group_check"]
        assert "fully_shard was applied to the vector bank dict itself" in res["bank_own_group_forward"]
        for key in ("bank_ignored_check", "no_root_check"):
            assert f"rank {rank}: the bank base_model.vblora_vector_bank.default is not sharded" in res[key], res[key]
