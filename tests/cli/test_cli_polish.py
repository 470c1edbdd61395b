"""The command line's manners: --version, one output flag, plain progress lines in logs, quiet broken pipes,
private-free output modes, submodules reachable from a bare ``import vblora_rs``."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import vblora_rs
from support.child_process import child_env
from support.merge_inputs import save_adapter, save_base

# the output option's help line: argparse before 3.13 repeats the metavar after each flag (`-o OUT, --output OUT,
# --out OUT`), 3.13 writes it once after the last (`-o, --output, --out OUT`)
OUTPUT_OPTION = re.compile(r"^ +-o( OUT)?, --output( OUT)?, --out OUT(  |$)", re.MULTILINE)


def vblora(*args: object, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vblora_rs", *map(str, args)],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
        **kw,
    )


def test_version() -> None:
    done = vblora("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"vblora {vblora_rs.__version__}"


def test_every_command_spells_the_output_flag_alike() -> None:
    for command in ("merge", "to-lora", "pack", "unpack"):
        assert OUTPUT_OPTION.search(vblora(command, "--help").stdout), command


def test_ops_is_an_attribute_of_the_lazily_imported_package() -> None:
    code = "import vblora_rs; print(vblora_rs.ops.topk_softmax.__name__)"
    done = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True, text=True, timeout=300)
    assert done.stdout.strip() == "topk_softmax", done.stderr


def test_piped_inspect_closed_early_is_quiet(tmp_path: Path) -> None:
    adapter = save_adapter("llama", tmp_path / "adapter", seed=1)
    cmd = f"{sys.executable} -m vblora_rs inspect {adapter} | head -1"
    done = subprocess.run(cmd, shell=True, env=child_env(), capture_output=True, text=True, timeout=300)
    assert done.stdout.count("\n") == 1 and "Broken pipe" not in done.stderr and "Error" not in done.stderr


def test_merge_in_a_log_prints_lines_not_bars_and_to_lora_output_is_not_private(tmp_path: Path) -> None:
    base = save_base("opt", tmp_path / "base")
    adapter = save_adapter("opt", tmp_path / "adapter", seed=1)
    done = vblora("merge", base, adapter, "-o", tmp_path / "out")
    assert done.returncode == 0 and "\r" not in done.stderr
    old = os.umask(0o022)
    try:
        assert vblora("to-lora", adapter, "--output", tmp_path / "lora").returncode == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "lora").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755


def test_pack_writes_files_of_the_usual_mode(tmp_path: Path) -> None:
    adapter = save_adapter("llama", tmp_path / "adapter", seed=1, topk=True)
    old = os.umask(0o022)
    try:
        assert vblora("pack", adapter, "-o", tmp_path / "packed").returncode == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "packed" / "adapter_packed.safetensors").stat().st_mode) == 0o644
