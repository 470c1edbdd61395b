"""Mutation fuzzing of adapter files through every entry point that reads them: ``PeftModel.from_pretrained``,
``vblora merge`` (plan and write), ``vblora inspect`` and ``vblora to-lora``.

Each mutant is a valid adapter (PEFT full logits, PEFT top-K, or packed) with a few random edits: bytes of the
weights file flipped or overwritten, the file cut short, numbers of its safetensors header changed, or a field of
adapter_config.json (or of the packed file's config) replaced by a value of another type or size. Every entry
point must end in one of two outcomes: success, or a ``VBLoRAError`` naming the input (its folder or file).
Anything else (another exception, a message that names no input or names a temporary file) is counted as a
failure, with an example kept for the report.

Run as a script (``python tests/support/fuzz_adapters.py N SEED``) it prints the counts as JSON;
tests/storage/test_fuzz.py runs it in a child process under an address-space limit, so a mutant that makes something
allocate without bound fails the run instead of the machine.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
import tempfile
import traceback
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable

TESTS = Path(__file__).resolve().parents[1]  # so that a script run imports ``support.models`` as the tests do
sys.path.insert(0, str(TESTS))

# Values a config field is replaced with: other types, sizes at and past the bounds, deep nesting.
ODD_VALUES: list[Any] = [
    0,
    -1,
    1,
    2**31 - 10**9,
    2**63,
    1e308,
    float("nan"),
    "8",
    "false",
    True,
    None,
    [],
    [1, "x"],
    {"a": 1},
    "(.+)+X",
    "(",
    "a" * 10_000,
]
CONFIG_FIELDS = [
    "r",
    "num_vectors",
    "vector_length",
    "topk",
    "target_modules",
    "fan_in_fan_out",
    "init_vector_bank_bound",
    "init_logits_std",
    "layers_to_transform",
    "layers_pattern",
    "modules_to_save",
    "bias",
    "peft_type",
    "save_only_topk_weights",
    "vblora_dropout",
    "exclude_modules",
]


def make_seeds(root: Path) -> dict[str, Path]:
    """Valid adapters of the three kinds over the tests' MLP, and a safetensors base to merge into."""
    import torch
    import vblora_rs
    from safetensors.torch import save_file

    from support.models import make_mlp

    seeds = {}
    for kind, topk in (("full", False), ("topk", True)):
        model = vblora_rs.get_peft_model(
            make_mlp(),
            vblora_rs.VBLoRAConfig(
                target_modules=["lin0", "lin1", "lin2"],
                vector_length=8,
                num_vectors=32,
                r=4,
                save_only_topk_weights=topk,
                init_logits_std=1.0,
                init_vector_bank_bound=0.5,
            ),
        )
        model.save_pretrained(root / kind)
        seeds[kind] = root / kind
        if topk:
            model.save_pretrained(root / "packed", format="packed")
            seeds["packed"] = root / "packed"
    base = root / "base"
    base.mkdir()
    state = {k: v.contiguous() for k, v in make_mlp().state_dict().items()}
    save_file(state, str(base / "model.safetensors"), metadata={"format": "pt"})
    assert all(t.dtype == torch.float32 for t in state.values())
    return {**seeds, "base": base}


# --- mutations ------------------------------------------------------------------------------------------


def _weights_file(folder: Path) -> Path:
    names = ("adapter_model.safetensors", "adapter_packed.safetensors")
    return next(folder / n for n in names if (folder / n).exists())


def _flip_bytes(data: bytearray, rng: random.Random) -> None:
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(len(data))
        data[i] = rng.randrange(256) if rng.random() < 0.5 else data[i] ^ (1 << rng.randrange(8))


def _header_numbers(data: bytearray, rng: random.Random) -> bytearray:
    """Change one number in the safetensors header (a shape, an offset, a metadata count) and keep the file
    consistent in length."""
    n = int.from_bytes(data[:8], "little")
    header = data[8 : 8 + n].decode("utf-8", "replace")
    numbers = list(re.finditer(r"\d+", header))
    if not numbers:
        return data
    m = rng.choice(numbers)
    value = rng.choice([0, 1, 2, int(m.group()) + 1, int(m.group()) * 2, 2**31, 2**40, 65536, 300_000])
    new = header[: m.start()] + str(value) + header[m.end() :]
    raw = new.encode()
    raw += b" " * (-len(raw) % 8)
    return bytearray(len(raw).to_bytes(8, "little") + raw + data[8 + n :])


def _packed_config(data: bytearray, rng: random.Random) -> bytearray:
    """Replace one field of the packed file's config (JSON inside the header's metadata)."""
    n = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8 : 8 + n])
        config = json.loads(header["__metadata__"]["config"])
    except (ValueError, KeyError, TypeError):
        return data
    config[rng.choice(CONFIG_FIELDS)] = rng.choice(ODD_VALUES)
    header["__metadata__"]["config"] = json.dumps(config)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return bytearray(len(raw).to_bytes(8, "little") + raw + data[8 + n :])


