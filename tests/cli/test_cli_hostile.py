"""Hostile and odd inputs to ``vblora merge`` (and the torch-free readers under it): each is refused with one
line naming the file, or handled right; never a crash, a huge allocation, a traceback or a silent wrong file."""

from __future__ import annotations

import json
import os
import resource
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from support.child_process import child_env, run_python
from support.merge_inputs import leftovers, run_cli, save_adapter, save_base
from vblora_rs.errors import VBLoRAError
from vblora_rs.storage import atomic
from vblora_rs.storage.adapter_config import check_config
from vblora_rs.storage.json_file import MAX_DEPTH, parse_object
from vblora_rs.storage.locate import locate

BANK = "base_model.vblora_vector_bank"
# Address space for the merge subprocesses: the torch-free merge of these tiny models needs well under this,
# and the factors a hostile file describes would need 64 GiB.
MEMORY_LIMIT = 3 * 2**30


def topk_adapter(
    folder: Path, num_vectors: int, length: int, topk: int, modules: dict[str, tuple[int, int, int]]
) -> Path:
    """A PEFT top-K adapter written by hand: ``modules`` maps a module path to ``(r, in/L, out/L)``."""
    folder.mkdir(parents=True)
    tensors = {BANK: np.ones((num_vectors, length), np.float32) * 0.01}
    for name, (r, in_sub, out_sub) in modules.items():
        for grid, shape in (("A", (r, in_sub)), ("B", (out_sub, r))):
            key = f"base_model.model.{name}.vblora_logits_{grid}"
            idx = np.broadcast_to(np.arange(topk, dtype=np.uint8), (*shape, topk))
            tensors[key + "_topk_indices"] = np.ascontiguousarray(idx)
            tensors[key + "_topk_weights"] = np.full((*shape, topk - 1), 1.0 / topk, np.float32)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    r = next(iter(modules.values()))[0]
    config = {"peft_type": "VBLORA", "r": r, "num_vectors": num_vectors, "vector_length": length, "topk": topk}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def merge_in_subprocess(*args: object) -> subprocess.CompletedProcess[str]:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))

    return subprocess.run(
        [sys.executable, "-m", "vblora_rs", "merge", *map(str, args)],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit,
    )


# --- crashes and blow-ups -----------------------------------------------------------------------------


def test_factors_far_larger_than_the_file_are_checked_before_they_are_built(tmp_path: Path) -> None:
    """256 KiB of indices at vector_length 65536 describe a 64 GiB A: the shape check against the base refuses
    it first, within a 3 GiB address space (it used to abort allocating the factors)."""
    base = save_base("llama", tmp_path / "base")
    adapter = topk_adapter(tmp_path / "adapter", 1, 65536, 1, {"model.layers.0.self_attn.q_proj": (1, 2**18, 1)})
    assert (adapter / "adapter_model.safetensors").stat().st_size < 600_000
    result = merge_in_subprocess(base, adapter, "-o", tmp_path / "out")
    assert result.returncode == 1, result.stderr
    assert result.stderr.count("\n") == 1 and "has shape (32, 32)" in result.stderr, result.stderr
    assert "q_proj" in result.stderr and not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_huge_bank_values_overflow_with_an_error_naming_the_tensor(tmp_path: Path) -> None:
    base = save_base("llama", tmp_path / "base")
    adapter = save_adapter("llama", tmp_path / "adapter", seed=1)
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(str(path))
    tensors[BANK] = np.full_like(tensors[BANK], 1e20)
    save_file(tensors, str(path))
    assert run_cli(base, adapter, "-o", tmp_path / "out") == 1
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)
    with pytest.raises(VBLoRAError, match=r"tensor model\.layers\.\d+\..*weight: weight at .* overflows float32"):
        from vblora_rs import merge as merge_plan

        merge_plan.write_merged(merge_plan.plan_merge(str(base), [str(adapter)]), str(tmp_path / "out"))


