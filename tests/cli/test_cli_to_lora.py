"""``vblora to-lora``: the exported LoRA adapter loads in PEFT as LoRA and gives the VB-LoRA model's outputs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
import vblora_rs
from safetensors.torch import load_file, save_file
from support import tolerances
from support.child_process import child_env
from support.models import MODEL_CASES, output_tensor
from support.peft_reference import peft_from_pretrained
from vblora_rs.cli import main
from vblora_rs.convert.adapter_tensors import module_factors, read_adapter
from vblora_rs.storage.packed_arrays import read_packed_arrays

# outputs of the same deltas through another order of products, over the deepest of MODEL_CASES' models
ATOL = max(tolerances.model(case)["atol"] for case in MODEL_CASES)
LIBS = {"peft": peft, "vblora_rs": vblora_rs}


def save_adapter(tmp_path: Path, case: str, saver: str, **overrides: Any) -> tuple[Path, torch.Tensor]:
    """A VB-LoRA adapter of ``case`` saved by ``saver``, and the outputs of the model that saved it. Extra
    trainable tensors (biases, modules_to_save copies) are moved off their base values so carrying them matters."""
    builder, cfg_kwargs, make_inputs = MODEL_CASES[case]
    lib = LIBS[saver]
    kwargs = {"init_vector_bank_bound": 0.5, "init_logits_std": 1.0, **cfg_kwargs, **overrides}
    torch.manual_seed(0)
    model = lib.get_peft_model(builder(), lib.VBLoRAConfig(**kwargs))
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and "vblora" not in name:
                param.add_(0.1 * torch.randn(param.shape, generator=gen))
        expected = output_tensor(model(**make_inputs()))
    path = tmp_path / f"{case}-{saver}"
    model.save_pretrained(path)
    return path, expected


def load_lora(case: str, path: Path) -> torch.nn.Module:
    model = peft_from_pretrained(MODEL_CASES[case][0](), path)
    assert isinstance(model.peft_config["default"], peft.LoraConfig)
    return model


def outputs(model: torch.nn.Module, case: str) -> torch.Tensor:
    with torch.no_grad():
        return output_tensor(model(**MODEL_CASES[case][2]()))


def convert(src: Path, out: Path, *extra: str) -> int:
    return main(["to-lora", str(src), "-o", str(out), *extra])


@pytest.mark.parametrize("saver", ["vblora_rs", "peft"])
@pytest.mark.parametrize("topk", [False, True], ids=["full", "topk"])
@pytest.mark.parametrize("case", ["gpt2", "llama", "opt"])
def test_lora_equals_vblora(tmp_path: Path, case: str, topk: bool, saver: str) -> None:
    src, _ = save_adapter(tmp_path, case, saver, save_only_topk_weights=topk)
    reference = outputs(LIBS[saver].PeftModel.from_pretrained(MODEL_CASES[case][0](), src), case)
    base = outputs(MODEL_CASES[case][0](), case)
    assert (reference - base).abs().max() > 1e-2  # the adapter does change the outputs

    assert convert(src, tmp_path / "lora") == 0
    lora = load_lora(case, tmp_path / "lora")
    torch.testing.assert_close(outputs(lora, case), reference, atol=ATOL, rtol=0)

    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    src_config = json.loads((src / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"] == src_config["r"]
    assert config["fan_in_fan_out"] == (case == "gpt2") and not config["use_rslora"] and not config["use_dora"]
    marker = "vblora_logits_A" + ("_topk_indices" if topk else "")
    n_modules = sum(1 for k in load_file(src / "adapter_model.safetensors") if k.endswith(marker))
    assert len(config["target_modules"]) == n_modules
    tensors = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    assert {v.dtype for k, v in tensors.items() if ".lora_" in k} == {torch.float32}
    assert len(tensors) == 2 * n_modules


@pytest.mark.parametrize("storage", ["full", "topk"])
@pytest.mark.parametrize("case", ["gpt2", "llama"])
def test_factors_equal_peft_bit_for_bit(tmp_path: Path, case: str, storage: str) -> None:
    """A and B of a checkpoint PEFT wrote are PEFT's own ``_get_lora_matrices`` of it, bit for bit (llama's 300
    vectors store int16 indices and k=3, gpt2's 40 uint8 and k=2)."""
    src, _ = save_adapter(tmp_path, case, "peft", save_only_topk_weights=storage == "topk")
    adapter = read_adapter(src)
    assert adapter.storage == storage
    factors = module_factors(adapter)
    theirs = peft_from_pretrained(MODEL_CASES[case][0](), src)
    layers = {
        n.removeprefix("base_model.model."): m for n, m in theirs.named_modules() if hasattr(m, "vblora_logits_A")
    }
    assert layers.keys() == factors.keys()
    for name, layer in layers.items():
        with torch.no_grad():
            A, B = layer._get_lora_matrices("default")
        assert torch.equal(factors[name][0], A) and torch.equal(factors[name][1], B), name


