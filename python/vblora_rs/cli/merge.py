"""``vblora merge``: merge VB-LoRA adapters into a safetensors model, streaming, without torch.

The work is :func:`vblora_rs.merge.merge` (planning and checks, then the Rust streaming writer); this module
only parses arguments and reports.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from . import add_output, check_threads

DESCRIPTION = """\
Merge one or more VB-LoRA adapters (PEFT folders or packed files) into a transformers model saved as
safetensors (model.safetensors, or shards with model.safetensors.index.json), writing the merged model
to OUT: the same shard files, index and dtypes (or --dtype), plus the base's config.json,
generation_config.json, tokenizer and other small files, ready for from_pretrained. The result is
PEFT's merge_and_unload of the same adapters to within one rounding of each weight (usually bit for bit).

Streams tensor by tensor without torch: memory stays at a few tens of MB whatever the model size. Every
adapter and every target tensor is checked before anything is written; the output appears whole at the
end (written in a temporary folder next to it) or not at all, and BASE is never modified."""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "merge",
        help="merge VB-LoRA adapters into a safetensors model, streaming (no torch)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("base", metavar="BASE", help="folder of the base model (transformers save_pretrained)")
    parser.add_argument(
        "adapters",
        metavar="ADAPTER",
        nargs="+",
        help="a PEFT VB-LoRA adapter folder (adapter_config.json + adapter_model.safetensors, full or top-K), "
        "or a packed adapter (adapter_packed.safetensors, or a folder holding it)",
    )
    add_output(parser, "folder to write")
    parser.add_argument(
        "--weights",
        nargs="+",
        type=float,
        metavar="W",
        help="scale of each adapter's delta, one per ADAPTER (default 1 each)",
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        help="convert every floating tensor to this dtype before merging (default: keep the base's dtypes)",
    )
    parser.add_argument("--threads", type=int, default=0, metavar="N", help="threads to use (default 0: all cores)")
    parser.add_argument("--force", action="store_true", help="replace OUT if it is an existing folder")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..merge import merge

    check_threads(args.threads)
    start = time.perf_counter()
    plan = merge(
        args.base,
        args.adapters,
        args.out,
        weights=args.weights,
        dtype=args.dtype,
        num_threads=args.threads,
        force=args.force,
        progress=True,
        on_note=lambda note: print(f"vblora merge: {note}", file=sys.stderr),
    )
    print(
        f"merged {len(plan.adapters)} adapter(s) into {plan.merged_tensors} tensors of "
        f"{len(plan.base.shards)} shard(s) in {time.perf_counter() - start:.1f} s: {args.out}"
    )
    return 0
