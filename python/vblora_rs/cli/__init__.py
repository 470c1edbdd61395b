"""The ``vblora`` command line (also ``python -m vblora_rs``).

Each command lives in its own module of this package and exposes ``register(subparsers)``, which adds its
sub-parser(s) with ``set_defaults(run=<function taking the parsed args>)``. Command modules import torch
only inside their ``run`` functions, so ``vblora --help`` and the torch-free ``vblora merge`` stay light.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional

from ..errors import VBLoRAError

# Modules of this package, one or more commands each, in the order `vblora --help` lists them.
COMMAND_MODULES = ("merge", "to_lora", "inspect", "pack", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vblora", description="VB-LoRA adapters: merge into models, export to LoRA, inspect, convert, demo."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of the ``vblora`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status = args.run(args)
    except KeyboardInterrupt:
        print(f"vblora {args.command}: interrupted; nothing was written", file=sys.stderr)
        return 130
    except (VBLoRAError, OSError) as exc:
        print(f"vblora {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return int(status or 0)


def console_main() -> None:
    sys.exit(main())
