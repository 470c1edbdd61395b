"""``vblora merge``: the streaming, torch-free merge against PEFT's ``merge_and_unload``, and every refusal."""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from support import tolerances
from support.child_process import child_env
from support.merge_inputs import ADAPTER_KW, leftovers, run_cli, save_adapter, save_base
from support.models import MODEL_CASES, output_tensor
from support.peft_reference import peft_from_pretrained, peft_get_peft_model
from vblora_rs import _native
from vblora_rs import merge as merge_plan
from vblora_rs.cli import main
from vblora_rs.demo.mini_models import build
from vblora_rs.errors import VBLoRAError
from vblora_rs.merge.plan import INDEX_FILE

# --- PEFT's merge as the reference ------------------------------------------------------------------------


def peft_merged(base: Path, adapters: list[Path], dtype: torch.dtype) -> torch.nn.Module:
    """What a PEFT user runs: load the base, load the adapters, merge_and_unload."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    names = [f"a{i}" for i in range(len(adapters))]
    peft_model = peft_from_pretrained(model, adapters[0], adapter_name=names[0])
    for name, path in zip(names[1:], adapters[1:]):
        peft_model.load_adapter(path, adapter_name=name)
    return peft_model.merge_and_unload(adapter_names=names)


def merged_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            out.update(load_file(folder / name))
    return out


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact distance in representable steps between half-precision tensors (same sign assumed near 0)."""
    bits = {torch.bfloat16: torch.int16, torch.float16: torch.int16}[a.dtype]

    def ordered(x: torch.Tensor) -> torch.Tensor:
        i = x.view(bits).to(torch.int32)
        return torch.where(i < 0, -(i & 0x7FFF), i)

    return (ordered(a) - ordered(b)).abs()


def assert_matches(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], one_rounding: bool) -> None:
    """float32: within the reordering bound of a delta (tests/tolerances.py). Half types, over all elements:
    within 1 ulp on >= 99.9% (and never more than 2); with one adapter (one rounding on both sides) >= 99.9% are
    bit-identical, since only last-bit differences of the top-K softmax (Rust's ln/exp are not torch's) can flip a
    rounding."""
    total = within_one = exact = 0
    for name, got in ours.items():
        want = theirs[name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        if got.dtype == torch.float32:
            scale = float(want.abs().max())  # the base weight dominates the sum
            torch.testing.assert_close(got, want, **tolerances.delta(got.dtype, n=4, scale=scale), msg=name)
            continue
        if not tolerances.same_bits_as_torch():  # the portable path rounds the float32 sums differently
            f32 = tolerances.delta(torch.float32, 4, float(want.float().abs().max()))["atol"]
            ulp = torch.finfo(want.dtype).eps * want.float().abs()
            assert ((got.float() - want.float()).abs() <= 2 * ulp + f32).all(), name
            continue
        ulps = ulp_distance(got, want)
        assert int(ulps.max()) <= 2, name
        total += ulps.numel()
        within_one += int((ulps <= 1).sum())
        exact += int((ulps == 0).sum())
    if total:
        assert within_one >= 0.999 * total, (within_one, total)
        if one_rounding:
            assert exact >= 0.999 * total, (exact, total)


# --- results equal PEFT's -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "dtype", "sharded", "topk"),
    [
        ("llama", torch.float32, False, True),
        ("llama", torch.bfloat16, True, False),
        ("gpt2", torch.float32, True, True),
        ("opt", torch.float16, False, True),
    ],
)
def test_one_adapter_matches_peft(tmp_path: Path, case: str, dtype: torch.dtype, sharded: bool, topk: bool) -> None:
    base = save_base(case, tmp_path / "base", dtype, sharded)
    adapter = save_adapter(case, tmp_path / "adapter", seed=1, topk=topk)
    before = {n: (base / n).read_bytes() for n in os.listdir(base)}
    out = tmp_path / "out"
    assert run_cli(base, adapter, "-o", out) == 0
    assert {n: (base / n).read_bytes() for n in os.listdir(base)} == before  # BASE untouched
    assert sorted(os.listdir(out)) == sorted(before)
    assert (out / "tokenizer.json").read_bytes() == before["tokenizer.json"]
    assert (out / "config.json").read_bytes() == before["config.json"]
    ours = merged_tensors(out)
    original = merged_tensors(base)
    assert ours.keys() == original.keys()
    changed = [n for n in ours if not torch.equal(ours[n], original[n])]
    assert changed and all(n.endswith(".weight") for n in changed)
    reference = peft_merged(base, [adapter], dtype)
    assert_matches(ours, reference.state_dict(), one_rounding=True)
    # transformers loads the output, and it computes what PEFT's merged model computes.
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=dtype).eval()
    inputs = MODEL_CASES[case][2]()
    tol = tolerances.model(case) if dtype == torch.float32 else tolerances.half_model(case, dtype)
    with torch.no_grad():
        torch.testing.assert_close(output_tensor(loaded(**inputs)), output_tensor(reference(**inputs)), **tol)
    assert not leftovers(tmp_path)


