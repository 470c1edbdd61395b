"""Sharp edges of the command line found by a hostile probe: a merge that ignored what the config targets."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
import vblora_rs
from peft.tuners.tuners_utils import _ExcludedModule, check_target_module_exists
from support.child_process import child_env
from support.models import MODEL_CASES
from support.peft_reference import peft_get_peft_model
from vblora_rs.cli import main
from vblora_rs.errors import VBLoRAError
from vblora_rs.storage import targets

LLAMA = MODEL_CASES["llama"]


def save_llama_adapter(folder: Path, **overrides: Any) -> Path:
    builder, cfg_kwargs, _ = LLAMA
    torch.manual_seed(1)
    kwargs = {**cfg_kwargs, "save_only_topk_weights": True, "init_logits_std": 1.0, **overrides}
    peft_get_peft_model(builder(), peft.VBLoRAConfig(**kwargs)).save_pretrained(folder)
    return folder


def rewrite_config(folder: Path, **changes: Any) -> None:
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def base_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    LLAMA[0]().save_pretrained(tmp_path / "base")
    capsys.readouterr()  # transformers' progress bar
    return tmp_path / "base"


# --- THE target rule equals PEFT's ---------------------------------------------------------------------------

NAMES = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.1.self_attn.q_proj",
    "model.layers.12.mlp.down_proj",
    "model.layers.1.experts.0.q_proj",
    "model.h.3.attn.c_attn",
    "q_proj",
    "lm_head",
    "model.decoder.layers.2.fc1",
    "classifier.dense",
]
CONFIGS: list[dict[str, Any]] = [
    {"target_modules": ["q_proj"]},
    {"target_modules": ["q_proj", "down_proj"], "layers_to_transform": [0, 12]},
    {"target_modules": ["q_proj"], "layers_to_transform": 1},
    {"target_modules": ["q_proj", "c_attn"], "layers_to_transform": [1, 3], "layers_pattern": "layers"},
    {"target_modules": ["q_proj", "c_attn"], "layers_to_transform": [3], "layers_pattern": ["layers", "h"]},
    {"target_modules": ["q_proj"], "layers_to_transform": []},
    {"target_modules": r".*\.(q_proj|fc1)"},
    {"target_modules": r"model\.layers\.\d+\.self_attn\.q_proj", "layers_to_transform": [0]},
    {"target_modules": ["q_proj", "dense"], "exclude_modules": ["model.layers.0.self_attn.q_proj"]},
    {"target_modules": ["q_proj", "dense"], "exclude_modules": r".*layers\.1\..*"},
    {"target_modules": ["dense", "lm_head"], "modules_to_save": ["classifier"]},
]


@pytest.mark.parametrize("fields", CONFIGS, ids=lambda f: json.dumps(f)[:60])
def test_the_target_rule_equals_peft_check_target_module_exists(fields: dict[str, Any]) -> None:
    config = peft.VBLoRAConfig(**fields)
    for name in NAMES:
        theirs = check_target_module_exists(config, name)
        want = (
            targets.EXCLUDED
            if isinstance(theirs, _ExcludedModule)
            else (targets.TARGETED if theirs else targets.NOT_TARGETED)
        )
        assert targets.module_status(vars(config), name) == want, name
        # the same from the JSON file's dict (lists, not PEFT's sets)
        as_json = json.loads(json.dumps({k: v for k, v in fields.items()}))
        assert targets.module_status(as_json, name) == want, name


# --- the command line and the model side apply it alike -------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"layers_to_transform": [0]}, "layers_to_transform=[0] leaves it out"),
        ({"target_modules": ["q_proj"]}, "target_modules=['q_proj'] does not match it"),
    ],
)
def test_merge_refuses_modules_the_config_does_not_target_like_from_pretrained(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], change: dict[str, Any], reason: str
) -> None:
    adapter = save_llama_adapter(tmp_path / "adapter", target_modules=["q_proj", "v_proj"])
    rewrite_config(adapter, **change)
    base = base_folder(tmp_path, capsys)
    assert main(["merge", str(base), str(adapter), "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "the config does not target it" in err and reason in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
    with pytest.raises(VBLoRAError, match=re.escape(f"the config does not target it: {reason}")):
        vblora_rs.PeftModel.from_pretrained(LLAMA[0](), adapter)


def test_merge_refuses_a_file_missing_a_targeted_module(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    adapter = save_llama_adapter(tmp_path / "adapter", target_modules=["q_proj"])
    rewrite_config(adapter, target_modules=["q_proj", "v_proj"])
    assert main(["merge", str(base_folder(tmp_path, capsys)), str(adapter), "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "the config targets module model.layers.0.self_attn.v_proj" in err and "holds no tensors" in err
    with pytest.raises(VBLoRAError, match="missing tensor"):
        vblora_rs.PeftModel.from_pretrained(LLAMA[0](), adapter)


def test_merge_refuses_a_config_rank_other_than_the_tensors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    adapter = save_llama_adapter(tmp_path / "adapter", target_modules=["q_proj"])
    rewrite_config(adapter, r=LLAMA[1]["r"] + 1)
    assert main(["merge", str(base_folder(tmp_path, capsys)), str(adapter), "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert f"holds rank-{LLAMA[1]['r']} tensors, the config says r={LLAMA[1]['r'] + 1}" in err
    with pytest.raises(VBLoRAError):
        vblora_rs.PeftModel.from_pretrained(LLAMA[0](), adapter)


def test_a_narrowed_config_merges_the_modules_it_targets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The rule lets through what it should: layers_to_transform written at training time, file and config
    agreeing, merges as before."""
    adapter = save_llama_adapter(tmp_path / "adapter", target_modules=["q_proj", "v_proj"], layers_to_transform=[1])
    assert main(["merge", str(base_folder(tmp_path, capsys)), str(adapter), "-o", str(tmp_path / "out")]) == 0
    model = vblora_rs.PeftModel.from_pretrained(LLAMA[0](), adapter)
    adapted = sorted(n for n, m in model.named_modules() if isinstance(m, vblora_rs.VBLoRALayer))
    assert adapted == [f"base_model.model.model.layers.1.self_attn.{p}" for p in ("q_proj", "v_proj")]


