"""``vblora pack`` / ``vblora unpack``: PEFT VB-LoRA adapter folders to and from the packed single-file format."""

from __future__ import annotations

import argparse
import os
import shutil
from typing import Any

from ..errors import VBLoRAError
from . import add_output

PACK_EPILOG = """\
The packed file holds exactly what PEFT's save_only_topk_weights checkpoint holds (top-K indices bit-packed at
ceil(log2(num_vectors)) bits, the first k-1 weights, the bank, any modules_to_save/bias tensors), so
`vblora unpack` gives that checkpoint back bit for bit. A full-logits adapter is first reduced to its top-K, as
PEFT's save_only_topk_weights=True save does (the adapter then serves inference and merging, not training).
--half stores the bank and weights in 16 bits (lossy) and reports each layer's max |delta weight| error."""


def register(subparsers: Any) -> None:
    pack = subparsers.add_parser(
        "pack",
        help="pack a PEFT VB-LoRA adapter folder into one small file (adapter_packed.safetensors)",
        description="Pack a PEFT VB-LoRA adapter folder (adapter_config.json + adapter_model.safetensors,\n"
        "full logits or top-K) into OUT/adapter_packed.safetensors + OUT/adapter_config.json.",
        epilog=PACK_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pack.add_argument("adapter", metavar="ADAPTER", help="PEFT VB-LoRA adapter folder")
    add_output(pack, "output folder (created)")
    pack.add_argument(
        "--half",
        choices=("float16", "bfloat16"),
        default=None,
        help="store the bank and weights in this 16-bit dtype (lossy; prints the per-layer error)",
    )
    pack.add_argument("--force", action="store_true", help="write into OUT even if it exists")
    pack.set_defaults(run=run_pack)

    unpack = subparsers.add_parser(
        "unpack",
        help="turn a packed adapter back into a PEFT top-K adapter folder",
        description="Unpack a packed adapter (a folder holding adapter_packed.safetensors, or the file itself) "
        "into OUT/adapter_model.safetensors + OUT/adapter_config.json (save_only_topk_weights=true), which "
        "peft.PeftModel.from_pretrained and vblora_rs.PeftModel.from_pretrained load.",
    )
    unpack.add_argument("adapter", metavar="ADAPTER", help="packed adapter folder or .safetensors file")
    add_output(unpack, "output folder (created)")
    unpack.add_argument("--force", action="store_true", help="write into OUT even if it exists")
    unpack.set_defaults(run=run_unpack)


def _output_folder(out: str, force: bool) -> None:
    """Create ``out``; an existing one only with ``force`` (and only if it is a folder)."""
    if os.path.exists(out):
        if not force:
            raise VBLoRAError(f"{out}: already exists; pass --force to write into it")
        if not os.path.isdir(out):
            raise VBLoRAError(f"{out}: exists and is not a folder")
    os.makedirs(out, exist_ok=True)


def _size(path: str) -> str:
    return f"{os.path.getsize(path):,} bytes"


def run_pack(args: argparse.Namespace) -> int:
    import torch
    from safetensors.torch import save as safetensors_bytes

    from ..convert.packed import topk_tensors_from_full, write_packed
    from ..convert.safetensors_file import read_safetensors
    from ..storage.adapter_config import AdapterConfig
    from ..storage.locate import PEFT, locate
    from ..storage.names import PACKED_WEIGHTS_NAME

    found = locate(args.adapter)  # THE locator: the same messages as the other commands
    if found.kind != PEFT:
        raise VBLoRAError(f"{found.weights_path}: already a packed adapter (`vblora unpack` makes a PEFT folder of it)")
    config = AdapterConfig.from_pretrained(found.folder)
    weights_file = found.weights_path
    tensors = read_safetensors(weights_file)
    full = any(k.endswith((".vblora_logits_A", ".vblora_logits_B")) for k in tensors)
    print(f"read   {weights_file}: {_size(weights_file)} ({'full logits' if full else 'top-K'})")
    if full:
        try:
            tensors = topk_tensors_from_full(tensors, config)
        except VBLoRAError as exc:
            raise VBLoRAError(f"{weights_file}: {exc}") from None
        topk_size = len(safetensors_bytes(tensors, metadata={"format": "pt"}))
        print(f"       as PEFT's save_only_topk_weights file it would be {topk_size:,} bytes")

    _output_folder(args.out, args.force)
    target = os.path.join(args.out, PACKED_WEIGHTS_NAME)
    half = {"float16": torch.float16, "bfloat16": torch.bfloat16, None: None}[args.half]
    report = write_packed(target, tensors, config, half=half, source=weights_file, progress=True)
    config.save_only_topk_weights = True  # what the packed file holds, whatever the source kept
    config.save_pretrained(args.out)

    ratio = report.total_bytes / os.path.getsize(weights_file)
    print(f"wrote  {target}: {report.total_bytes:,} bytes ({ratio:.3f} of the input)")
    dtype = args.half or str(tensors["base_model.vblora_vector_bank"].dtype).removeprefix("torch.")
    print(
        f"       bank {report.bank_bytes:,} ({dtype}), indices {report.indices_bytes:,}, "
        f"weights {report.weights_bytes:,}, header+extras {report.header_and_extras_bytes:,}"
    )
    if report.layer_errors:
        worst = sorted(report.layer_errors.items(), key=lambda kv: kv[1], reverse=True)
        print(f"{args.half} error, max |B@A - B'@A'| per layer ({len(worst)} layers, worst first):")
        for name, err in worst[:10]:
            print(f"  {err:.3e}  {name}")
        if len(worst) > 10:
            print(f"  ... {len(worst) - 10} more, the smallest {worst[-1][1]:.3e}")
    return 0


def run_unpack(args: argparse.Namespace) -> int:
    from ..storage.names import PACKED_WEIGHTS_NAME, WEIGHTS_NAME
    from ..storage.packed_arrays import unpack

    src = os.fspath(args.adapter)
    file = os.path.join(src, PACKED_WEIGHTS_NAME) if os.path.isdir(src) else src
    if not os.path.isfile(file):
        raise VBLoRAError(f"{src}: no {PACKED_WEIGHTS_NAME} found" if file != src else f"{src}: file not found")
    created = not os.path.lexists(args.out)
    _output_folder(args.out, args.force)
    target = os.path.join(args.out, WEIGHTS_NAME)
    try:  # decoded, checked and written in Rust from the flat arrays (no tensor object per module)
        config, modules = unpack(file, target)
    except BaseException:
        if created:  # a bad file leaves no output folder behind
            shutil.rmtree(args.out, ignore_errors=True)
        raise
    print(f"read   {file}: {_size(file)}")
    config.save_only_topk_weights = True
    config.save_pretrained(args.out)
    print(f"wrote  {target}: {_size(target)} (PEFT save_only_topk_weights checkpoint, {modules:,d} modules)")
    return 0
