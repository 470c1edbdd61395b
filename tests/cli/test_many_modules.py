"""Adapters listing a huge number of tiny modules (issue 13): cost linear in the file and small per module, and
what cannot fit a model refused before anything is built per module.

A quadratic step shows as a time ratio near 16 between N and 4N modules (linear: 4); a Python object per tensor as
memory far beyond the file's size. Times are the best of a few runs (the machine may be shared)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import torch
import vblora_rs
from safetensors import safe_open
from support import many_modules
from support.models import make_mlp
from vblora_rs.cli import main
from vblora_rs.convert import packed
from vblora_rs.errors import VBLoRAError

N = 15_000  # and 4N: about a second for the larger inspect on a loaded 2-core machine
# 4N vs N: linear gives 4, quadratic 16. Sorting names (safetensors orders tensors by name) and caches the small
# case fits in make ~5-6.5 here on a loaded 2-core machine; 8 = 4^1.5 fails anything growing like n^1.5 or faster
MAX_RATIO = 8.0
# peak memory of inspecting a packed file, beyond the interpreter's: this many times the file, at most
# (was ~225x: 2.6 GB for a 11.6 MB file listing 300k modules)
RSS_PER_FILE_BYTE = 48


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[int, str]:
    root = tmp_path_factory.mktemp("many")
    return {n: many_modules.write_packed_file(str(root / f"p{n}"), n, seed=n) for n in (N, 4 * N)}


def best_times(small: Callable[[], object], large: Callable[[], object], repeats: int = 4) -> tuple[float, float]:
    """The best time of each, runs interleaved so that a change in the machine's load hits both alike."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for run, out in ((small, times[0]), (large, times[1])):
            start = time.perf_counter()
            run()
            out.append(time.perf_counter() - start)
    return min(times[0]), min(times[1])


def quiet(argv: list[str], capsys: pytest.CaptureFixture[str]) -> Callable[[], None]:
    def run() -> None:
        assert main(argv) == 0, capsys.readouterr().err
        capsys.readouterr()

    return run