def mutate(seed: Path, out: Path, rng: random.Random) -> str:
    """Write a mutant of the adapter folder ``seed`` into ``out``; returns what was done."""
    shutil.copytree(seed, out)
    weights = _weights_file(out)
    data = bytearray(weights.read_bytes())
    what = rng.choice(["flip", "cut", "header", "config"])
    if what == "flip":
        _flip_bytes(data, rng)
    elif what == "cut":
        data = data[: rng.randrange(len(data))]
    elif what == "header":
        data = _header_numbers(data, rng)
    elif weights.name == "adapter_packed.safetensors":
        data = _packed_config(data, rng)
    else:
        path = out / "adapter_config.json"
        config = json.loads(path.read_text())
        config[rng.choice(CONFIG_FIELDS)] = rng.choice(ODD_VALUES)
        text = json.dumps(config)
        if rng.random() < 0.05:  # nesting too deep for Python's JSON parser
            text = text[:-1] + ', "nested": ' + "[" * 5000 + "]" * 5000 + "}"
        path.write_text(text)
    weights.write_bytes(bytes(data))
    return what


# --- entry points ---------------------------------------------------------------------------------------


def _from_pretrained(adapter: Path, base: Path, work: Path) -> None:
    # what a user calls: PEFT's from_pretrained for PEFT's folders, ours for packed ones
    import vblora_rs

    from support.models import make_mlp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if (adapter / "adapter_packed.safetensors").exists():
            vblora_rs.load_packed(make_mlp(), adapter)
        else:
            vblora_rs.PeftModel.from_pretrained(make_mlp(), adapter)


def _merge(adapter: Path, base: Path, work: Path) -> None:
    from vblora_rs import merge as merge_plan

    merge_plan.write_merged(merge_plan.plan_merge(str(base), [str(adapter)], num_threads=1), str(work / "merged"))


def _inspect(adapter: Path, base: Path, work: Path) -> None:
    from vblora_rs.cli.adapter_summary import read_summary
    from vblora_rs.cli.inspect import build_report, render_text

    render_text(build_report(read_summary(adapter)))  # as the command does (packed files: the flat arrays)


def _to_lora(adapter: Path, base: Path, work: Path) -> None:
    from vblora_rs.convert.lora import export_lora

    export_lora(adapter, work / "lora")


ENTRY_POINTS: dict[str, Callable[[Path, Path, Path], None]] = {
    "from_pretrained": _from_pretrained,
    "merge": _merge,
    "inspect": _inspect,
    "to_lora": _to_lora,
}


def classify(exc: BaseException | None, adapter: Path, model_side: bool = False) -> str:
    """``model_side``: PEFT reads the folder (adapter_config.json, the safetensors container) and hands our load
    hook its tensors, so our errors name the adapter's tensor or config field rather than the file; an error
    raised inside PEFT's or safetensors' own code is theirs (``peft_reader_error``), as without vblora_rs."""
    import vblora_rs
    from vblora_rs import VBLoRAError

    if exc is None:
        return "success"
    message = str(exc)
    if isinstance(exc, VBLoRAError):
        if str(adapter) in message and ".tmp-" not in message and "/tmp/tmp" not in message.replace(str(adapter), ""):
            return "named_error"
        if model_side and re.search(r"(tensors? base_model\.|config of adapter )", message):
            return "named_error"
        return "unnamed_error"
    if model_side:
        # raised by PEFT's (or safetensors', json's) own code, as it would be without vblora_rs
        package = os.path.dirname(vblora_rs.__file__)
        frames = traceback.extract_tb(exc.__traceback__)
        if frames and not frames[-1].filename.startswith(package):
            return "peft_reader_error"
    return "other"


def run(count: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    counts: dict[str, Counter[str]] = {name: Counter() for name in ENTRY_POINTS}
    examples: list[str] = []
    with tempfile.TemporaryDirectory(prefix="vblora-fuzz-") as tmp:
        root = Path(tmp)
        seeds = make_seeds(root / "seeds")
        kinds = ["full", "topk", "packed"]
        for i in range(count):
            kind = kinds[i % len(kinds)]
            mutant = root / f"m{i}"
            what = mutate(seeds[kind], mutant, rng)
            for name, entry in ENTRY_POINTS.items():
                work = root / f"w{i}-{name}"
                work.mkdir()
                try:
                    entry(mutant, seeds["base"], work)
                    exc: BaseException | None = None
                except Exception as caught:  # noqa: BLE001 (classifying every outcome is the point)
                    exc = caught
                outcome = classify(exc, mutant, model_side=name == "from_pretrained")
                counts[name][outcome] += 1
                shown = sum(e.startswith(f"{name} ") for e in examples)
                if outcome not in ("success", "named_error", "peft_reader_error") and shown < 5:
                    detail = "".join(traceback.format_exception_only(type(exc), exc)).strip() if exc else ""
                    examples.append(f"{name} on {kind} mutant {i} ({what}): {outcome}: {detail[:300]}")
                shutil.rmtree(work, ignore_errors=True)
            shutil.rmtree(mutant, ignore_errors=True)
    return {"counts": {k: dict(v) for k, v in counts.items()}, "examples": examples}


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    s = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    print(json.dumps(run(n, s)))
