"""A sequence-classification fine-tune gives the same loss curve with PEFT's own VB-LoRA classes and with
vblora_rs's backend (``benches/bench_seq_cls.py`` prints the table of a longer run)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import vblora_rs


def bench() -> ModuleType:
    path = Path(__file__).resolve().parents[2] / "benches" / "bench_seq_cls.py"
    spec = importlib.util.spec_from_file_location("bench_seq_cls", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_seq_cls_loss_curves_match_peft() -> None:
    applied = vblora_rs.is_applied()
    result = bench().run(steps=12, seed=3)
    assert vblora_rs.is_applied() == applied  # the comparison leaves PEFT's mapping as it found it
    # the head PEFT makes trainable for SEQ_CLS trains on both sides
    assert any("classifier.modules_to_save" in n for n in result.trainable)
    assert any("vblora_vector_bank" in n for n in result.trainable)
    # Training builds A and B with the same torch ops as PEFT (topk, softmax, weighted sum), in the same order,
    # from the same initial weights and dropout masks: the curves are equal, not merely close.
    assert result.ours_losses == result.peft_losses
    assert result.max_param_diff == 0.0
    # and the run does learn (a curve that did not move could match for the wrong reason)
    assert min(result.peft_losses[-4:]) < result.peft_losses[0] - 0.02
