"""PEFT's own VB-LoRA classes as the tests' reference: models built with them, a PEFT model and ours holding the
same adapter (:func:`build_pair`), and the one place where PEFT and we name the bank apart."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import peft
import torch
import vblora_rs

from support.models import MODEL_CASES


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


def build_pair(case: str, dtype: torch.dtype = torch.float32, **overrides: object):
    """A PEFT model and ours over copies of one base model, holding identical adapter values."""
    builder, cfg_kwargs, make_inputs = MODEL_CASES[case]
    base = builder().to(dtype)
    kwargs = {"init_vector_bank_bound": 0.5, "init_logits_std": 1.0, **cfg_kwargs, **overrides}
    torch.manual_seed(1234)
    theirs = peft_get_peft_model(copy.deepcopy(base), peft.VBLoRAConfig(**kwargs))
    ours = vblora_rs.get_peft_model(copy.deepcopy(base), vblora_rs.VBLoRAConfig(**kwargs))
    # Our state-dict keys are PEFT's: a strict load proves the layout and copies PEFT's adapter values.
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours, make_inputs()