# --- one-line errors everywhere -----------------------------------------------------------------------------


def save_mlp_adapter(folder: Path) -> Path:
    builder, kwargs, _ = MODEL_CASES["mlp"]
    torch.manual_seed(0)
    peft_get_peft_model(builder(), peft.VBLoRAConfig(**kwargs)).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_every_reader_refuses_nan_or_plus_inf_logits_by_the_one_rule(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], value: float
) -> None:
    from safetensors.torch import load_file as load
    from safetensors.torch import save_file

    folder = save_mlp_adapter(tmp_path / "adapter")
    path = folder / "adapter_model.safetensors"
    tensors = load(str(path))
    key = next(k for k in tensors if k.endswith("lin1.vblora_logits_B"))
    tensors[key][0, 0, 0] = value
    save_file(tensors, str(path))
    for argv in (["inspect", str(folder)], ["to-lora", str(folder), "-o", str(tmp_path / "lora")]):
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert f"{path}: tensor {key}: sub-vector 0 holds NaN or +inf logits" in err and err.count("\n") == 1, err
    with pytest.raises(VBLoRAError, match="sub-vector 0 holds NaN or \\+inf logits"):
        vblora_rs.PeftModel.from_pretrained(MODEL_CASES["mlp"][0](), folder)


@pytest.mark.parametrize("command", ["pack", "inspect", "to-lora", "merge"])
@pytest.mark.parametrize("config", ["huge number", "deep nesting"])
def test_hostile_configs_give_one_named_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, config: str
) -> None:
    folder = save_mlp_adapter(tmp_path / "adapter")
    path = folder / "adapter_config.json"
    text = path.read_text()
    if config == "huge number":
        text = re.sub(r'"num_vectors": \d+', '"num_vectors": ' + "9" * 5000, text)
    else:
        text = text.rstrip().rstrip("}") + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    path.write_text(text)
    argv = {
        "pack": ["pack", str(folder), "-o", str(tmp_path / "out")],
        "inspect": ["inspect", str(folder)],
        "to-lora": ["to-lora", str(folder), "-o", str(tmp_path / "out")],
        "merge": ["merge", str(mlp_base(tmp_path / "base")), str(folder), "-o", str(tmp_path / "out")],
    }[command]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and str(path) in err, err


def mlp_base(folder: Path) -> Path:
    from safetensors.torch import save_file

    folder.mkdir()
    save_file(MODEL_CASES["mlp"][0]().state_dict(), str(folder / "model.safetensors"))
    return folder


# --- outputs: long names, --force over odd targets ---------------------------------------------------------


def hidden_leftovers(parent: Path) -> list[str]:
    return sorted(n for n in os.listdir(parent) if n.startswith(".") and (".tmp-" in n or ".old-" in n))


def writer_argv(command: str, tmp_path: Path, adapter: Path, out: Path) -> list[str]:
    if command == "merge":
        return ["merge", str(mlp_base(tmp_path / "base")), str(adapter), "-o", str(out)]
    return ["to-lora", str(adapter), "-o", str(out)]


@pytest.mark.parametrize("command", ["merge", "to-lora"])
def test_an_output_name_of_255_bytes_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    adapter = save_mlp_adapter(tmp_path / "adapter")
    out = tmp_path / ("o" * 255)
    assert main(writer_argv(command, tmp_path, adapter, out)) == 0, capsys.readouterr().err
    assert out.is_dir() and not hidden_leftovers(tmp_path)
    # again over it with --force (the old one goes through an equally long hidden name)
    (tmp_path / "again").mkdir()
    assert main([*writer_argv(command, tmp_path / "again", adapter, out), "--force"]) == 0
    assert out.is_dir() and not hidden_leftovers(tmp_path)