def test_an_infinite_logit_is_refused(tmp_path: Path) -> None:
    base = save_base("llama", tmp_path / "base")
    adapter = save_adapter("llama", tmp_path / "adapter", seed=1)
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = next(k for k in sorted(tensors) if k.endswith("vblora_logits_A"))
    tensors[key][0, 0, 3] = np.inf
    save_file(tensors, str(path))
    from vblora_rs import merge as merge_plan

    with pytest.raises(VBLoRAError, match=f"tensor {key} row 0 holds [+]inf logits"):
        merge_plan.plan_merge(str(base), [str(adapter)])


def test_weights_that_overflow_float32_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = save_base("opt", tmp_path / "base")
    adapter = save_adapter("opt", tmp_path / "adapter", seed=1)
    assert run_cli(base, adapter, "-o", tmp_path / "out", "--weights", "1e39") == 1
    assert "--weights must be finite float32 values" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_a_repeated_index_is_refused_by_every_reader(tmp_path: Path) -> None:
    """The one top-K rule: what merge refuses, the packed encoder and the Python check refuse too."""
    from vblora_rs.storage.topk import first_bad_row

    assert first_bad_row(np.array([[0, 1], [2, 2]]), np.array([[0.5], [0.5]], np.float32), 4) == (
        1,
        "indices",
        "repeats index 2",
    )
    row, part, reason = first_bad_row(np.array([[0, 4]]), np.array([[0.5]], np.float32), 4)
    assert (row, part) == (0, "indices") and reason.startswith("holds index 4")
    row, part, reason = first_bad_row(np.array([[0, 1]]), np.array([[1.5]], np.float32), 4)
    assert (row, part) == (0, "weights") and reason.startswith("has weights")
    assert first_bad_row(np.array([[0, 1]]), np.array([[0.5]], np.float32), 4) is None
    base = save_base("llama", tmp_path / "base")
    adapter = save_adapter("llama", tmp_path / "adapter", seed=1, topk=True)
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = next(k for k in sorted(tensors) if k.endswith("_topk_indices"))
    tensors[key][0, 0, 1] = tensors[key][0, 0, 0]
    save_file(tensors, str(path))
    assert run_cli(base, adapter, "-o", tmp_path / "out") == 1
    from vblora_rs.cli import main

    assert main(["pack", str(adapter), "-o", str(tmp_path / "packed")]) == 1


# --- config and JSON files ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_vectors": 2**31 - 10**9, "vector_length": 2**20}, "bank values, above"),
        ({"r": 2**40}, "`r` 1099511627776 is above 2147483647"),
        ({"vector_length": "8"}, "`vector_length` '8' should be a positive integer value"),
        ({"init_vector_bank_bound": "big"}, "init_vector_bank_bound must be a finite number"),
        ({"layers_to_transform": ["0"]}, "layers_to_transform must be an integer or a list of integers"),
        ({"target_modules": "(.+)+X"}, "nests repetitions"),
        ({"target_modules": "(q_proj"}, "is not a valid regular expression"),
        ({"layers_pattern": "(.+)+"}, "layers_pattern .* makes a regex that nests repetitions"),
        ({"fan_in_fan_out": "false"}, "fan_in_fan_out must be true or false"),
        ({"topk": 300, "num_vectors": 256}, "`topk` 300 must not exceed `num_vectors` 256"),
    ],
)
def test_config_values_are_checked(change: dict, message: str) -> None:
    with pytest.raises(VBLoRAError, match=f"adapter_config.json: .*{message}"):
        check_config({"peft_type": "VBLORA", **change}, "adapter_config.json")


def test_deeply_nested_json_is_one_error() -> None:
    deep = '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}"
    with pytest.raises(VBLoRAError, match=f"x.json: JSON nested deeper than {MAX_DEPTH} levels"):
        parse_object(deep, "x.json")
    assert parse_object('{"a": "[[[[[[[["}', "x.json") == {"a": "[[[[[[[["}  # brackets in strings do not count


