"""``vblora to-lora ADAPTER -o OUT``: export a VB-LoRA adapter as a plain PEFT LoRA adapter, exactly
(:func:`vblora_rs.convert.lora.export_lora`)."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from ..storage.names import CONFIG_NAME, WEIGHTS_NAME
from . import add_output


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "to-lora",
        help="export a VB-LoRA adapter as an exactly equivalent plain LoRA adapter (PEFT format)",
        description="Write a PEFT LoRA adapter folder whose A and B are the VB-LoRA adapter's own (rank r, "
        "lora_alpha = r, float32): the LoRA model's outputs equal the VB-LoRA model's. Modules_to_save and "
        "bias tensors are carried over.",
    )
    parser.add_argument("adapter", help="VB-LoRA adapter folder (adapter_config.json + adapter_model.safetensors)")
    add_output(parser, "folder to write the LoRA adapter into")
    parser.add_argument("--force", action="store_true", help="replace OUT if it is an existing folder")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..convert.lora import export_lora

    out = export_lora(args.adapter, args.out, force=args.force)
    with open(os.path.join(out, CONFIG_NAME), encoding="utf-8") as fh:
        config = json.load(fh)
    size = os.path.getsize(os.path.join(out, WEIGHTS_NAME))
    print(f"wrote {out}: LoRA r={config['r']} over {len(config['target_modules'])} modules, {size:,d} bytes of weights")
    return 0
