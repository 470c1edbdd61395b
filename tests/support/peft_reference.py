"""PEFT's own VB-LoRA classes as the tests' reference, and the one place where PEFT and we name the bank apart."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import peft


def bank_named_once(name: str) -> str:
    """PEFT's layers register the tuner's bank too, so its named_parameters() names the bank after the first layer
    (``base_model.model.lin0.vblora_vector_bank.<adapter>``); ours name it after its one owner, the tuner."""
    head, sep, adapter = name.rpartition("vblora_vector_bank.")
    return f"base_model.vblora_vector_bank.{adapter}" if sep and "." not in adapter else name


# --- PEFT's own classes as the reference ---------------------------------------------------------------------
# vblora_rs.get_peft_model (and the other public names) make PEFT serve VB-LoRA with our classes for the rest of
# the process. A reference model must be built with PEFT's own classes: these build it with our backend taken out
# for the call. Models keep the classes they were built with; PEFT's state-dict hooks, which PEFT looks up by method
# at call time, handle a model of PEFT's classes as PEFT does (see vblora_rs.tuner.model).


@contextlib.contextmanager
def peft_only() -> Iterator[None]:
    from vblora_rs.tuner.peft_backend import peft_classes

    with peft_classes():
        yield


def peft_get_peft_model(*args: Any, **kwargs: Any) -> Any:
    """``peft.get_peft_model`` with PEFT's own VB-LoRA classes."""
    with peft_only():
        return peft.get_peft_model(*args, **kwargs)


def peft_from_pretrained(*args: Any, **kwargs: Any) -> Any:
    """``peft.PeftModel.from_pretrained`` with PEFT's own VB-LoRA classes."""
    with peft_only():
        return peft.PeftModel.from_pretrained(*args, **kwargs)