def test_deep_json_and_bad_index_in_the_base(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = save_base("opt", tmp_path / "base", sharded=True)
    adapter = save_adapter("opt", tmp_path / "adapter", seed=1)
    index = base / "model.safetensors.index.json"
    good = json.loads(index.read_text())
    bad = {**good, "weight_map": {k: [v] for k, v in good["weight_map"].items()}}
    index.write_text(json.dumps(bad))
    assert run_cli(base, adapter, "-o", tmp_path / "out") == 1
    assert "not a file name in this folder" in capsys.readouterr().err
    index.write_text(json.dumps(good))
    (base / "config.json").write_text('{"a": ' + "[" * 50_000 + "]" * 50_000 + "}")
    assert run_cli(base, adapter, "-o", tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "config.json: JSON nested deeper" in err


# --- the output folder ----------------------------------------------------------------------------------


def test_two_merges_into_one_output_one_fails(tmp_path: Path) -> None:
    base = save_base("opt", tmp_path / "base")
    adapter = save_adapter("opt", tmp_path / "adapter", seed=1)
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "vblora_rs", "merge", str(base), str(adapter), "-o", str(tmp_path / "out")],
            env=child_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    codes = sorted(run.wait(timeout=300) for run in runs)
    assert codes == [0, 1], [run.stderr.read() for run in runs if run.stderr]  # type: ignore[union-attr]
    assert not leftovers(tmp_path)


def test_install_without_replace_never_replaces(tmp_path: Path) -> None:
    target = tmp_path / "out"
    for content in ("first", "second"):
        tmp = Path(atomic.temp_folder(str(target)))
        (tmp / "f").write_text(content)
        if content == "first":
            assert not atomic.install(str(tmp), str(target), replace=False).replaced
        else:
            with pytest.raises(VBLoRAError, match="already exists"):
                atomic.install(str(tmp), str(target), replace=False)
            installed = atomic.install(str(tmp), str(target), replace=True)
            assert installed.replaced and installed.atomic == (atomic.RENAMEAT2 is not None)
    assert (target / "f").read_text() == "second" and sorted(os.listdir(tmp_path)) == ["out"]


def test_stale_temporary_folders_of_dead_runs_are_removed(tmp_path: Path) -> None:
    base = save_base("opt", tmp_path / "base")
    adapter = save_adapter("opt", tmp_path / "adapter", seed=1)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale = [tmp_path / f".out.tmp-{pid}-abc", tmp_path / f".out.old-{pid}-def"]
    alive = tmp_path / f".out.tmp-{os.getpid()}-ghi"  # a run still going: kept
    for folder in (*stale, alive):
        folder.mkdir()
    assert run_cli(base, adapter, "-o", tmp_path / "out") == 0
    assert not any(f.exists() for f in stale) and alive.exists()


def test_only_model_files_are_copied_with_their_modes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = save_base("opt", tmp_path / "base")
    adapter = save_adapter("opt", tmp_path / "adapter", seed=1)
    (base / ".hf_token").write_text("secret")
    (base / "tokenizer_config.json").write_text("{}")
    os.chmod(base / "tokenizer_config.json", 0o600)
    outside = tmp_path / "outside.txt"
    outside.write_text("not the model's")
    os.symlink(outside, base / "notes.txt")
    (base / "special_tokens_map.json").symlink_to("tokenizer_config.json")  # a link inside BASE: fine
    (base / "training_log.csv").write_text("step,loss\n")
    assert run_cli(base, adapter, "-o", tmp_path / "out") == 0
    out = tmp_path / "out"
    assert sorted(os.listdir(out)) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert stat.S_IMODE((out / "tokenizer_config.json").stat().st_mode) == 0o600
    assert not (out / "special_tokens_map.json").is_symlink()
    err = capsys.readouterr().err
    for note in ("(a hidden file)", "(a link out of BASE)", "(not a model, tokenizer or processor file)"):
        assert note in err, err


# --- the locator ----------------------------------------------------------------------------------------


def test_the_locator(tmp_path: Path) -> None:
    with pytest.raises(VBLoRAError, match="does not exist"):
        locate(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VBLoRAError, match="not an adapter folder"):
        locate(tmp_path / "empty")
    adapter = save_adapter("opt", tmp_path / "adapter", seed=1)
    assert locate(adapter).kind == "peft" and locate(adapter / "adapter_config.json").kind == "peft"
    (adapter / "adapter_packed.safetensors").write_bytes(b"")
    with pytest.raises(VBLoRAError, match="holds both"):
        locate(adapter)
    assert locate(adapter / "adapter_packed.safetensors").kind == "packed"


# --- legal files that used to be refused ------------------------------------------------------------------


def unpad_header(path: Path) -> None:
    """Rewrite a safetensors file with its header JSON unpadded and of odd length (legal: readers may not
    assume 8-byte alignment), so that the tensors start at an odd offset."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8 : 8 + n])).encode()
    if len(header) % 2 == 0:
        header += b" "
    path.write_bytes(len(header).to_bytes(8, "little") + header + data[8 + n :])


def test_an_unpadded_header_and_a_bank_beyond_float16_are_legal(tmp_path: Path) -> None:
    from vblora_rs.cli import main

    adapter = save_adapter("llama", tmp_path / "adapter", seed=1, topk=True)
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(str(path))
    tensors[BANK][0, 0] = 1e5  # above float16's 65504: legal in a float32 bank
    save_file(tensors, str(path))
    unpad_header(path)
    assert (int.from_bytes(path.read_bytes()[:8], "little") + 8) % 4 != 0
    assert main(["inspect", str(adapter), "--json"]) == 0
    assert main(["to-lora", str(adapter), "-o", str(tmp_path / "lora")]) == 0
    assert main(["pack", str(adapter), "-o", str(tmp_path / "packed")]) == 0


def test_a_packed_config_that_is_not_a_json_object(tmp_path: Path) -> None:
    from vblora_rs.storage.adapter_config import parse_config

    for text, message in [("[1]", "expected a JSON object, got list"), ("{nope", "not valid JSON")]:
        with pytest.raises(VBLoRAError, match=f"f.safetensors \\(its config\\): {message}"):
            parse_config(text, "f.safetensors (its config)")


def test_a_failed_write_under_to_lora_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """safetensors reports a full disk as SafetensorError, which is no OSError (whichever of its writers is used:
    its serializer for the factors built all at once, torch's save_file for the module by module path)."""
    import safetensors
    import safetensors.torch
    from vblora_rs.cli import main

    class SafetensorError(Exception):
        pass

    def full_disk(*args: object, **kwargs: object) -> None:
        raise SafetensorError("Error while serializing: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    monkeypatch.setattr(safetensors, "serialize_file", full_disk)
    adapter = save_adapter("opt", tmp_path / "adapter", seed=1)
    assert main(["to-lora", str(adapter), "-o", str(tmp_path / "lora")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err and "lora: writing" in err
    assert not (tmp_path / "lora").exists() and not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


def test_a_hugging_face_cache_snapshot_of_links_merges(tmp_path: Path) -> None:
    """Hub downloads are links from snapshots/REV/ into the repository's blobs/: those are followed."""
    saved = save_base("opt", tmp_path / "saved")
    adapter = save_adapter("opt", tmp_path / "adapter", seed=1)
    repo = tmp_path / "hub" / "models--x--opt"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    for i, f in enumerate(sorted(saved.iterdir())):
        blob = repo / "blobs" / f"blob{i}"
        blob.write_bytes(f.read_bytes())
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    assert run_cli(snapshot, adapter, "-o", tmp_path / "out") == 0
    assert sorted(os.listdir(tmp_path / "out")) == sorted(os.listdir(saved))
    assert not any((tmp_path / "out" / n).is_symlink() for n in os.listdir(tmp_path / "out"))


# `vblora ...` that writes one byte to the pipe READY_FD as soon as the command's Ctrl-C handling is in place
# (before that, it is Python's own start-up and imports: a Ctrl-C there is Python's traceback, as for any program)
CLI_SAYING_READY = """
import os, sys
from vblora_rs import cli

build_parser = cli.build_parser

def ready_then_build():
    os.write(int(os.environ["READY_FD"]), b"r")
    return build_parser()

cli.build_parser = ready_then_build
cli.console_main()
"""


def start_cli_saying_ready(*args: object) -> tuple[subprocess.Popen[str], float]:
    """The CLI in a child (stderr piped); returns it and the time it said ready."""
    import select
    import time

    read_end, write_end = os.pipe()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-c", CLI_SAYING_READY, *map(str, args)],
            env=child_env(READY_FD=str(write_end)),
            pass_fds=(write_end,),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        os.close(write_end)
        readable, _, _ = select.select([read_end], [], [], 300)
        assert readable and os.read(read_end, 1) == b"r", "the CLI never started"
        return proc, time.monotonic()
    finally:
        os.close(read_end)


@pytest.mark.usefixtures("python_sigint")
def test_ctrl_c_at_any_moment_is_one_line(tmp_path: Path) -> None:
    """SIGINT at moments spread over a merge from the moment the CLI handles it (imports, Rust reading the
    adapter, numpy hand-off, writing): exit 130 with one line, or 0 when it came too late; never a traceback or
    a Rust panic."""
    # (11 moments a run; run with a larger range by hand to hunt for rare windows)
    import signal
    import time

    base = save_base("llama", tmp_path / "base")
    adapter = save_adapter("llama", tmp_path / "adapter", seed=1)
    proc, ready = start_cli_saying_ready("merge", base, adapter, "-o", tmp_path / "timed")
    assert proc.wait(timeout=300) == 0, proc.communicate()[1]
    duration = time.monotonic() - ready
    for i in range(11):
        out = tmp_path / f"out{i}"
        proc, _ = start_cli_saying_ready("merge", base, adapter, "-o", out)
        time.sleep(duration * 0.1 * i)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=300)
        # -SIGINT: it came while the interpreter was shutting down, after the command (Python's handler is gone)
        assert proc.returncode in (0, 130, -signal.SIGINT), (i, proc.returncode, err)
        assert "Traceback" not in err and "Panic" not in err, err
        if proc.returncode == 130:
            assert err.strip().count("\n") == 0 and "interrupted" in err and not out.exists()
        else:
            assert sorted(os.listdir(out)) == sorted(os.listdir(tmp_path / "timed")), (i, proc.returncode, err)
    assert not leftovers(tmp_path)


@pytest.mark.usefixtures("python_sigint")
def test_ctrl_c_while_the_commands_are_imported_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    # building the parser imports every command (numpy with them); a SIGINT during a C extension's import comes
    # out of the import as that extension's ImportError, as numpy's "PyCapsule_Import could not import" did
    import signal

    from vblora_rs import cli

    def importing_numpy() -> None:
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the handler runs here
        except KeyboardInterrupt as exc:
            raise ImportError("PyCapsule_Import could not import module 'datetime'") from exc
        raise AssertionError("no SIGINT arrived")

    monkeypatch.setattr(cli, "build_parser", importing_numpy)
    assert cli.main(["inspect", "x"]) == 130
    assert capsys.readouterr().err == "vblora: interrupted; nothing was written\n"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.usefixtures("python_sigint")
def test_ctrl_c_in_a_class_body_while_importing_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """A Ctrl-C in a descriptor's ``__set_name__`` while a module defines a class (numpy's ``finfo`` and its
    ``cached_property``: a CI failure) comes out as RuntimeError on Python 3.11 and as KeyboardInterrupt from 3.12:
    one line and 130 either way."""
    import signal

    from vblora_rs import cli

    class Interrupting:
        def __set_name__(self, owner: type, name: str) -> None:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the handler runs here
            raise AssertionError("no SIGINT arrived")

    def importing_a_class() -> None:
        class Finfo:  # noqa: F841 (defining it is the point)
            epsneg = Interrupting()

    monkeypatch.setattr(cli, "build_parser", importing_a_class)
    assert cli.main(["inspect", "x"]) == 130
    assert capsys.readouterr().err == "vblora: interrupted; nothing was written\n"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


CTRL_C_WHERE_PYTHON_CANNOT_RAISE_IT = """
import ctypes, signal, sys, weakref
from vblora_rs.cli import counting_ctrl_c

class Held:
    pass

def in_a_callback():
    # the weakref callback runs at `del` and the Ctrl-C lands inside it: Python prints "Exception ignored in ..."
    # with a traceback and goes on (importlib's module locks have such callbacks)
    held = Held()
    ref = weakref.ref(held, lambda _: signal.raise_signal(signal.SIGINT))
    del held

def printed_by_c_code():
    # C code that meets the Ctrl-C, prints it with PyErr_Print and goes on, as numpy's import_array does in an
    # extension's init (it then raises "numpy._core.multiarray failed to import")
    ctypes.pythonapi.PyRun_SimpleString(b"import signal; signal.raise_signal(signal.SIGINT)")

try:
    with counting_ctrl_c() as ctrl_c:
        globals()[sys.argv[1]]()
        print("went on")
        for _ in range(200_000_000):
            pass
        print("ran on")
except KeyboardInterrupt:
    print("interrupted", ctrl_c.count)
"""


@pytest.mark.skipif(not hasattr(__import__("signal"), "setitimer"), reason="the re-delivery needs setitimer")
@pytest.mark.usefixtures("python_sigint")
@pytest.mark.parametrize("landing", ["in_a_callback", "printed_by_c_code"])
def test_a_ctrl_c_python_cannot_raise_still_interrupts_without_a_traceback(landing: str) -> None:
    """A Ctrl-C can land where Python only prints it and goes on: a callback Python calls on its own, or the first
    Python code an extension's init runs (a bare traceback from PyErr_Print: what failed CI once, in ``merge``).
    The CLI keeps it quiet and delivers it again, so that the command stops, in one line."""
    done = run_python(CTRL_C_WHERE_PYTHON_CANNOT_RAISE_IT, landing, timeout=120)
    assert done.stdout.split() == ["went", "on", "interrupted", "2"], (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr and "KeyboardInterrupt" not in done.stderr, done.stderr
    assert "Exception ignored" not in done.stderr, done.stderr


NUMPY_API_INTERRUPTED = """
import numpy.lib

real = numpy.lib.NumpyVersion

def interrupted(*args, **kwargs):
    raise KeyboardInterrupt  # a Ctrl-C while the numpy crate parses numpy's version to load its C API

numpy.lib.NumpyVersion = interrupted
try:
    from vblora_rs import _native
    _native.load_numpy_api()
    print("loaded")
except KeyboardInterrupt:
    print("KeyboardInterrupt")
numpy.lib.NumpyVersion = real
from vblora_rs import _native
_native.load_numpy_api()
import numpy as np
print(_native.topk_many([np.arange(8, dtype=np.float32).reshape(2, 4)], 1, False, 1)[0].tolist())
"""


def test_a_ctrl_c_while_numpys_c_api_loads_is_a_keyboard_interrupt_not_a_panic() -> None:
    """The numpy crate loads numpy's C API on first use and panics when that fails; loading it up front turns a
    Ctrl-C there into a KeyboardInterrupt (one line in the CLI), and a later load works."""
    done = run_python(NUMPY_API_INTERRUPTED, timeout=120)
    assert done.stdout.split("\n")[:2] == ["KeyboardInterrupt", "[[3], [3]]"], (done.stdout, done.stderr)
    assert "panicked" not in done.stderr, done.stderr
