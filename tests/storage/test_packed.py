"""The packed single-file adapter format: round trips (lossless against real PEFT checkpoints), sizes at the
Llama-2-7B shape, half mode, the CLI, every hand-made broken packed file, and mutated files."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import peft
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from support.child_process import child_env
from support.models import make_mlp
from support.peft_reference import peft_from_pretrained, peft_get_peft_model
from vblora_rs import VBLoRAConfig, VBLoRAError, _native, get_peft_model
from vblora_rs.cli import main as cli_main
from vblora_rs.convert.packed import (
    is_packed_file,
    read_packed,
    topk_tensors_from_full,
    write_packed,
)
from vblora_rs.demo.mini_models import build
from vblora_rs.storage.names import BANK_KEY, PACKED_WEIGHTS_NAME

DATA = Path(__file__).resolve().parents[1] / "data"
BROKEN = DATA / "broken"
CASES = json.loads((BROKEN / "cases.json").read_text())
MLP_CFG = {"target_modules": ["lin0", "lin1"], "vector_length": 8, "num_vectors": 30, "r": 2}


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """Same keys, dtypes, shapes and bytes."""
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype, key
        assert got[key].shape == value.shape, key
        assert got[key].contiguous().view(torch.uint8).equal(value.contiguous().view(torch.uint8)), key


def ours_topk(**extra: object) -> tuple[dict[str, torch.Tensor], VBLoRAConfig]:
    torch.manual_seed(0)
    config = VBLoRAConfig(save_only_topk_weights=True, init_logits_std=1.0, **{**MLP_CFG, **extra})
    return get_peft_model_state_dict(get_peft_model(make_mlp(), config)), config


# --- round trips --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra", [{}, {"modules_to_save": ["head"], "bias": "all"}, {"topk": 1}, {"topk": 5}])
def test_round_trip_is_bit_exact(tmp_path: Path, extra: dict) -> None:
    tensors, config = ours_topk(**extra)
    report = write_packed(tmp_path / "a.safetensors", tensors, config)
    assert report.total_bytes == os.path.getsize(tmp_path / "a.safetensors")
    parts = report.bank_bytes + report.indices_bytes + report.weights_bytes + report.header_and_extras_bytes
    assert parts == report.total_bytes and report.layer_errors == {} and report.max_error == 0.0
    back_config, back = read_packed(tmp_path / "a.safetensors")
    assert_same_tensors(back, tensors)
    stored, given = back_config.to_dict(), config.to_dict()  # the file's torch-free config vs PEFT's
    for field in ("r", "num_vectors", "vector_length", "topk", "modules_to_save", "bias", "init_logits_std"):
        assert stored[field] == given[field], field
    assert sorted(stored["target_modules"]) == sorted(given["target_modules"])


def peft_checkpoint(tmp_path: Path, model_name: str, dtype: torch.dtype, full: bool) -> tuple[Path, object]:
    """A checkpoint written by the real peft package."""
    torch.manual_seed(0)
    if model_name == "mlp":
        base, kwargs = make_mlp(), {**MLP_CFG, "modules_to_save": ["head"]}
    else:  # llama: int16 indices (num_vectors 300), topk 3
        base = build("llama")
        kwargs = {"target_modules": ["q_proj", "v_proj", "down_proj"], "vector_length": 8, "num_vectors": 300}
        kwargs |= {"r": 3, "topk": 3}
    config = peft.VBLoRAConfig(save_only_topk_weights=not full, init_logits_std=1.0, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft_get_peft_model(base, config).to(dtype)
        folder = tmp_path / f"peft_{model_name}_{'full' if full else 'topk'}"
        model.save_pretrained(folder)
    return folder, model


@pytest.mark.parametrize(
    "model_name, dtype", [("mlp", torch.float32), ("mlp", torch.bfloat16), ("llama", torch.float32)]
)
def test_lossless_against_a_real_peft_checkpoint(tmp_path: Path, model_name: str, dtype: torch.dtype) -> None:
    folder, _ = peft_checkpoint(tmp_path, model_name, dtype, full=False)
    tensors = load_file(folder / "adapter_model.safetensors")
    config = VBLoRAConfig.from_pretrained(folder)
    write_packed(tmp_path / "p.safetensors", tensors, config)
    _, back = read_packed(tmp_path / "p.safetensors")
    assert_same_tensors(back, tensors)
    if model_name == "llama":
        assert (
            back["base_model.model.model.layers.0.self_attn.q_proj.vblora_logits_A_topk_indices"].dtype == torch.int16
        )


def run_cli(*args: str) -> int:
    return cli_main([str(a) for a in args])


def test_cli_pack_full_adapter_equals_peft_topk_save_and_loads_in_peft(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    full, model = peft_checkpoint(tmp_path, "mlp", torch.float32, full=True)
    # PEFT's own top-K save of the same weights is what pack + unpack must reproduce
    model.peft_config["default"].save_only_topk_weights = True
    model.save_pretrained(tmp_path / "peft_topk")
    assert run_cli("pack", full, "-o", tmp_path / "packed") == 0
    out = capsys.readouterr().out
    assert "full logits" in out and "adapter_packed.safetensors" in out
    assert sorted(os.listdir(tmp_path / "packed")) == ["adapter_config.json", PACKED_WEIGHTS_NAME]
    assert run_cli("unpack", tmp_path / "packed", "-o", tmp_path / "unpacked") == 0
    want = load_file(tmp_path / "peft_topk" / "adapter_model.safetensors")
    assert_same_tensors(load_file(tmp_path / "unpacked" / "adapter_model.safetensors"), want)
    assert json.loads((tmp_path / "unpacked" / "adapter_config.json").read_text())["save_only_topk_weights"] is True

    x = torch.randn(3, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft_from_pretrained(make_mlp(), tmp_path / "peft_topk")
        loaded = peft_from_pretrained(make_mlp(), tmp_path / "unpacked")
    with torch.no_grad():
        assert torch.equal(loaded(x), reference(x))


def test_cli_refuses_existing_output_without_force(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    folder, _ = peft_checkpoint(tmp_path, "mlp", torch.float32, full=False)
    out = tmp_path / "out"
    out.mkdir()
    assert run_cli("pack", folder, "-o", out) == 1
    assert "already exists; pass --force" in capsys.readouterr().err
    assert os.listdir(out) == []
    assert run_cli("pack", folder, "-o", out, "--force", "--half", "bfloat16") == 0
    printed = capsys.readouterr().out
    assert "bfloat16 error" in printed and "lin0" in printed and "lin1" in printed
    assert run_cli("unpack", out / PACKED_WEIGHTS_NAME, "-o", out) == 1
    assert run_cli("unpack", out / PACKED_WEIGHTS_NAME, "-o", tmp_path / "u") == 0
    assert load_file(tmp_path / "u" / "adapter_model.safetensors")[BANK_KEY].dtype == torch.bfloat16
    (tmp_path / "afile").write_text("x")
    assert run_cli("unpack", out, "-o", tmp_path / "afile", "--force") == 1
    assert "is not a folder" in capsys.readouterr().err


def test_cli_runs_as_a_module(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "vblora_rs",
            "unpack",
            BROKEN / "packed_index_too_big.safetensors",
            "-o",
            tmp_path / "o",
        ],
        capture_output=True,
        text=True,
        env=child_env(),
    )
    assert done.returncode == 1
    assert "packed_index_too_big.safetensors: tensor `topk_indices` index 1" in done.stderr
    assert not (tmp_path / "o").exists()


# --- sizes and half mode ------------------------------------------------------------------------------------------

LLAMA_LINEARS = {
    "self_attn.q_proj": (4096, 4096),
    "self_attn.k_proj": (4096, 4096),
    "self_attn.v_proj": (4096, 4096),
    "self_attn.o_proj": (4096, 4096),
    "mlp.gate_proj": (11008, 4096),
    "mlp.up_proj": (11008, 4096),
    "mlp.down_proj": (4096, 11008),
}


def llama7b_topk(seed: int = 0) -> tuple[dict[str, torch.Tensor], VBLoRAConfig]:
    """Random top-K tensors of a VB-LoRA adapter on every Llama-2-7B linear (r=4, 2048 x 256 bank, topk=2)."""
    g = torch.Generator().manual_seed(seed)
    length, nv, k, r = 256, 2048, 2, 4
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(32):
        for name, (out_f, in_f) in LLAMA_LINEARS.items():
            base = f"base_model.model.model.layers.{layer}.{name}"
            for grid, shape in (("A", (r, in_f // length)), ("B", (out_f // length, r))):
                first = torch.randint(nv, (shape[0] * shape[1], 1), generator=g)
                idx = torch.cat([first, (first + torch.randint(1, nv, first.shape, generator=g)) % nv], 1)
                top = torch.randn(shape[0] * shape[1], k, generator=g).sort(-1, descending=True).values
                tensors[f"{base}.vblora_logits_{grid}_topk_indices"] = idx.reshape(*shape, k).to(torch.int16)
                weights = torch.softmax(top, -1)[:, :-1].reshape(*shape, k - 1)
                tensors[f"{base}.vblora_logits_{grid}_topk_weights"] = weights.contiguous()
    tensors[BANK_KEY] = torch.rand(nv, length, generator=g) * 0.04 - 0.02
    names = sorted({n.split(".")[-1] for n in LLAMA_LINEARS})
    config = VBLoRAConfig(r=r, num_vectors=nv, vector_length=length, topk=k, target_modules=names)
    return tensors, config


def test_sizes_at_llama2_7b_shape(tmp_path: Path) -> None:
    tensors, config = llama7b_topk()
    save_file(tensors, tmp_path / "peft.safetensors", metadata={"format": "pt"})
    peft_bytes = os.path.getsize(tmp_path / "peft.safetensors")
    lossless = write_packed(tmp_path / "p.safetensors", tensors, config)
    half = write_packed(tmp_path / "h.safetensors", tensors, config, half=torch.float16)
    s = 39_040  # sub-vectors
    assert lossless.indices_bytes == (s * 2 * 11 + 7) // 8 and lossless.bank_bytes == 2048 * 256 * 4
    assert half.bank_bytes == 2048 * 256 * 2 and half.weights_bytes == s * 2
    assert lossless.total_bytes <= 0.95 * peft_bytes, (lossless.total_bytes, peft_bytes)
    assert half.total_bytes <= 0.50 * peft_bytes, (half.total_bytes, peft_bytes)
    assert len(half.layer_errors) == 224 and 0 < half.max_error < 1e-5
    _, back = read_packed(tmp_path / "p.safetensors")
    assert_same_tensors(back, tensors)


def test_half_mode_reports_the_delta_error_of_every_layer(tmp_path: Path) -> None:
    tensors, config = ours_topk(init_vector_bank_bound=0.5, topk=3)
    for half in (torch.float16, torch.bfloat16):
        report = write_packed(tmp_path / "h.safetensors", tensors, config, half=half)
        assert set(report.layer_errors) == {"lin0", "lin1"} and report.half == half
        _, back = read_packed(tmp_path / "h.safetensors")
        assert back[BANK_KEY].dtype == half
        for module in ("lin0", "lin1"):
            key = f"base_model.model.{module}.vblora_logits_A_topk_indices"
            assert torch.equal(back[key], tensors[key])  # indices are never rounded
            # the reported error is the max |B@A - B'@A'| of what was stored, recomputed here in float64
            deltas = []
            for t in (tensors, back):
                A, B = (low_rank(t, module, grid) for grid in "AB")
                deltas.append(B @ A)
            want = (deltas[0] - deltas[1]).abs().max().item()
            # float32 evaluation of the stacked product vs float64 here: ~1e-7 apart
            assert report.layer_errors[module] == pytest.approx(want, rel=1e-3, abs=2e-7)
            # a few roundings of relative size eps per entry of B@A
            assert 0 < report.layer_errors[module] < 8 * torch.finfo(half).eps * deltas[0].abs().max().item()


def low_rank(t: dict[str, torch.Tensor], module: str, grid: str) -> torch.Tensor:
    """A (r, in) or B (out, r) in float64 from top-K tensors, by the definition (independent of the kernels)."""
    key = f"base_model.model.{module}.vblora_logits_{grid}"
    idx = t[key + "_topk_indices"].long()
    w = t[key + "_topk_weights"].double()
    w = torch.cat([w, 1 - w.sum(-1, keepdim=True)], -1)
    sub = (w.unsqueeze(-1) * t[BANK_KEY].double()[idx]).sum(-2)
    return sub.reshape(sub.shape[0], -1) if grid == "A" else sub.transpose(1, 2).reshape(-1, sub.shape[1])


def test_half_rounding_keeps_every_row_a_valid_softmax_prefix(tmp_path: Path) -> None:
    tensors, config = ours_topk(topk=3)
    key = "base_model.model.lin0.vblora_logits_A_topk_weights"
    # two weights whose float16/bfloat16 roundings (to nearest) both go up, past a sum of 1
    tensors[key] = torch.tensor([0.9482223987579346, 0.05177760124206543]).expand_as(tensors[key]).contiguous()
    assert float(tensors[key].double().sum(-1).max()) <= 1
    for half in (torch.float16, torch.bfloat16):
        assert float(tensors[key].to(half).double().sum(-1).max()) > 1 + 1e-6
    for half in (torch.float16, torch.bfloat16):
        write_packed(tmp_path / "h.safetensors", tensors, config, half=half)
        _, back = read_packed(tmp_path / "h.safetensors")
        assert float(back[key].double().sum(-1).max()) <= 1 + 1e-6


# --- input checks -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "edit, match",
    [
        (
            lambda t: t.pop("base_model.model.lin1.vblora_logits_B_topk_weights"),
            "missing tensor .*lin1.vblora_logits_B",
        ),
        (lambda t: t.pop(BANK_KEY), "missing tensor base_model.vblora_vector_bank"),
        (lambda t: t.__setitem__(BANK_KEY, torch.zeros(30, 4)), r"vblora_vector_bank has shape \(30, 4\)"),
        (
            lambda t: t.__setitem__("base_model.model.lin0.vblora_logits_A_topk_indices", torch.zeros(2, 2, 2)),
            "lin0.vblora_logits_A_topk_indices has dtype torch.float32",
        ),
        (
            lambda t: t.__setitem__(
                "base_model.model.lin0.vblora_logits_A_topk_indices", torch.zeros(2, 2, 2, dtype=torch.int32)
            ),
            "differ in dtype from the first module",
        ),
        (
            lambda t: t.__setitem__("base_model.model.lin0.vblora_logits_A_topk_weights", torch.zeros(2, 2, 2)),
            r"lin0.vblora_logits_A_topk_weights has shape \(2, 2, 2\)",
        ),
        (lambda t: t.__setitem__("x.vblora_logits_B", torch.zeros(1)), "x.vblora_logits_B has no matching"),
        (
            lambda t: t.__setitem__("base_model.model.lin0.vblora_logits_A_topk_indices", torch.full((2, 2, 2), 30)),
            r"argument `indices` row 0 \(lin0.vblora_logits_A\[0, 0\]\) holds index 30, outside \[0, 30\)",
        ),
        (
            lambda t: t.__setitem__("base_model.model.lin0.vblora_logits_A_topk_weights", torch.full((2, 2, 1), 1.5)),
            r"argument `weights` row 0 \(lin0.vblora_logits_A\[0, 0\]\) has weights summing to 1.5",
        ),
    ],
)
def test_write_packed_refuses_bad_input(tmp_path: Path, edit, match: str) -> None:  # type: ignore[no-untyped-def]
    tensors, config = ours_topk()
    tensors = {k: v.long() if k.endswith("_indices") else v for k, v in tensors.items()}
    edit(tensors)
    with pytest.raises(VBLoRAError, match=match):
        write_packed(tmp_path / "a.safetensors", tensors, config, source="ckpt.safetensors")
    assert os.listdir(tmp_path) == []  # nothing half-written


def test_full_logits_need_conversion(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = VBLoRAConfig(**MLP_CFG)
    full = get_peft_model_state_dict(get_peft_model(make_mlp(), config))
    with pytest.raises(VBLoRAError, match="holds full logits: convert with topk_tensors_from_full"):
        write_packed(tmp_path / "a.safetensors", full, config)
    topk = topk_tensors_from_full(full, config)
    assert topk_tensors_from_full(topk, config) == topk
    write_packed(tmp_path / "a.safetensors", topk, config)
    bad = dict(full, **{"base_model.model.lin0.vblora_logits_A": torch.zeros(2, 2, 29)})
    with pytest.raises(VBLoRAError, match=r"lin0.vblora_logits_A has shape \(2, 2, 29\)"):
        topk_tensors_from_full(bad, config)
    nan = dict(full, **{"base_model.model.lin0.vblora_logits_A": torch.full((2, 2, 30), float("nan"))})
    with pytest.raises(VBLoRAError, match="tensor base_model.model.lin0.vblora_logits_A: .*NaN"):
        topk_tensors_from_full(nan, config)


def test_binding_checks_its_arguments(tmp_path: Path) -> None:
    path = str(tmp_path / "x.safetensors")
    meta = {"indices_dtype": "uint8", "key_prefix": "", "config": "{}"}
    idx, bank = np.tile(np.array([0, 1], np.int64), (6, 1)), np.zeros((4, 3), np.float32)
    ok = np.full((6, 1), 0.5, np.float32)
    assert _native.encode_packed(path, meta, [("m", 1, 2, 4)], idx, ok, bank, []) == os.path.getsize(path)
    with pytest.raises(VBLoRAError, match=r"weights has shape \(1, 6\), expected \(6, 1\)"):
        _native.encode_packed(path, meta, [("m", 1, 2, 4)], idx, ok.reshape(1, 6), bank, [])
    with pytest.raises(VBLoRAError, match="dimension -1 must be >= 0"):
        _native.encode_packed(path, meta, [("m", -1, 2, 4)], idx, ok, bank, [])
    with pytest.raises(VBLoRAError, match="modules must be a list"):
        _native.encode_packed(path, meta, 3, idx, ok, bank, [])
    with pytest.raises(VBLoRAError, match=r'extra tensor "e": argument `dtype` "f32" is not a safetensors dtype'):
        _native.encode_packed(path, meta, [("m", 1, 2, 4)], idx, ok, bank, [("e", "f32", [1], b"1234")])
    with pytest.raises(VBLoRAError, match=f"^{re.escape(path)}: argument `modules` lists no modules"):
        _native.encode_packed(path, meta, [], idx[:0], ok[:0], bank, [])
    decoded = _native.decode_packed(path)
    assert decoded["index_bits"] == 2 and decoded["weights_dtype"] == "float32"
    assert decoded["indices"].shape == (6, 2) and decoded["metadata"]["modules"] == '[["m",1,2,4]]'


# --- file checks --------------------------------------------------------------------------------------------------


def test_is_packed_file(tmp_path: Path) -> None:
    assert is_packed_file(BROKEN / "packed_valid.safetensors")
    assert not is_packed_file(BROKEN / "peft_valid" / "adapter_model.safetensors")
    assert not is_packed_file(BROKEN / "packed_not_packed.safetensors")
    assert not is_packed_file(BROKEN / "packed_header_length_lie.safetensors")
    assert not is_packed_file(BROKEN / "peft_valid")  # a folder
    assert not is_packed_file(tmp_path / "missing")
    (tmp_path / "junk").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00[1,2]")
    assert not is_packed_file(tmp_path / "junk")


def test_checked_in_files_are_what_the_script_makes(tmp_path: Path) -> None:
    subprocess.run([sys.executable, DATA / "make_broken.py", tmp_path / "b"], check=True)
    made = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    kept = sorted(p.relative_to(BROKEN) for p in BROKEN.rglob("*") if p.is_file())
    assert made == kept
    for rel in made:
        assert (tmp_path / "b" / rel).read_bytes() == (BROKEN / rel).read_bytes(), rel


def test_independently_written_packed_file_decodes_to_the_peft_tensors(tmp_path: Path) -> None:
    """packed_valid.safetensors was bit-packed by make_broken.py in plain Python: the Rust decoder agrees with it,
    and the Rust encoder writes the same content."""
    want = load_file(BROKEN / "peft_valid" / "adapter_model.safetensors")
    config, got = read_packed(BROKEN / "packed_valid.safetensors")
    assert_same_tensors(got, want)
    write_packed(tmp_path / "p.safetensors", want, config)
    ours, theirs = (
        _native.decode_packed(str(p)) for p in (tmp_path / "p.safetensors", BROKEN / "packed_valid.safetensors")
    )
    assert ours["metadata"] == theirs["metadata"]


@pytest.mark.parametrize("name", sorted(n for n, c in CASES.items() if c["kind"] == "packed"))
def test_every_broken_packed_file_is_refused_by_name(name: str, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    path = BROKEN / name
    with pytest.raises(VBLoRAError) as info:
        read_packed(path)
    message = str(info.value)
    assert message.startswith(str(path)), message
    for part in CASES[name]["names"]:
        assert part in message, (part, message)
    assert run_cli("unpack", path, "-o", tmp_path / "out") == 1
    assert name in capsys.readouterr().err
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


# --- mutated files ------------------------------------------------------------------------------------------------


def _valid_packed_bytes() -> bytes:
    return (BROKEN / "packed_valid.safetensors").read_bytes()


def _header_end(data: bytes) -> int:
    return 8 + int.from_bytes(data[:8], "little")


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(_valid_packed_bytes())
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "flip_data", "truncate", "splice", "metadata"]))
        if not data:
            break
        if kind in ("flip", "flip_data"):
            start = min(_header_end(data), len(data) - 1) if kind == "flip_data" else 0
            at = draw(st.integers(start, len(data) - 1))
            data[at] ^= draw(st.integers(1, 255))
        elif kind == "truncate":
            del data[draw(st.integers(0, len(data) - 1)) :]
        elif kind == "splice":
            at = draw(st.integers(0, len(data)))
            data[at:at] = draw(st.binary(max_size=16))
        else:  # replace one metadata value, keeping the file well formed
            try:
                header = json.loads(bytes(data[8 : _header_end(data)]))
                meta = header["__metadata__"]
            except (ValueError, KeyError, TypeError):
                continue
            if not isinstance(meta, dict) or not meta:
                continue
            field = draw(st.sampled_from(sorted(meta)))
            meta[field] = draw(
                st.one_of(st.sampled_from(["0", "1", "-1", "31", "", "[]", "{}", "null", "1e3"]), st.text(max_size=12))
            )
            text = json.dumps(header, separators=(",", ":")).encode()
            text += b" " * (-len(text) % 8)
            data = bytearray(len(text).to_bytes(8, "little") + text + data[_header_end(data) :])
    return bytes(data)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=mutated())
def test_mutated_packed_files_give_vblora_error_or_a_valid_adapter(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "m.safetensors"
    path.write_bytes(data)
    try:
        config, tensors = read_packed(path)
    except VBLoRAError as exc:
        assert str(exc).startswith(str(path))
        return
    # whatever survived decodes to a consistent PEFT top-K dict that packs again
    assert tensors[BANK_KEY].shape == (config.num_vectors, config.vector_length)
    for key, value in tensors.items():
        if key.endswith("_topk_indices"):
            assert int(value.min()) >= 0 and int(value.max()) < config.num_vectors
            assert tensors[key.replace("_indices", "_weights")].shape == (*value.shape[:-1], config.topk - 1)
    write_packed(tmp_path / "again.safetensors", tensors, config)


def test_an_extra_named_like_the_bank_is_refused(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """An extra tensor under PEFT's bank key would replace the bank when the file is unpacked or loaded."""
    from support import many_modules

    config = json.dumps(many_modules.config().to_dict(), sort_keys=True)
    indices, weights = np.array([[0, 1], [2, 3]], dtype=np.int64), np.full((2, 1), 0.75, dtype=np.float32)
    bank = np.zeros((many_modules.NUM_VECTORS, many_modules.VECTOR_LENGTH), dtype=np.float32)
    path = tmp_path / PACKED_WEIGHTS_NAME
    metadata = {"indices_dtype": "uint8", "key_prefix": "base_model.model.", "config": config}
    _native.encode_packed(
        str(path), metadata, [("a", 1, 1, 1)], indices, weights, bank, [(BANK_KEY, "F32", [1], b"\0" * 4)]
    )
    with pytest.raises(VBLoRAError, match=f"{re.escape(str(path))}: tensor {BANK_KEY} clashes with PEFT's key"):
        read_packed(path)
    assert run_cli("unpack", path, "-o", tmp_path / "out") == 1
    assert f"tensor `{BANK_KEY}` clashes with PEFT's key of the vector bank" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
