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
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Optional, Union

from ..config import CONFIG_NAME, WEIGHTS_NAME
from . import add_output

if TYPE_CHECKING:
    import torch

    from ..adapter_files import AdapterFile
    from ..config import VBLoRAConfig
    from ..packed_arrays import PackedArrays

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
    add_output(parser, "folder to write the LoRA adapter into")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    out = export_lora(args.adapter, args.out, force=args.force)
    with open(os.path.join(out, LORA_CONFIG_NAME), encoding="utf-8") as fh:
        config = json.load(fh)
    size = os.path.getsize(os.path.join(out, LORA_WEIGHTS_NAME))
    print(f"wrote {out}: LoRA r={config['r']} over {len(config['target_modules'])} modules, {size:,d} bytes of weights")
    return 0


def lora_config(cfg: VBLoRAConfig, modules: Iterable[str]) -> dict[str, Any]:
    """PEFT ``LoraConfig`` fields of the exported adapter of ``modules`` (as ``LoraConfig.to_dict`` names them)."""
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
        "target_modules": sorted(modules),
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


def _output_bytes(adapter: AdapterFile) -> int:
    """Bytes of the exported tensors: A (r, in) and B (out, r) in float32 per module, plus the extras."""
    r = adapter.config.r
    factors = sum(4 * r * (m.in_features + m.out_features) for m in adapter.modules.values())
    return factors + sum(t.nbytes for t in adapter.extras.values())


def _packed_output_bytes(arrays: PackedArrays) -> int:
    """:func:`_output_bytes` of a packed file, from its modules table."""
    cfg = arrays.config
    features = int((arrays.dims[:, 1] + arrays.dims[:, 2]).sum()) * cfg.vector_length
    return 4 * cfg.r * features + sum(len(data) for *_, data in arrays.extras)


def _check_room(out: str, needed: int) -> None:
    """The export must fit the output's disk and this machine's free memory (it is built in memory, then written):
    a small hostile file can describe factors of any size."""
    from ..errors import VBLoRAError

    free_disk = shutil.disk_usage(os.path.dirname(out)).free
    if needed > free_disk:
        raise VBLoRAError(f"{out}: the LoRA factors take {needed:,d} bytes, {free_disk:,d} are free on that disk")
    try:
        free_memory = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return
    if needed > free_memory:
        raise VBLoRAError(f"{out}: the LoRA factors take {needed:,d} bytes, {free_memory:,d} of memory are free")


def export_lora(adapter_path: Union[str, os.PathLike], output: Union[str, os.PathLike], force: bool = False) -> str:
    """Write the LoRA export of the VB-LoRA adapter at ``adapter_path`` into the folder ``output`` and return its
    path. The folder appears whole or not at all (:mod:`..storage.atomic`); an existing one is replaced only with
    ``force``. Factors that are not finite (an overflow) are an error naming the module, never written."""
    from safetensors.numpy import save_file as save_numpy
    from safetensors.torch import save_file

    from ..adapter_files import read_adapter
    from ..errors import VBLoRAError
    from ..packed_arrays import read_packed_arrays
    from ..storage import atomic, finite
    from ..storage.locate import PACKED, locate
    from .lora_packed import packed_lora_tensors

    out = os.path.abspath(os.fspath(output))
    _check_output(out, force)
    found = locate(adapter_path)
    if found.kind == PACKED:  # every module at once from the flat arrays (a file may list 300k modules)
        arrays = read_packed_arrays(found.weights_path)
        weights_path, config, names = found.weights_path, arrays.config, [m[0] for m in arrays.modules]
        _check_inputs(out, weights_path, _packed_output_bytes(arrays), names)
        tensors: Optional[dict[str, Any]] = packed_lora_tensors(arrays)
        save = save_numpy
    else:
        tensors = None
    if tensors is None:  # a PEFT folder, or extras numpy cannot hold: tensor by tensor
        adapter = read_adapter(adapter_path)
        weights_path, config, names = adapter.weights_path, adapter.config, list(adapter.modules)
        _check_inputs(out, weights_path, _output_bytes(adapter), names)
        tensors = lora_tensors(adapter)
        for key, value in tensors.items():
            if value.dtype.is_floating_point:
                problem = finite.overflow_problem(value.detach().float().numpy())
                if problem:
                    raise VBLoRAError(f"{weights_path}: {key} {problem}")
        save = save_file
    config_fields = lora_config(config, names)

    staging = atomic.temp_folder(out)
    try:
        try:
            save(tensors, os.path.join(staging, LORA_WEIGHTS_NAME), metadata={"format": "pt"})
        except Exception as exc:  # safetensors' SafetensorError (a full disk, ...) is no OSError
            if isinstance(exc, OSError) or type(exc).__name__ == "SafetensorError":
                raise VBLoRAError(f"{out}: writing {LORA_WEIGHTS_NAME} failed: {exc}") from None
            raise
        with open(os.path.join(staging, LORA_CONFIG_NAME), "w", encoding="utf-8") as fh:
            json.dump(config_fields, fh, indent=2, sort_keys=True)
            fh.write("\n")
        atomic.usual_mode(staging, folder=True)  # mkdtemp's 0700 would make the adapter private
        atomic.install(staging, out, replace=force)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


# safetensors readers refuse longer headers
MAX_HEADER_BYTES = 100_000_000
# the least a header entry takes besides its key: `:{"dtype":"F32","shape":[1,1],"data_offsets":[0,0]},`
_ENTRY_MIN = len(':{"dtype":"F32","shape":[1,1],"data_offsets":[0,0]},')


def _check_header(weights_path: str, names: list[str]) -> None:
    """The LoRA file's header must fit safetensors' limit: refused from a lower bound of it, before any factor is
    built (a file listing a million modules would need two million entries)."""
    from ..config import MODEL_PREFIX
    from ..errors import VBLoRAError
    from ..storage.header_size import json_string_bytes

    per_key = len(MODEL_PREFIX) + len(".lora_A.weight") + _ENTRY_MIN
    lower = 2 * (int(json_string_bytes(names).sum()) + per_key * len(names))
    if lower > MAX_HEADER_BYTES:
        raise VBLoRAError(
            f"{weights_path}: lists {len(names):,d} modules: their LoRA file ({2 * len(names):,d} tensors) needs a "
            f"header of at least {lower:,d} bytes, and safetensors readers accept at most {MAX_HEADER_BYTES:,d}"
        )


def _check_inputs(out: str, weights_path: str, needed: int, names: list[str]) -> None:
    """The input is not the output's own folder, the LoRA header fits safetensors, the export fits disk and memory."""
    from ..errors import VBLoRAError

    if os.path.abspath(os.path.dirname(weights_path)) == out:
        raise VBLoRAError(f"{out}: is the input adapter's own folder; choose another output")
    _check_header(weights_path, names)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    _check_room(out, needed)


def _check_output(out: str, force: bool) -> None:
    from ..errors import VBLoRAError

    if os.path.lexists(out):
        if not os.path.isdir(out) or os.path.islink(out):
            raise VBLoRAError(f"{out}: exists and is not a folder; not replacing it")
        if not force:
            raise VBLoRAError(f"{out}: already exists; pass --force to replace it")