@pytest.mark.parametrize("saver", ["vblora_rs", "peft"])
@pytest.mark.parametrize(
    ("bias", "modules_to_save", "topk"),
    [("all", ["final_layer_norm"], False), ("vblora_only", None, True), ("none", ["final_layer_norm"], True)],
)
def test_biases_and_modules_to_save_carried(
    tmp_path: Path, saver: str, bias: str, modules_to_save: list[str] | None, topk: bool
) -> None:
    src, expected = save_adapter(
        tmp_path, "opt", saver, bias=bias, modules_to_save=modules_to_save, save_only_topk_weights=topk
    )
    reference = outputs(LIBS[saver].PeftModel.from_pretrained(MODEL_CASES["opt"][0](), src), "opt")
    torch.testing.assert_close(reference, expected, atol=ATOL, rtol=0)  # the extras are in the file
    assert convert(src, tmp_path / "lora") == 0
    lora = load_lora("opt", tmp_path / "lora")
    torch.testing.assert_close(outputs(lora, "opt"), reference, atol=ATOL, rtol=0)

    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["bias"] == {"all": "all", "vblora_only": "lora_only", "none": "none"}[bias]
    assert config["modules_to_save"] == modules_to_save
    vblora_tensors = load_file(src / "adapter_model.safetensors")
    lora_tensors = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    extras = {k: v for k, v in vblora_tensors.items() if "vblora" not in k}
    assert extras and all(torch.equal(lora_tensors[k], v) for k, v in extras.items())


