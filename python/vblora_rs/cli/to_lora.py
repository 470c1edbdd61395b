"""``vblora to-lora ADAPTER -o OUT``: export a VB-LoRA adapter as a plain PEFT LoRA adapter, exactly.

VB-LoRA adds ``B @ A`` to each target, with A and B gathered from the bank; a LoRA adapter of the same rank
holding those very A and B with ``lora_alpha = r`` (scaling 1) adds the same delta, so the export is exact
(no SVD, no truncation) and loads anywhere PEFT's LoRA does.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from typing import TYPE_CHECKING, Any, Union

from ..config import CONFIG_NAME, WEIGHTS_NAME

if TYPE_CHECKING:
    import torch

    from ..adapter_files import AdapterFile

LORA_CONFIG_NAME = CONFIG_NAME
LORA_WEIGHTS_NAME = WEIGHTS_NAME  # PEFT names a LoRA adapter's weights file as any other
# VB-LoRA's bias modes, in LoRA's words.
_BIAS = {"none": "none", "all": "all", "vblora_only": "lora_only"}


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "to-lora",
        help="export a VB-LoRA adapter as an exactly equivalent plain LoRA adapter (PEFT format)",
        description="Write a PEFT LoRA adapter folder whose A and B are the VB-LoRA adapter's own (rank r, "
        "lora_alpha = r, float32): the LoRA model's outputs equal the VB-LoRA model's. Modules_to_save and "
        "bias tensors are carried over.",
    )
    parser.add_argument("adapter", help="VB-LoRA adapter folder (adapter_config.json + adapter_model.safetensors)")
    parser.add_argument("-o", "--output", required=True, help="folder to write the LoRA adapter into")
    parser.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    out = export_lora(args.adapter, args.output, force=args.force)
    with open(os.path.join(out, LORA_CONFIG_NAME), encoding="utf-8") as fh:
        config = json.load(fh)
    size = os.path.getsize(os.path.join(out, LORA_WEIGHTS_NAME))
    print(f"wrote {out}: LoRA r={config['r']} over {len(config['target_modules'])} modules, {size:,d} bytes of weights")
    return 0


def lora_config(adapter: AdapterFile) -> dict[str, Any]:
    """PEFT ``LoraConfig`` fields of the exported adapter (as ``LoraConfig.to_dict`` names them)."""
    cfg = adapter.config
    return {
        "peft_type": "LORA",
        "task_type": cfg.task_type,
        "base_model_name_or_path": cfg.base_model_name_or_path,
        "revision": cfg.revision,
        "inference_mode": True,
        "auto_mapping": None,
        "r": cfg.r,
        "lora_alpha": cfg.r,  # scaling = lora_alpha / r = 1: VB-LoRA has no scaling
        "lora_dropout": 0.0,
        # exact module paths: the same modules whatever target_modules, layers_to_transform, exclude_modules chose
        "target_modules": sorted(adapter.modules),
        "fan_in_fan_out": cfg.fan_in_fan_out,
        "bias": _BIAS[cfg.bias],
        "modules_to_save": list(cfg.modules_to_save) if cfg.modules_to_save else None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_rslora": False,
        "use_dora": False,
    }


def lora_tensors(adapter: AdapterFile) -> dict[str, torch.Tensor]:
    """``base_model.model.<module>.lora_A.weight`` (r, in) and ``.lora_B.weight`` (out, r) in float32, plus the
    adapter's other tensors (modules_to_save, biases) under their own keys."""
    from ..adapter_files import MODULE_PREFIX, module_factors

    out: dict[str, torch.Tensor] = {}
    for module, (A, B) in module_factors(adapter, progress=True).items():
        out[f"{MODULE_PREFIX}{module}.lora_A.weight"] = A
        out[f"{MODULE_PREFIX}{module}.lora_B.weight"] = B
    for key, value in adapter.extras.items():
        out[key] = value.contiguous()
    return out


def export_lora(adapter_path: Union[str, os.PathLike], output: Union[str, os.PathLike], force: bool = False) -> str:
    """Write the LoRA export of the VB-LoRA adapter at ``adapter_path`` into the folder ``output`` and return its
    path. The folder appears whole or not at all; an existing one is replaced only with ``force``."""
    from safetensors.torch import save_file

    from ..adapter_files import read_adapter
    from ..errors import VBLoRAError

    out = os.path.abspath(os.fspath(output))
    _check_output(out, force)
    adapter = read_adapter(adapter_path)
    if os.path.abspath(os.path.dirname(adapter.weights_path)) == out:
        raise VBLoRAError(f"{out}: is the input adapter's own folder; choose another output")
    tensors = lora_tensors(adapter)
    config = lora_config(adapter)

    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out)}.", suffix=".tmp")
    try:
        save_file(tensors, os.path.join(staging, LORA_WEIGHTS_NAME), metadata={"format": "pt"})
        with open(os.path.join(staging, LORA_CONFIG_NAME), "w", encoding="utf-8") as fh:
            json.dump(config, fh, indent=2, sort_keys=True)
            fh.write("\n")
        _swap_in(staging, out, force)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _check_output(out: str, force: bool) -> None:
    from ..errors import VBLoRAError

    if os.path.lexists(out):
        if not os.path.isdir(out) or os.path.islink(out):
            raise VBLoRAError(f"{out}: exists and is not a folder; not replacing it")
        if not force:
            raise VBLoRAError(f"{out}: already exists; pass --force to replace it")


def _swap_in(staging: str, out: str, force: bool) -> None:
    """Rename the finished ``staging`` folder to ``out``; an old ``out`` (force) is moved aside first and removed
    only once the new one is in place."""
    _check_output(out, force)  # again: something may have appeared while we computed
    if not os.path.exists(out):
        os.rename(staging, out)
        return
    old = tempfile.mkdtemp(dir=os.path.dirname(out), prefix=f".{os.path.basename(out)}.", suffix=".old")
    os.rmdir(old)
    os.rename(out, old)
    try:
        os.rename(staging, out)
    except OSError:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)
