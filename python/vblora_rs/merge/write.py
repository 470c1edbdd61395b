"""Writing a planned ``vblora merge``: the factors of one shard's tensors at a time (memory bounded by that shard's
adapted weights) streamed through the Rust writer into a temporary folder next to the output, moved into place in
one step at the end (:mod:`vblora_rs.storage.atomic`); any error or Ctrl-C removes it, so the output is whole or
absent. The base folder is only ever read.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import stat
from typing import Callable, Optional

from .. import _native
from ..errors import VBLoRAError
from ..storage import atomic
from ..storage.json_file import read_object
from .plan import DTYPES, FLOAT_SIZES, INDEX_FILE, Factors, Plan, stack


def check_output(out: str, base_dir: str, adapter_dirs: list[str], force: bool) -> None:
    """Refuse an existing OUT without ``force``, and any OUT whose replacement would delete an input."""
    real_out = os.path.realpath(out)
    for label, folder in [("BASE", base_dir)] + [("ADAPTER", d) for d in adapter_dirs]:
        real = os.path.realpath(folder)
        if real_out == real or real.startswith(real_out + os.sep) or real_out.startswith(real + os.sep):
            raise VBLoRAError(f"{out}: the output must lie outside {label} {folder} and not contain it")
    atomic.check_target(out, force)


def _output_index(plan: Plan) -> dict:
    index = json.loads(json.dumps(plan.base.index))
    meta = index.get("metadata")
    if plan.out_dtype and isinstance(meta, dict) and "total_size" in meta:
        size = FLOAT_SIZES[DTYPES[plan.out_dtype]]
        total = 0
        for shard in plan.base.shards:
            total += shard.data_bytes
            for dtype, shape in shard.tensors.values():
                if dtype in FLOAT_SIZES:
                    total += math.prod(shape) * (size - FLOAT_SIZES[dtype])
        meta["total_size"] = total
    return index


def _write_json(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=False)
        fh.write("\n")


def _copy_extra(plan: Plan, folder: str) -> None:
    for name in plan.extra_files:
        src, dst = os.path.join(plan.base.path, name), os.path.join(folder, name)
        if name == "config.json" and plan.out_dtype:
            config = read_object(src)
            # transformers 5 writes "dtype", older versions "torch_dtype"; from_pretrained(dtype="auto") reads it.
            config["dtype"] = plan.out_dtype
            if "torch_dtype" in config:
                config["torch_dtype"] = plan.out_dtype
            _write_json(dst, config)
        else:
            shutil.copyfile(src, dst)
        os.chmod(dst, stat.S_IMODE(os.stat(src).st_mode))  # a private file stays private


def shard_updates(plan: Plan, shard: str, num_threads: int = 0) -> dict[str, Factors]:
    """``{tensor: (u, v)}`` of one shard: the factors of the modules merged into it, built now (memory: this
    shard's adapted weights, not the whole model's)."""
    tensors = plan.updates.get(shard, {})
    wanted: dict[int, list[str]] = {}
    for parts in tensors.values():
        for part in parts:
            wanted.setdefault(id(part.adapter), []).append(part.module)
    built: dict[tuple[int, str], Factors] = {}
    for adapter in plan.adapters:
        modules = wanted.get(id(adapter))
        if modules:
            for module, factors in adapter.factors(modules, num_threads).items():
                built[(id(adapter), module)] = factors
    return {
        tensor: stack(tensor, [(p, built[(id(p.adapter), p.module)]) for p in parts])
        for tensor, parts in tensors.items()
    }


def write_merged(
    plan: Plan,
    out: str,
    num_threads: int = 0,
    progress: Optional[Callable[[int], object]] = None,
    force: bool = False,
) -> None:
    """Stream every shard of the base with the plan's updates into a temporary folder next to ``out``,
    add the index and the other files, then move it to ``out`` in one step (replacing it only with ``force``;
    without it, an ``out`` that another run created meanwhile makes this one fail). On any error, nothing is
    left behind and an existing ``out`` is kept."""
    check_output(out, plan.base.path, [os.path.dirname(a.path) for a in plan.adapters], force)
    out = os.path.abspath(out)
    with atomic.no_interrupt():  # a Ctrl-C between creating the folder and the try below would leave it behind
        tmp = atomic.temp_folder(out)
    try:
        for shard in plan.base.shards:
            try:
                _native.merge_safetensors(
                    shard.path,
                    os.path.join(tmp, shard.name),
                    shard_updates(plan, shard.name, num_threads),
                    plan.out_dtype,
                    num_threads,
                    progress,
                )
            except VBLoRAError as exc:
                if "overflows" not in str(exc):
                    raise
                # the base weight is finite: what overflowed is the adapters' update, so name them too
                adapters = ", ".join(a.path for a in plan.adapters)
                raise VBLoRAError(f"{exc} (the update of adapter {adapters})") from exc
        if plan.base.index is not None:
            _write_json(os.path.join(tmp, INDEX_FILE), _output_index(plan))
        _copy_extra(plan, tmp)
        atomic.usual_mode(tmp, folder=True)  # mkdtemp's 0700 would make the model private
        atomic.install(tmp, out, replace=force)  # Ctrl-C waits for it: "interrupted" means nothing was written
    except BaseException:
        with atomic.no_interrupt():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