def test_accepts_weights_file_and_force_replaces(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, _ = save_adapter(tmp_path, "llama", "vblora_rs")
    out = tmp_path / "lora"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    assert convert(src / "adapter_model.safetensors", out) == 1
    assert "already exists; pass --force" in capsys.readouterr().err
    assert (out / "stale.txt").exists() and not (out / "adapter_model.safetensors").exists()

    assert convert(src / "adapter_model.safetensors", out, "--force") == 0
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["llama-vblora_rs", "lora"]  # no staging or old folders left
    assert "LoRA r=3 over 14 modules" in capsys.readouterr().out
    load_lora("llama", out)


def test_refuses_file_output_and_own_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, _ = save_adapter(tmp_path, "llama", "vblora_rs")
    (tmp_path / "file").write_text("x")
    assert convert(src, tmp_path / "file", "--force") == 1
    assert "exists and is not a folder" in capsys.readouterr().err
    assert convert(src, src, "--force") == 1
    assert "input adapter's own folder" in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "x" and (src / "adapter_model.safetensors").exists()


def _edit_tensors(src: Path, edit: Any) -> None:
    tensors = load_file(src / "adapter_model.safetensors")
    edit(tensors)
    save_file(tensors, src / "adapter_model.safetensors", metadata={"format": "pt"})


def _edit_config(src: Path, **changes: Any) -> None:
    config = json.loads((src / "adapter_config.json").read_text())
    config.update(changes)
    (src / "adapter_config.json").write_text(json.dumps(config))


Q_PROJ = "base_model.model.model.layers.0.self_attn.q_proj.vblora_logits_A"
BAD_INPUTS = {
    "missing folder": (lambda src: None, "nowhere", "nowhere: does not exist"),
    "no weights": (lambda src: os.unlink(src / "adapter_model.safetensors"), "", "no adapter_model.safetensors"),
    "not json": (lambda src: (src / "adapter_config.json").write_text("{"), "", "adapter_config.json: not valid JSON"),
    "lora config": (lambda src: _edit_config(src, peft_type="LORA"), "", "peft_type is 'LORA'"),
    "bad r": (lambda src: _edit_config(src, r=0), "", "`r` 0 should be a positive integer value"),
    "r mismatch": (lambda src: _edit_config(src, r=2), "", "_topk_indices has shape (3, "),
    "not safetensors": (
        lambda src: (src / "adapter_model.safetensors").write_bytes(b"garbage"),
        "",
        "not a readable safetensors file",
    ),
    "index out of range": (
        lambda src: _edit_tensors(src, lambda t: t[Q_PROJ + "_topk_indices"].view(-1)[5].fill_(300)),
        "",
        f"tensor {Q_PROJ}_topk_indices holds indices outside [0, 300)",
    ),
    "nan weight": (
        lambda src: _edit_tensors(src, lambda t: t[Q_PROJ + "_topk_weights"].view(-1)[0].fill_(float("nan"))),
        "",
        f"tensor {Q_PROJ}_topk_weights (row 0) holds weight",
    ),
    "weights above 1": (
        lambda src: _edit_tensors(src, lambda t: t[Q_PROJ + "_topk_weights"].view(-1)[:2].fill_(0.9)),
        "",
        f"tensor {Q_PROJ}_topk_weights (row 0) has weights summing to 1.79",
    ),
    "weights shape": (
        lambda src: _edit_tensors(
            src, lambda t: t.update({Q_PROJ + "_topk_weights": t[Q_PROJ + "_topk_weights"][:, :2].contiguous()})
        ),
        "",
        f"{Q_PROJ}_topk_weights (3, 2, 2) do not hold topk=3 entries",
    ),
    "missing half": (
        lambda src: _edit_tensors(src, lambda t: t.pop(Q_PROJ + "_topk_weights")),
        "",
        "module model.layers.0.self_attn.q_proj holds",
    ),
    "missing bank": (
        lambda src: _edit_tensors(src, lambda t: t.pop("base_model.vblora_vector_bank")),
        "",
        "missing tensor base_model.vblora_vector_bank",
    ),
    "bank shape": (
        lambda src: _edit_config(src, vector_length=4),
        "",
        "tensor base_model.vblora_vector_bank has shape (300, 8), the config says",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_names_file_and_tensor(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str) -> None:
    src, _ = save_adapter(tmp_path, "llama", "vblora_rs", save_only_topk_weights=True)
    edit, sub, message = BAD_INPUTS[case]
    edit(src)
    target = src / sub if sub else src
    before = sorted(os.listdir(tmp_path))
    assert convert(target, tmp_path / "lora") == 1
    err = capsys.readouterr().err
    assert err.startswith("vblora to-lora: error: ") and message in err, err
    assert str(src) in err  # the file or folder at fault is named
    assert sorted(os.listdir(tmp_path)) == before  # nothing written, no staging folder left


def test_full_logits_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, _ = save_adapter(tmp_path, "llama", "peft")
    _edit_tensors(src, lambda t: t[Q_PROJ].view(-1)[3].fill_(float("nan")))
    assert convert(src, tmp_path / "lora") == 1
    assert (
        f"{src}/adapter_model.safetensors: tensor {Q_PROJ}: sub-vector 0 holds NaN or +inf logits"
        in capsys.readouterr().err
    )
    _edit_tensors(src, lambda t: t.update({Q_PROJ: t[Q_PROJ][..., :-1].contiguous()}))
    assert convert(src, tmp_path / "lora") == 1
    assert (
        f"tensor {Q_PROJ} has shape (3, 4, 299), expected 3 dims ending in num_vectors=300" in capsys.readouterr().err
    )


def test_help_in_a_subprocess_without_torch() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "vblora_rs", "to-lora", "--help"], capture_output=True, text=True, env=child_env()
    )
    assert done.returncode == 0, done.stderr
    # argparse before 3.13 prints `-o OUT, --output OUT, --out OUT`, 3.13 `-o, --output, --out OUT`
    assert "--force" in done.stdout and re.search(r"^ +-o( OUT)?, --output( OUT)?, --out OUT\b", done.stdout, re.M)
    probe = "import sys; from vblora_rs.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=child_env(), check=False)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stdout + done.stderr


@pytest.mark.parametrize(
    ("case", "overrides", "half"),
    [
        ("llama", {}, None),  # 300 vectors: int16 indices, k=3, modules of several shapes
        ("gpt2", {}, "bfloat16"),  # bfloat16 bank and weights
        ("opt", {"bias": "all", "modules_to_save": ["final_layer_norm"]}, None),  # extras carried over
    ],
)
def test_packed_input_equals_its_peft_folder_byte_for_byte(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, overrides: dict[str, Any], half: str | None
) -> None:
    """A packed file is exported from its flat arrays, every module at once (convert/lora.py); the PEFT folder
    it unpacks to goes module by module. Both files must be the same bytes."""
    src, _ = save_adapter(tmp_path, case, "vblora_rs", save_only_topk_weights=True, **overrides)
    assert main(["pack", str(src), "-o", str(tmp_path / "packed"), *(["--half", half] if half else [])]) == 0
    assert main(["unpack", str(tmp_path / "packed"), "-o", str(tmp_path / "unpacked")]) == 0
    assert convert(tmp_path / "packed", tmp_path / "from_packed") == 0
    assert convert(tmp_path / "unpacked", tmp_path / "from_peft") == 0
    capsys.readouterr()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "from_packed" / name).read_bytes() == (tmp_path / "from_peft" / name).read_bytes(), name


