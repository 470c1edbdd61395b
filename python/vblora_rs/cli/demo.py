"""``vblora demo``: the built-in example (see :mod:`vblora_rs.demo`)."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="fine-tune a small built-in GPT-2 with VB-LoRA, save, reload and merge it (no download)",
        description="Fine-tune a small GPT-2 built from a config on built-in text with VB-LoRA, then save the "
        "compact adapter, reload it, merge it with `vblora merge` and check the merged logits.",
    )
    parser.add_argument("--steps", type=int, default=150, help="VB-LoRA training steps (default 150)")
    parser.add_argument("--out", default=None, help="folder for the outputs (default: a temporary folder)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..demo import run as run_demo

    run_demo(args.steps, args.out, args.seed)
    return 0