def test_inspect_is_linear_in_the_modules(files: dict[int, str], capsys: pytest.CaptureFixture[str]) -> None:
    small, large = best_times(*(quiet(["inspect", files[n]], capsys) for n in (N, 4 * N)))
    assert large / small < MAX_RATIO, f"inspect: {small:.3f} s at {N:,d} modules, {large:.3f} s at {4 * N:,d}"
    assert main(["inspect", files[4 * N], "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["modules"]) == 4 * N and report["modules"][0]["module"] == "layers.0.fc"
    formats = {f["name"]: f["total"] for f in report["formats"]}
    assert formats["packed"] == report["adapter"]["file_bytes"] == os.path.getsize(files[4 * N])
    assert report["bank_usage"]["sub_vectors"] == 4 * N * 2  # r=1, one sub-vector per grid


def test_unpack_is_linear_and_exact(files: dict[int, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def unpack(n: int) -> Callable[[], None]:
        return quiet(["unpack", files[n], "-o", str(tmp_path / f"u{n}"), "--force"], capsys)

    small, large = best_times(unpack(N), unpack(4 * N))
    assert large / small < MAX_RATIO, f"unpack: {small:.3f} s at {N:,d} modules, {large:.3f} s at {4 * N:,d}"
    _, want = packed.read_packed(files[N])  # the model side's reader, tensor by tensor
    with safe_open(str(tmp_path / f"u{N}" / "adapter_model.safetensors"), framework="pt") as fh:
        assert set(fh.keys()) == set(want)
        for key in list(want)[:: len(want) // 50] + ["base_model.vblora_vector_bank"]:
            got = fh.get_tensor(key)
            assert got.dtype == want[key].dtype and torch.equal(got, want[key]), key


def peak_rss_mib(argv: list[str]) -> int:
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    assert proc.stderr is not None
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert os.waitstatus_to_exitcode(status) == 0, err
    return usage.ru_maxrss // 1024


def test_inspect_memory_is_bounded_by_the_file_and_needs_no_torch(files: dict[int, str]) -> None:
    path = files[4 * N]
    env_cmd = [sys.executable, "-c"]
    base = peak_rss_mib([*env_cmd, "import numpy, vblora_rs.cli, vblora_rs._native"])
    check = (
        "import sys; from vblora_rs.cli import main; rc = main(['inspect', sys.argv[1]]); "
        "assert 'torch' not in sys.modules, 'inspect of a packed file imported torch'; sys.exit(rc)"
    )
    peak = peak_rss_mib([*env_cmd, check, path])
    bound = base + RSS_PER_FILE_BYTE * os.path.getsize(path) / 2**20
    assert peak <= bound, f"inspect of {os.path.getsize(path):,d} bytes ({4 * N:,d} modules): {peak} MiB > {bound:.0f}"


class Net(torch.nn.Module):
    """Four ``layers.i.fc`` Linear layers: what a packed file of many_modules would adapt, four times over."""

    def __init__(self) -> None:
        super().__init__()
        L = many_modules.VECTOR_LENGTH
        self.layers = torch.nn.ModuleList(torch.nn.ModuleDict({"fc": torch.nn.Linear(L, L)}) for _ in range(4))


def test_load_packed_refuses_unknown_modules_from_the_header(
    files: dict[int, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file listing 60k modules onto a model of four: refused naming the file and a module, before the data is
    decoded (read_packed never runs) or a layer is injected (the model is left as it was)."""
    path = files[4 * N]

    def no_decode(*args: object) -> None:
        raise AssertionError("read_packed ran: the file was decoded before its modules were checked")

    monkeypatch.setattr(packed, "read_packed", no_decode)
    model = Net()
    before = [name for name, _ in model.named_modules()]
    with pytest.raises(VBLoRAError) as err:
        vblora_rs.load_packed(model, path)
    message = str(err.value)
    assert message.startswith(f"{path}: lists {4 * N:,d} modules, {4 * N - 4:,d} of which the model lacks")
    assert "module 'layers.4.fc'" in message
    assert [name for name, _ in model.named_modules()] == before

    peft_model = vblora_rs.get_peft_model(make_mlp(), vblora_rs.VBLoRAConfig(target_modules=["lin0"], vector_length=8))
    with pytest.raises(VBLoRAError, match="module 'layers.0.fc'"):
        vblora_rs.load_packed(peft_model, path, adapter_name="other")
    assert list(peft_model.peft_config) == ["default"]


def test_load_packed_of_modules_the_model_has(tmp_path: Path) -> None:
    """The check passes a file whose modules the model has (the load itself is test_packed_model's)."""
    path = many_modules.write_packed_file(str(tmp_path / "p"), 4)
    model = vblora_rs.load_packed(Net(), path)
    adapted = [name for name, m in model.named_modules() if isinstance(m, vblora_rs.Linear)]
    assert adapted == [f"base_model.model.layers.{i}.fc" for i in range(4)]


def test_to_lora_refuses_a_header_safetensors_cannot_read(
    files: dict[int, str], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refused from a lower bound of the LoRA header before any factor is built (a million modules need 2M entries,
    ~200 MB); the limit is lowered here so that the 15k-module file crosses it."""
    from vblora_rs.convert import lora

    def no_factors(*args: object) -> None:
        raise AssertionError("factors were built before the header was checked")

    monkeypatch.setattr(lora, "packed_lora_tensors", no_factors)
    monkeypatch.setattr(lora, "MAX_HEADER_BYTES", 1_000_000)
    assert main(["to-lora", files[N], "-o", str(tmp_path / "lora")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"vblora to-lora: error: {files[N]}: lists {N:,d} modules") and "\n" not in err
    assert "needs a header of at least" in err and not (tmp_path / "lora").exists()
