"""The packed adapter format at the Llama-2-7B shape: file sizes, and the time to write a full-logits adapter.

    python benches/bench_packed.py              # 5 repeats
    python benches/bench_packed.py --repeats 3 --markdown table.md

Adapter: VB-LoRA on every linear of Llama-2-7B (32 layers x q,k,v,o 4096x4096, gate/up 11008x4096, down
4096x11008), r=4, 2048 x 256 float32 bank, topk=2: 39,040 sub-vectors, i.e. 39,040 x 2,048 float32 logits.

Two PeftModels hold the same random logits and bank (shared storage): one built by ``peft.get_peft_model`` with
PEFT's own classes (``vblora_rs.remove_from_peft()``), one by the same call with vblora_rs's backend
(``vblora_rs.apply_to_peft()``). Both are built on a ``torch.device("meta")`` Llama, so no 7B base weights exist.

Sizes: PEFT's save_only_topk_weights file (written by PEFT's own classes) against the packed file, lossless and
with a float16 bank and weights. Times (medians): PEFT's ``save_pretrained`` with save_only_topk_weights=True, the
same ``save_pretrained`` served by vblora_rs (top-K encoding in Rust), and the packed file as ``save_packed`` writes
it (PEFT's top-K tensors from ``get_peft_model_state_dict`` with the backend, bit-packed and written in Rust).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from typing import Callable, Optional

import torch
from torch import nn

warnings.filterwarnings("ignore")

import peft  # noqa: E402
import vblora_rs  # noqa: E402
from peft import get_peft_model_state_dict  # noqa: E402
from peft.tuners.vblora import VBLoRAModel as PeftVBLoRAModel  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from vblora_rs.convert.packed import PackReport, read_packed, write_packed  # noqa: E402
from vblora_rs.demo import mini_models  # noqa: E402
from vblora_rs.storage.adapter_config import AdapterConfig as FileConfig  # noqa: E402

R, NUM_VECTORS, VECTOR_LENGTH, TOPK = 4, 2048, 256, 2
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LOGITS = ("vblora_logits_A", "vblora_logits_B")


def meta_llama7b() -> nn.Module:
    with torch.device("meta"):
        return mini_models.build("llama-7b")


def vblora_config() -> peft.VBLoRAConfig:
    return peft.VBLoRAConfig(
        r=R,
        num_vectors=NUM_VECTORS,
        vector_length=VECTOR_LENGTH,
        topk=TOPK,
        target_modules=TARGETS,
        save_only_topk_weights=True,
    )


def give_weights(model: nn.Module, seed: int) -> int:
    """Random logits and bank for ``model``'s adapter (the same values for the same seed); returns the number of
    sub-vectors."""
    gen = torch.Generator().manual_seed(seed)
    rows = 0
    for _, module in sorted(model.named_modules()):
        for grid in LOGITS:
            params = getattr(module, grid, None)
            if isinstance(params, nn.ParameterDict) and "default" in params:
                shape = params["default"].shape
                params["default"] = nn.Parameter(torch.randn(shape, generator=gen))
                rows += shape.numel() // NUM_VECTORS
    bank = torch.rand(NUM_VECTORS, VECTOR_LENGTH, generator=gen) * 0.04 - 0.02
    model.base_model.vblora_vector_bank["default"] = nn.Parameter(bank)
    return rows


def build_pair(seed: int) -> tuple[nn.Module, nn.Module, int]:
    """(PEFT's own model, the vblora_rs-served model, sub-vectors), holding equal adapter values."""
    vblora_rs.remove_from_peft()
    theirs = peft.get_peft_model(meta_llama7b(), vblora_config())
    vblora_rs.apply_to_peft()
    ours = peft.get_peft_model(meta_llama7b(), vblora_config())
    if type(theirs.base_model) is not PeftVBLoRAModel or not isinstance(ours.base_model, vblora_rs.VBLoRAModel):
        raise SystemExit("the PEFT and vblora_rs sides do not use the classes they should")
    rows = give_weights(theirs, seed)
    if give_weights(ours, seed) != rows:
        raise SystemExit("the two models hold different adapters")
    return theirs, ours, rows


def median_s(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each run over ``repeats`` interleaved rounds, after one warm-up call each (page cache,
    thread pools): load from other processes hits every side alike."""
    for fn in runs.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def breakdown(name: str, rep: PackReport, bits: int) -> str:
    return (
        f"  {name}: bank {rep.bank_bytes:,}, indices {rep.indices_bytes:,} ({bits} bits), weights "
        f"{rep.weights_bytes:,}, header+extras {rep.header_and_extras_bytes:,}"
    )


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per side (default 5)")
    parser.add_argument("--markdown", default=None, help="also write the output to this file")
    args = parser.parse_args(argv)

    theirs, ours, rows = build_pair(seed=0)
    file_config = FileConfig.from_dict(ours.peft_config["default"].to_dict(), source="the adapter's config")
    lines = [
        f"Llama-2-7B shape: {rows:,} sub-vectors x {NUM_VECTORS:,} logits (float32), torch threads "
        f"{torch.get_num_threads()}; medians of {args.repeats} repeats (after one warm-up), interleaved rounds.",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        peft_dir, served_dir, packed_dir = (os.path.join(tmp, n) for n in ("peft", "served", "packed"))

        # PEFT's save functions dispatch on the tuner class in PEFT's mapping, not on the model's own classes: each
        # side saves with the mapping its model was built under (switching is one dict assignment)
        def peft_save() -> None:
            vblora_rs.remove_from_peft()
            theirs.save_pretrained(peft_dir)

        def served_save() -> None:
            vblora_rs.apply_to_peft()
            ours.save_pretrained(served_dir)

        def packed_save(half: Optional[torch.dtype] = None) -> PackReport:
            # save_packed's own steps (vblora_rs.save_packed itself does not import with peft 0.21: it takes
            # MODEL_TYPE_TO_PEFT_MODEL_MAPPING from peft.mapping, which moved to peft.auto)
            vblora_rs.apply_to_peft()
            tensors = get_peft_model_state_dict(ours)  # PEFT's top-K tensors (save_only_topk_weights)
            os.makedirs(packed_dir, exist_ok=True)
            name = "adapter_packed.safetensors" if half is None else "half.safetensors"
            return write_packed(os.path.join(packed_dir, name), tensors, file_config, half)

        runs: dict[str, Callable[[], object]] = {"peft": peft_save, "served": served_save, "packed": packed_save}
        times = median_s(runs, args.repeats)

        peft_file = os.path.join(peft_dir, "adapter_model.safetensors")
        peft_bytes = os.path.getsize(peft_file)
        theirs_tensors = load_file(peft_file)
        served = load_file(os.path.join(served_dir, "adapter_model.safetensors"))
        packed_file = os.path.join(packed_dir, "adapter_packed.safetensors")
        stored, packed = read_packed(packed_file)

        def same(other: dict[str, torch.Tensor]) -> str:
            ok = sorted(theirs_tensors) == sorted(other) and all(
                theirs_tensors[k].dtype == other[k].dtype and torch.equal(theirs_tensors[k], other[k])
                for k in theirs_tensors
            )
            return "yes" if ok else "NO"

        lossless = write_packed(os.path.join(tmp, "again.safetensors"), packed, stored)  # its byte breakdown
        if lossless.total_bytes != os.path.getsize(packed_file):
            raise SystemExit("the breakdown does not describe the file save_packed wrote")
        start = time.perf_counter()
        half = packed_save(torch.float16)
        half_s = time.perf_counter() - start

    bits = max(1, (NUM_VECTORS - 1).bit_length())
    lines += [
        "",
        "| file | bytes | vs PEFT top-K |",
        "|---|---:|---:|",
        f"| PEFT save_only_topk_weights | {peft_bytes:,} | 1.000 |",
        f"| packed, lossless | {lossless.total_bytes:,} | {lossless.total_bytes / peft_bytes:.3f} |",
        f"| packed, float16 | {half.total_bytes:,} | {half.total_bytes / peft_bytes:.3f} |",
        "",
        f"  PEFT's file written with vblora_rs's backend holds exactly PEFT's tensors (keys, dtypes, values): "
        f"{same(served)}",
        f"  packed lossless holds exactly PEFT's tensors (keys, dtypes, values): {same(packed)}",
        breakdown("lossless", lossless, bits),
        breakdown("float16", half, bits),
        f"  float16: max |delta W error| over {len(half.layer_errors)} layers {half.max_error:.3e} "
        f"(float16 write incl. the error report: {half_s:.2f} s, one run)",
        "",
        f"| full-logits adapter -> top-K file (median of {args.repeats}) | seconds | PEFT / this |",
        "|---|---:|---:|",
    ]
    labels = {
        "peft": "PEFT save_pretrained (save_only_topk_weights), PEFT's own classes",
        "served": "PEFT save_pretrained, served by vblora_rs",
        "packed": "get_peft_model_state_dict (served) + write_packed",
    }
    for name, label in labels.items():
        lines.append(f"| {label} | {times[name]:.3f} | {times['peft'] / times[name]:.2f}x |")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    lines += ["", f"Machine load average at the end (1, 5, 15 min): {load} on {os.cpu_count()} CPUs."]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