def _saved(tmp_path: Path, case: str, topk: int, storage: str, dtype: torch.dtype, **overrides: Any) -> Path:
    """A VB-LoRA adapter of ``case`` saved by our code in ``dtype`` (bank, logits and extras), full or top-K."""
    builder, cfg_kwargs, _ = MODEL_CASES[case]
    kwargs = {"init_vector_bank_bound": 0.5, "init_logits_std": 1.0, **cfg_kwargs, "topk": topk, **overrides}
    torch.manual_seed(0)
    model = vblora_rs.get_peft_model(
        builder(), vblora_rs.VBLoRAConfig(save_only_topk_weights=storage == "topk", **kwargs)
    )
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and "vblora" not in name:
                param.add_(0.1 * torch.randn(param.shape, generator=gen))
    model.to(dtype)
    path = tmp_path / f"{case}-{storage}-k{topk}"
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize(
    ("case", "storage", "topk", "dtype", "overrides"),
    [
        ("llama", "full", 1, torch.float32, {}),
        ("llama", "full", 3, torch.float32, {}),
        ("llama", "topk", 1, torch.float32, {}),
        ("llama", "topk", 3, torch.float32, {}),  # int16 indices, 300 vectors, modules of several shapes
        ("gpt2", "full", 2, torch.bfloat16, {}),  # bfloat16 bank and logits
        ("gpt2", "topk", 2, torch.bfloat16, {}),  # bfloat16 bank and stored weights
        ("opt", "full", 2, torch.float16, {"bias": "all", "modules_to_save": ["final_layer_norm"]}),
        ("opt", "topk", 2, torch.float32, {"bias": "vblora_only", "modules_to_save": ["final_layer_norm"]}),
        ("opt", "topk", 2, torch.bfloat16, {"bias": "all"}),  # bfloat16 extras, carried as stored
    ],
)
def test_peft_folder_at_once_equals_module_by_module(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    case: str,
    storage: str,
    topk: int,
    dtype: torch.dtype,
    overrides: dict[str, Any],
) -> None:
    """A PEFT folder is exported every module at once (one selection, one gather: convert/lora.py); the module by
    module export (lora_tensors) must give the same file, byte for byte. So must the packed file of a top-K folder
    (its extras carried as stored, bfloat16 included)."""
    from vblora_rs.convert import lora

    src = _saved(tmp_path, case, topk, storage, dtype, **overrides)
    adapter = read_adapter(src)
    assert adapter.storage == storage and adapter.bank.dtype == dtype
    assert {t.dtype for t in adapter.extras.values()} == ({dtype} if overrides else set())
    assert lora.peft_lora_tensors(adapter) is not None  # the flat path takes every one of these
    lora.export_lora(src, tmp_path / "at_once")
    outputs = ["at_once"]
    if storage == "topk":
        assert main(["pack", str(src), "-o", str(tmp_path / "packed")]) == 0
        packed = read_packed_arrays(str(tmp_path / "packed" / "adapter_packed.safetensors"))
        assert lora.packed_lora_tensors(packed) is not None
        lora.export_lora(tmp_path / "packed", tmp_path / "from_packed")
        outputs.append("from_packed")
    monkeypatch.setattr(lora, "peft_lora_tensors", lambda adapter: None)
    lora.export_lora(src, tmp_path / "by_module")
    for out in outputs:
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            assert (tmp_path / out / name).read_bytes() == (tmp_path / "by_module" / name).read_bytes(), (out, name)


