"""``vblora merge`` as a library: VB-LoRA adapters merged into a safetensors model, streaming, without torch.

:mod:`.plan` reads the base's headers and the adapters and checks everything; :mod:`.write` streams the shards
through the Rust writer into a folder that appears whole or not at all. :func:`merge` does both, as the command
line does.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Callable, Optional, Union

from .._progress import bar
from .plan import Plan, plan_merge
from .write import check_output, write_merged

__all__ = ["Plan", "check_output", "merge", "plan_merge", "write_merged"]

PathLike = Union[str, os.PathLike]


def merge(
    base: PathLike,
    adapters: Sequence[PathLike],
    out: PathLike,
    *,
    weights: Optional[Sequence[float]] = None,
    dtype: Optional[str] = None,
    num_threads: int = 0,
    force: bool = False,
    progress: bool = False,
    on_note: Optional[Callable[[str], object]] = None,
) -> Plan:
    """Merge ``adapters`` into the model folder ``base`` and write the merged model to the folder ``out``.

    Args:
        base: a transformers model folder saved as safetensors (one file or shards with an index).
        adapters: PEFT VB-LoRA adapter folders (full or top-K) or packed adapter files.
        out: the folder to write; it appears whole at the end or not at all, ``base`` is only read.
        weights: the scale of each adapter's delta (default 1 each).
        dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"`` to convert every floating tensor first (default:
            keep the base's dtypes).
        num_threads: threads for the factors and the merge (0: all cores).
        force: replace an existing ``out``.
        progress: show a progress bar on stderr.
        on_note: called with each note of the plan (e.g. a dtype conversion) before anything is written.

    Returns:
        The :class:`~.plan.Plan` that was written (adapters, shards, merged tensors).

    Raises:
        VBLoRAError: naming the file, tensor or module at fault; nothing is written then.
    """
    base, out = os.fspath(base), os.fspath(out)
    adapter_paths = [os.fspath(a) for a in adapters]
    check_output(out, base, adapter_paths, force)
    plan = plan_merge(base, adapter_paths, list(weights) if weights is not None else None, dtype, num_threads)
    for note in plan.notes:
        if on_note is not None:
            on_note(note)
    with bar(plan.total_bytes, "merging", unit="B", enabled=progress) as shown:
        write_merged(plan, out, num_threads, shown.update, force=force)
    return plan
