"""The one switch that makes PEFT serve its VBLORA method with vblora_rs's classes, and its undo.

PEFT picks a method's tuner class from ``peft.mapping.PEFT_TYPE_TO_TUNER_MAPPING`` whenever it builds or loads a
model (``get_peft_model``, ``PeftModel.from_pretrained``, ``load_adapter``, ``get_peft_model_state_dict``...).
:func:`apply_to_peft` puts our tuner (a subclass of PEFT's) in the VBLORA entry; nothing else of PEFT is replaced.
Models built while it is applied keep our classes after :func:`remove_from_peft`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners.vblora import VBLoRAModel as PeftVBLoRAModel
from peft.utils import PeftType

from ..errors import VBLoRAError
from .model import VBLoRAModel, compact_adapters_alive


def apply_to_peft() -> None:
    """Make PEFT build and load VB-LoRA adapters with vblora_rs's tuner and layers (idempotent).

    Sets the one entry ``peft.mapping.PEFT_TYPE_TO_TUNER_MAPPING[PeftType.VBLORA]`` to :class:`VBLoRAModel`;
    models built before keep their classes.
    """
    PEFT_TYPE_TO_TUNER_MAPPING[PeftType.VBLORA] = VBLoRAModel


def remove_from_peft() -> None:
    """Give PEFT its own VB-LoRA classes back (idempotent). PEFT looks its state-dict hooks up by method when it
    saves, so afterwards our models save through PEFT's hooks: fine for dense adapters, but a compact one would be
    saved as its bank alone. While one is alive this raises VBLoRAError and changes nothing."""
    if PEFT_TYPE_TO_TUNER_MAPPING.get(PeftType.VBLORA) is VBLoRAModel:
        compact = compact_adapters_alive()
        if compact:
            raise VBLoRAError(
                f"compact adapters {', '.join(compact)} are alive; PEFT's own VB-LoRA classes cannot save them. "
                "Save and delete them (or the models) before remove_from_peft()"
            )
    PEFT_TYPE_TO_TUNER_MAPPING[PeftType.VBLORA] = PeftVBLoRAModel


def is_applied() -> bool:
    """Whether PEFT currently serves VBLORA with vblora_rs's tuner."""
    return PEFT_TYPE_TO_TUNER_MAPPING.get(PeftType.VBLORA) is VBLoRAModel


@contextmanager
def peft_classes() -> Iterator[None]:
    """Inside the block PEFT builds VB-LoRA models with its own classes (references, comparisons); the previous
    state comes back on exit. Save models of ours outside it."""
    previous = PEFT_TYPE_TO_TUNER_MAPPING.get(PeftType.VBLORA)
    PEFT_TYPE_TO_TUNER_MAPPING[PeftType.VBLORA] = PeftVBLoRAModel
    try:
        yield
    finally:
        PEFT_TYPE_TO_TUNER_MAPPING[PeftType.VBLORA] = previous