def test_an_overflowing_factor_is_named_by_module_and_position() -> None:
    """The flat split names the first factor (modules in name order, A before B) that is not finite, at its place in
    that factor, as the module by module export did: ``<file>: base_model.model.<module>.lora_B.weight overflows``."""
    import numpy as np
    from vblora_rs.convert.lora import _split_factors
    from vblora_rs.errors import VBLoRAError

    r, L = 2, 4
    names = ["m.b", "m.a", "m.c"]  # flat order; the error follows name order
    in_sub, out_sub = np.array([3, 1, 2]), np.array([2, 2, 1])
    rows = np.random.default_rng(0).standard_normal((int((r * in_sub + out_sub * r).sum()), L)).astype(np.float32)
    assert set(_split_factors(rows, names, in_sub, out_sub, r, "f")) == {
        f"base_model.model.{n}.lora_{p}.weight" for n in names for p in "AB"
    }
    # module m.b (first in the flat order): its B grid (out_sub, r, L) starts after its A grid (r * in_sub rows)
    b_start = r * 3
    bad = rows.copy()
    bad[b_start + 1 * r + 0, 3] = np.inf  # sub-vector (out 1, rank 0), element 3: B[1 * L + 3, 0]
    with pytest.raises(VBLoRAError, match=r"^f: base_model\.model\.m\.b\.lora_B\.weight overflows float32 at \(7, 0\)"):
        _split_factors(bad, names, in_sub, out_sub, r, "f")
    # module m.a (second in the flat order, first by name): an A value, named before m.b's B
    a_start = r * 3 + 2 * r
    bad[a_start + 1, 2] = -np.inf  # A grid (r, in_sub=1, L): rank 1, element 2 -> A[1, 2]
    with pytest.raises(VBLoRAError, match=r"^f: base_model\.model\.m\.a\.lora_A\.weight overflows float32 at \(1, 2\)"):
        _split_factors(bad, names, in_sub, out_sub, r, "f")