@pytest.mark.parametrize("command", ["merge", "to-lora"])
def test_an_output_name_too_long_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str) -> None:
    adapter = save_mlp_adapter(tmp_path / "adapter")
    out = tmp_path / ("o" * 256)
    assert main(writer_argv(command, tmp_path, adapter, out)) == 1
    err = capsys.readouterr().err
    assert f"{out}: file name too long (256 bytes" in err and ".tmp-" not in err and err.count("\n") == 1, err
    assert not hidden_leftovers(tmp_path)


@pytest.mark.parametrize("command", ["merge", "to-lora"])
@pytest.mark.parametrize("kind", ["file", "dangling symlink", "symlink loop", "symlink to a folder"])
def test_force_never_replaces_a_file_or_symlink(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, kind: str
) -> None:
    """One rule for both writers: --force replaces an earlier output folder, never a file or a link (merge used
    to replace them, to-lora refused), refused before any work and naming OUT; nothing hidden is left."""
    adapter = save_mlp_adapter(tmp_path / "adapter")
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out"
    if kind == "file":
        out.write_text("old")
    elif kind == "dangling symlink":
        out.symlink_to(work / "nowhere")
    elif kind == "symlink loop":
        out.symlink_to(out)
    else:
        (tmp_path / "elsewhere").mkdir()
        (tmp_path / "elsewhere" / "keep").write_text("x")
        out.symlink_to(tmp_path / "elsewhere")
    status = main([*writer_argv(command, tmp_path, adapter, out), "--force"])
    err = capsys.readouterr().err
    assert status == 1 and f"{out}: exists and is not a folder; not replacing it" in err and err.count("\n") == 1
    assert os.path.lexists(out) and (kind == "symlink to a folder") == out.is_dir()
    assert sorted(os.listdir(work)) == ["out"]  # no hidden .out.tmp-PID-* left
    if kind == "symlink to a folder":
        assert os.listdir(tmp_path / "elsewhere") == ["keep"]


# --- reproducible output ------------------------------------------------------------------------------------


def test_pack_writes_the_same_bytes_for_the_same_input(tmp_path: Path) -> None:
    """The header's __metadata__ came from a Rust HashMap, in an order that changed between runs (processes:
    the hash seed is per process, so each run is a fresh interpreter)."""
    import subprocess
    import sys

    adapter = save_mlp_adapter(tmp_path / "adapter")
    outputs = []
    for i in range(4):
        out = tmp_path / f"packed{i}"
        subprocess.run(
            [sys.executable, "-m", "vblora_rs", "pack", str(adapter), "-o", str(out)],
            check=True,
            env=child_env(),
            capture_output=True,
        )
        outputs.append((out / "adapter_packed.safetensors").read_bytes())
    assert all(o == outputs[0] for o in outputs[1:])
    assert sorted(os.listdir(tmp_path / "packed0")) == ["adapter_config.json", "adapter_packed.safetensors"]


# --- small ones -----------------------------------------------------------------------------------------------


def test_demo_takes_dash_o_like_every_command() -> None:
    from vblora_rs.cli import build_parser

    for flag in ("-o", "--output", "--out"):
        assert build_parser().parse_args(["demo", "--tiny", flag, "somewhere"]).out == "somewhere"


def test_pack_names_a_non_adapter_folder_as_the_other_commands_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    lines = []
    for argv in (["pack", str(empty), "-o", str(tmp_path / "o")], ["inspect", str(empty)]):
        assert main(argv) == 1
        lines.append(capsys.readouterr().err.split("error: ", 1)[1])
    assert lines[0] == lines[1] and "not an adapter folder" in lines[0]


def test_inspect_lists_layers_in_numeric_order(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from vblora_rs.demo.mini_models import build

    base = build("llama", num_hidden_layers=12)
    config = peft.VBLoRAConfig(target_modules=["q_proj"], vector_length=8, num_vectors=16, r=2)
    peft_get_peft_model(base, config).save_pretrained(tmp_path / "adapter")
    assert main(["pack", str(tmp_path / "adapter"), "-o", str(tmp_path / "packed")]) == 0
    for folder in ("adapter", "packed"):
        capsys.readouterr()
        assert main(["inspect", str(tmp_path / folder)]) == 0
        out = capsys.readouterr().out
        layers = [int(m) for m in re.findall(r"model\.layers\.(\d+)\.self_attn\.q_proj", out)]
        assert layers == list(range(12)), (folder, layers)


def test_load_packed_on_a_peft_folder_says_what_to_call(tmp_path: Path) -> None:
    folder = save_mlp_adapter(tmp_path / "adapter")
    with pytest.raises(VBLoRAError, match=r"load it with PeftModel\.from_pretrained\(model, path\)"):
        vblora_rs.load_packed(MODEL_CASES["mlp"][0](), folder)