@pytest.mark.parametrize("full", [False, True])
def test_packed_adapter_merges_like_its_peft_folder(tmp_path: Path, full: bool) -> None:
    """A packed file (and a folder holding one) gives the very tensors its PEFT top-K folder gives."""
    base = save_base("gpt2", tmp_path / "base")
    adapter = save_adapter("gpt2", tmp_path / "adapter", seed=3, topk=not full)
    assert main(["pack", str(adapter), "-o", str(tmp_path / "packed")]) == 0
    assert main(["unpack", str(tmp_path / "packed"), "-o", str(tmp_path / "topk")]) == 0
    assert run_cli(base, tmp_path / "topk", "-o", tmp_path / "from_topk") == 0
    assert run_cli(base, tmp_path / "packed", "-o", tmp_path / "from_folder") == 0
    assert run_cli(base, tmp_path / "packed" / "adapter_packed.safetensors", "-o", tmp_path / "from_file") == 0
    reference = merged_tensors(tmp_path / "from_topk")
    for out in ("from_folder", "from_file"):
        ours = merged_tensors(tmp_path / out)
        assert ours.keys() == reference.keys()
        assert all(torch.equal(ours[k], reference[k]) for k in ours), out
    assert_matches(reference, peft_merged(base, [tmp_path / "topk"], torch.float32).state_dict(), one_rounding=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_adapters_in_one_pass(tmp_path: Path, dtype: torch.dtype) -> None:
    base = save_base("llama", tmp_path / "base", dtype, sharded=True)
    a1 = save_adapter("llama", tmp_path / "a1", seed=1, topk=True)
    a2 = save_adapter("llama", tmp_path / "a2", seed=2, topk=False, target_modules=["q_proj", "down_proj"], r=5)
    assert run_cli(base, a1, a2, "-o", tmp_path / "out") == 0
    ours = merged_tensors(tmp_path / "out")
    # float32: PEFT's sequential merges differ from our single pass by float32 rounding only.
    # bfloat16: PEFT rounds to bf16 after each adapter, which can lose many ulps of the final weight
    # when the deltas cancel; we round once, so compare with PEFT's float32 merge rounded once.
    reference = {k: v.to(dtype) for k, v in peft_merged(base, [a1, a2], torch.float32).state_dict().items()}
    assert_matches(ours, reference, one_rounding=True)


def test_weights_scale_each_delta(tmp_path: Path) -> None:
    base = save_base("opt", tmp_path / "base")
    adapters = [save_adapter("opt", tmp_path / f"a{i}", seed=i, topk=i == 0) for i in range(2)]
    weights = [0.5, -1.25]
    assert run_cli(base, *adapters, "-o", tmp_path / "out", "--weights", *weights) == 0
    ours, original = merged_tensors(tmp_path / "out"), merged_tensors(base)
    expected = {k: v.double() for k, v in original.items()}
    for adapter, w in zip(adapters, weights):
        merged = peft_merged(base, [adapter], torch.float32).state_dict()
        for name in expected:
            expected[name] += w * (merged[name].double() - original[name].double())
    for name, got in ours.items():
        scale = float(original[name].abs().max())
        torch.testing.assert_close(got.double(), expected[name], **tolerances.delta(got.dtype, 4, scale), msg=name)
    assert any(not torch.equal(ours[n], original[n]) for n in ours)


def test_dtype_converts_then_merges(tmp_path: Path) -> None:
    base = save_base("llama", tmp_path / "base", torch.float32, sharded=True)
    adapter = save_adapter("llama", tmp_path / "adapter", seed=3, topk=True)
    out = tmp_path / "out"
    assert run_cli(base, adapter, "-o", out, "--dtype", "bfloat16", "--threads", 1) == 0
    ours = merged_tensors(out)
    assert {t.dtype for t in ours.values()} == {torch.bfloat16}
    assert_matches(ours, peft_merged(base, [adapter], torch.bfloat16).state_dict(), one_rounding=True)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    index = json.loads((out / INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in ours.values())
    assert index["weight_map"] == json.loads((base / INDEX_FILE).read_text())["weight_map"]


def test_prefix_mismatch_is_matched_by_suffix(tmp_path: Path) -> None:
    """An adapter trained on the bare LlamaModel merges into the LlamaForCausalLM checkpoint."""
    base = save_base("llama", tmp_path / "base")
    torch.manual_seed(5)
    bare = MODEL_CASES["llama"][0]().model
    cfg = {**ADAPTER_KW, **MODEL_CASES["llama"][1]}
    peft_get_peft_model(bare, peft.VBLoRAConfig(**cfg)).save_pretrained(tmp_path / "adapter")
    assert run_cli(base, tmp_path / "adapter", "-o", tmp_path / "out") == 0
    ours, original = merged_tensors(tmp_path / "out"), merged_tensors(base)
    assert not torch.equal(
        ours["model.layers.0.self_attn.q_proj.weight"], original["model.layers.0.self_attn.q_proj.weight"]
    )


def test_force_replaces_and_refuses_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = save_base("gpt2", tmp_path / "base")
    adapter = save_adapter("gpt2", tmp_path / "adapter", seed=1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert run_cli(base, adapter, "-o", out) == 1
    assert "already exists" in capsys.readouterr().err and (out / "keep.txt").exists()
    with pytest.raises(VBLoRAError, match="already exists"):
        merge_plan.write_merged(merge_plan.plan_merge(str(base), [str(adapter)]), str(out))
    assert run_cli(base, adapter, "-o", out, "--force") == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert not leftovers(tmp_path)
    for bad_out in (base, adapter, tmp_path, base / "sub"):
        assert run_cli(base, adapter, "-o", bad_out, "--force") == 1
        assert "must lie outside" in capsys.readouterr().err
    assert (base / "model.safetensors").exists() and (adapter / "adapter_model.safetensors").exists()


def test_other_weight_files_and_folders_are_not_copied(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = save_base("gpt2", tmp_path / "base")
    adapter = save_adapter("gpt2", tmp_path / "adapter", seed=1)
    (base / "pytorch_model.bin").write_bytes(b"stale unmerged weights")
    (base / "onnx").mkdir()
    (base / "vocab.txt").write_text("a\nb\n")
    assert run_cli(base, adapter, "-o", tmp_path / "out") == 0
    assert sorted(os.listdir(tmp_path / "out")) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "vocab.txt",
    ]
    err = capsys.readouterr().err
    assert "not copied (weights in another format, unmerged)" in err and "pytorch_model.bin" in err
    assert "not copied (not a regular file)" in err


# --- refusals: nothing is written ---------------------------------------------------------------------


def expect_error(tmp_path: Path, base: Path, adapters: list[Path], match: str, *extra: object) -> None:
    with pytest.raises(VBLoRAError, match=match):
        plan = merge_plan.plan_merge(str(base), [str(a) for a in adapters])
        merge_plan.write_merged(plan, str(tmp_path / "out"))
    assert main(["merge", str(base), *map(str, adapters), "-o", str(tmp_path / "out"), *map(str, extra)]) == 1
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def rewrite_json(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_missing_module(tmp_path: Path) -> None:
    base = save_base("llama", tmp_path / "base")
    builder, cfg, _ = MODEL_CASES["llama"]
    torch.manual_seed(0)
    bigger = builder()
    bigger.model.layers.append(copy.deepcopy(bigger.model.layers[0]))
    peft_get_peft_model(bigger, peft.VBLoRAConfig(**cfg)).save_pretrained(tmp_path / "adapter")
    expect_error(
        tmp_path,
        base,
        [tmp_path / "adapter"],
        r"module model\.layers\.2\.\S+ has no weight model\.layers\.2\..*\.weight in the base",
    )


def test_shape_mismatch(tmp_path: Path) -> None:
    base = save_base("llama", tmp_path / "base")
    wider = build("llama", hidden_size=48, max_position_embeddings=2048)
    kwargs = MODEL_CASES["llama"][1]
    peft_get_peft_model(wider, peft.VBLoRAConfig(**kwargs)).save_pretrained(tmp_path / "adapter")
    expect_error(tmp_path, base, [tmp_path / "adapter"], r"tensor model\.layers\.0\..* has shape \(")


@pytest.mark.parametrize(("case", "said"), [("gpt2", False), ("gpt2", "false"), ("llama", True)])
def test_the_layer_type_decides_fan_in_fan_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, said: object
) -> None:
    """PEFT decides fan_in_fan_out per layer from its class (Conv1D: true, Linear: false) whatever the config
    says; so does the merge, from the base's model_type. A wrong flag (or the string "false") in the config
    of an adapter over square weights used to merge the delta transposed, silently."""
    base = save_base(case, tmp_path / "base")
    adapter = save_adapter(case, tmp_path / "adapter", seed=1)
    expected = peft_merged(base, [adapter], torch.float32).state_dict()
    if isinstance(said, bool):
        rewrite_json(adapter / "adapter_config.json", fan_in_fan_out=said)
        assert run_cli(base, adapter, "-o", tmp_path / "out") == 0
        assert "fan_in_fan_out=" in capsys.readouterr().err  # the ignored flag is reported
        assert_matches(merged_tensors(tmp_path / "out"), expected, one_rounding=True)
    else:  # not a JSON boolean: refused, as from_pretrained refuses it
        rewrite_json(adapter / "adapter_config.json", fan_in_fan_out=said)
        expect_error(tmp_path, base, [adapter], "fan_in_fan_out must be true or false")


def test_unreadable_inputs(tmp_path: Path) -> None:
    base = save_base("opt", tmp_path / "base", sharded=True)
    adapter = save_adapter("opt", tmp_path / "adapter", seed=1, topk=True)
    weights = adapter / "adapter_model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:-10])
    expect_error(tmp_path, base, [adapter], "adapter_model.safetensors: not a safetensors file")
    weights.write_bytes(good)
    (adapter / "adapter_config.json").write_text("{broken")
    expect_error(tmp_path, base, [adapter], "adapter_config.json: not valid JSON")
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    expect_error(tmp_path, base, [adapter], "not a VB-LoRA adapter")
    shutil.rmtree(adapter)
    adapter = save_adapter("opt", tmp_path / "adapter", seed=1, topk=True)
    shard = sorted(base.glob("model-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[:-1])
    expect_error(tmp_path, base, [adapter], f"{shard.name}: not a safetensors file")
    shard.unlink()
    expect_error(tmp_path, base, [adapter], f"{shard.name}: file not found")
    expect_error(tmp_path, tmp_path / "nothing", [adapter], "the folder does not exist")


def test_bad_topk_tensors_and_extra_tensors(tmp_path: Path) -> None:
    base = save_base("llama", tmp_path / "base")
    adapter = save_adapter("llama", tmp_path / "adapter", seed=1, topk=True)
    path = adapter / "adapter_model.safetensors"
    good = load_file(path)
    key = next(k for k in good if k.endswith("_topk_indices"))
    bad = dict(good)
    bad[key] = good[key].clone()
    bad[key].view(-1)[0] = 300  # num_vectors is 300
    save_file(bad, path)
    expect_error(tmp_path, base, [adapter], f"tensor {key.replace('.', '[.]')} row 0 holds index 300, outside")
    bad = {**good, "base_model.model.lm_head.weight": torch.zeros(64, 32)}
    save_file(bad, path)
    expect_error(tmp_path, base, [adapter], "neither VB-LoRA logits nor the vector bank")
    save_file(good, path)
    rewrite_json(adapter / "adapter_config.json", bias="all")
    expect_error(tmp_path, base, [adapter], "trained biases")


def test_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = save_base("opt", tmp_path / "base")
    adapter = save_adapter("opt", tmp_path / "adapter", seed=1)
    for extra, message in [
        (["--weights", "1", "2"], "--weights has 2 values for 1 adapters"),
        (["--weights", "nan"], "--weights must be finite"),
        (["--threads", "-1"], "--threads must be >= 0"),
        (["--threads", str(2**64)], "--threads must be >= 0 (0: all cores) and at most 4096"),
    ]:
        assert run_cli(base, adapter, "-o", tmp_path / "out", *extra) == 1
        assert message in capsys.readouterr().err
        assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_help() -> None:
    with pytest.raises(SystemExit) as exc:
        main(["merge", "--help"])
    assert exc.value.code == 0
    result = subprocess.run(
        [sys.executable, "-m", "vblora_rs", "merge", "--help"],
        capture_output=True,
        text=True,
        env=child_env(),
        check=True,
    )
    for word in ("BASE", "ADAPTER", "--weights", "--dtype", "--threads", "--force", "merge_and_unload"):
        assert word in result.stdout


def test_runs_without_torch(tmp_path: Path) -> None:
    base = save_base("llama", tmp_path / "base", sharded=True)
    adapter = save_adapter("llama", tmp_path / "adapter", seed=1, topk=True)
    code = (
        "import sys\n"
        "from vblora_rs.cli import main\n"
        f"rc = main(['merge', {str(base)!r}, {str(adapter)!r}, '-o', {str(tmp_path / 'out')!r}])\n"
        "assert rc == 0, rc\n"
        "heavy = ('torch', 'transformers', 'peft', 'safetensors')\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in heavy)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], env=child_env(), check=True)
    assert_matches(merged_tensors(tmp_path / "out"), peft_merged(base, [adapter], torch.float32).state_dict(), True)


# --- failures mid-write leave nothing behind ----------------------------------------------------------


def test_failure_mid_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = save_base("llama", tmp_path / "base", sharded=True)
    adapter = save_adapter("llama", tmp_path / "adapter", seed=1)
    plan = merge_plan.plan_merge(str(base), [str(adapter)])
    real = _native.merge_safetensors
    calls = []

    def disk_full_on_third_shard(src, dst, *args):  # type: ignore[no-untyped-def]
        calls.append(dst)
        if len(calls) == 3:
            with open(dst, "wb") as fh:
                fh.write(b"partial")
            raise OSError(28, "No space left on device")
        return real(src, dst, *args)

    monkeypatch.setattr(_native, "merge_safetensors", disk_full_on_third_shard)
    with pytest.raises(OSError, match="No space"):
        merge_plan.write_merged(plan, str(tmp_path / "out"))
    assert len(calls) == 3 and not (tmp_path / "out").exists() and not leftovers(tmp_path)
    # Same through the command line, replacing an existing OUT: the old one survives.
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    calls.clear()
    assert run_cli(base, adapter, "-o", tmp_path / "out", "--force") == 1
    assert os.listdir(tmp_path / "out") == ["old.txt"] and not leftovers(tmp_path)


@pytest.mark.usefixtures("python_sigint")
@pytest.mark.parametrize("how", ["callback", "sigint"])
def test_interrupt_leaves_nothing(tmp_path: Path, how: str) -> None:
    base = save_base("opt", tmp_path / "base", sharded=True)
    adapter = save_adapter("opt", tmp_path / "adapter", seed=1)
    plan = merge_plan.plan_merge(str(base), [str(adapter)])
    seen = []

    def progress(n: int) -> None:
        seen.append(n)
        if len(seen) == 2:
            if how == "sigint":
                os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, delivered while the merge runs
            else:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        merge_plan.write_merged(plan, str(tmp_path / "out"), progress=progress)
    assert len(seen) == 2 and not (tmp_path / "out").exists()
    assert not leftovers(tmp_path)


def test_native_merge_checks_and_cleans_up(tmp_path: Path) -> None:
    import numpy as np
    from vblora_rs import _native

    base = save_base("llama", tmp_path / "base")
    src = base / "model.safetensors"
    tensors, meta, data_bytes = _native.safetensors_header(src)
    assert meta == {"format": "pt"} and data_bytes == src.stat().st_size - 8 - int.from_bytes(
        src.read_bytes()[:8], "little"
    )
    assert tensors["model.layers.0.self_attn.q_proj.weight"] == ("F32", (32, 32))
    u, v = np.ones((32, 2), np.float32), np.ones((2, 32), np.float32)
    with pytest.raises(VBLoRAError, match=r"tensor model\.norm\.weight: shape \[32\]"):
        _native.merge_safetensors(src, tmp_path / "x", {"model.norm.weight": (u, v)})
    with pytest.raises(VBLoRAError, match=r"updates\[.*\]: u must be float32"):
        _native.merge_safetensors(src, tmp_path / "x", {"lm_head.weight": (u.astype(np.float64), v)})
    with pytest.raises(VBLoRAError, match="out_dtype must be"):
        _native.merge_safetensors(src, tmp_path / "x", {}, "int8")
    with pytest.raises(ZeroDivisionError):
        _native.merge_safetensors(src, tmp_path / "x", {}, None, 1, lambda n: 1 / 0)
    assert not (tmp_path / "x").exists()
    _native.merge_safetensors(src, tmp_path / "x", {})
    assert (tmp_path / "x").read_bytes() == src.read_bytes()
