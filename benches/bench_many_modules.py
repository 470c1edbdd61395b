"""Time and peak RSS of every tool on adapters listing a huge number of tiny modules (issue 13).

    python benches/bench_many_modules.py --modules 30000 300000 [--only inspect unpack] [--timeout 300]

Each measurement is one fresh process (``os.wait4`` gives its own peak RSS); files come from
``tests/support/many_modules.py`` (the project's own writers). Commands: ``vblora inspect`` / ``unpack`` /
``to-lora`` of the packed file, ``vblora pack`` of the unpacked PEFT folder, ``vblora merge`` into a tiny base
holding two of the modules (must fail fast: the adapter names modules the base lacks), ``load_packed`` and
PEFT-format ``from_pretrained`` onto a model with four ``layers.i.fc`` layers (must fail fast, naming the file and
a module; ``[call N s]`` is that call alone, after the imports). The machine may be shared: use ``--repeats`` (medians).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from support import many_modules  # noqa: E402

MODEL = """
import time, torch, peft, vblora_rs
from torch import nn
load_packed, PeftModel = vblora_rs.load_packed, vblora_rs.PeftModel  # imports done before the clock starts
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({"fc": nn.Linear(4, 4)}) for _ in range(4))
"""
LOAD_PACKED = (
    MODEL
    + """
start = time.perf_counter()
try:
    load_packed(Net(), PATH)
except vblora_rs.VBLoRAError as exc:
    print(f"[call {time.perf_counter() - start:.2f} s]", str(exc)[:300])
"""
)
FROM_PRETRAINED = (
    MODEL
    + """
start = time.perf_counter()
try:
    PeftModel.from_pretrained(Net(), PATH)
except Exception as exc:
    print(f"[call {time.perf_counter() - start:.2f} s]", type(exc).__name__, str(exc)[:300])
"""
)


def run_once(argv: list[str], timeout: float) -> tuple[float, int, int, str]:
    """(seconds, peak RSS MiB, exit status, last line of output) of one fresh process, measured together."""
    devnull = os.open(os.devnull, os.O_RDWR)
    read_end, write_end = os.pipe()
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # child: output to the pipe, then exec
        os.dup2(write_end, 1)
        os.dup2(write_end, 2)
        os.dup2(devnull, 0)
        os.close(read_end)
        try:
            os.execv(argv[0], argv)
        finally:
            os._exit(127)
    os.close(write_end)
    chunks = []
    deadline = start + timeout
    timed_out = False
    os.set_blocking(read_end, False)
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        try:
            while True:
                chunk = os.read(read_end, 65536)
                if not chunk:
                    break
                chunks.append(chunk)
        except BlockingIOError:
            pass
        if done:
            break
        if time.perf_counter() > deadline:
            os.kill(pid, 9)
            _, status, usage = os.wait4(pid, 0)
            timed_out = True
            break
        time.sleep(0.02)
    seconds = time.perf_counter() - start
    os.close(read_end)
    os.close(devnull)
    text = b"".join(chunks).decode(errors="replace").strip().splitlines()
    last = "timed out" if timed_out else (text[-1] if text else "")
    return seconds, usage.ru_maxrss // 1024, os.waitstatus_to_exitcode(status), last


def tiny_base(folder: str) -> str:
    """A safetensors model holding layers.0.fc.weight and layers.1.fc.weight only."""
    import numpy as np
    from safetensors.numpy import save_file

    os.makedirs(folder, exist_ok=True)
    L = many_modules.VECTOR_LENGTH
    save_file(
        {f"layers.{i}.fc.weight": np.zeros((L, L), np.float32) for i in range(2)},
        os.path.join(folder, "model.safetensors"),
        metadata={"format": "pt"},
    )
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modules", type=int, nargs="+", default=[30000, 300000])
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    py = sys.executable
    cli = [py, "-m", "vblora_rs"]
    with tempfile.TemporaryDirectory(prefix="many_modules_") as tmp:
        base = tiny_base(os.path.join(tmp, "base"))
        for n in args.modules:
            packed = many_modules.write_packed_file(os.path.join(tmp, f"packed{n}"), n)
            peft = os.path.join(tmp, f"peft{n}")
            # the PEFT folder: 4 tensors per module; safetensors caps headers at 100 MB (~250k modules)
            if n <= 150_000:
                many_modules.write_peft_folder(peft, n)
            size = os.path.getsize(packed)
            print(f"\n{n:,d} modules, packed file {size:,d} bytes")
            out = os.path.join(tmp, "out")
            cases = {
                "inspect": cli + ["inspect", packed],
                "unpack": cli + ["unpack", packed, "-o", out, "--force"],
                "to-lora": cli + ["to-lora", packed, "-o", out, "--force"],
                "merge": cli + ["merge", base, packed, "-o", out, "--force"],
                "load_packed": [py, "-c", LOAD_PACKED.replace("PATH", repr(packed))],
            }
            if n <= 150_000:
                cases["pack"] = cli + ["pack", peft, "-o", out, "--force"]
                cases["inspect-peft"] = cli + ["inspect", peft]
                cases["from_pretrained-peft"] = [py, "-c", FROM_PRETRAINED.replace("PATH", repr(peft))]
            for name, argv in cases.items():
                if args.only and name not in args.only:
                    continue
                runs = []
                for _ in range(args.repeats):
                    shutil.rmtree(out, ignore_errors=True)
                    runs.append(run_once(argv, args.timeout))
                runs.sort()
                seconds, rss, code, last = runs[len(runs) // 2]
                print(f"  {name:22s} {seconds:8.2f} s  {rss:6d} MiB  exit {code}  | {last[:150]}", flush=True)


if __name__ == "__main__":
    main()
