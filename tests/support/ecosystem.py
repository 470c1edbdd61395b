"""The model families of the ecosystem tests (tests/integration/test_ecosystem.py), also run by the mixed-batch tests:
each with inputs carrying labels and the VB-LoRA config that adapts its default target modules."""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import torch
from torch import nn
from vblora_rs import VBLoRAConfig, get_peft_model
from vblora_rs.demo.mini_models import build

from support.models import randomize

VOCAB = 64


def ids(batch: int = 3, seq: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def causal_inputs() -> dict[str, torch.Tensor]:
    x = ids()
    return {"input_ids": x, "labels": x}


def classification_inputs() -> dict[str, torch.Tensor]:
    return {"input_ids": ids(), "labels": torch.tensor([0, 2, 1])}


def seq2seq_inputs() -> dict[str, torch.Tensor]:
    return {"input_ids": ids(), "labels": ids(seq=4, seed=2)}


# name -> (builder, inputs with labels, extra config); every case uses the model type's default targets
ECOSYSTEM: dict[str, tuple[Callable[[], nn.Module], Callable[[], dict[str, torch.Tensor]], dict[str, Any]]] = {
    "gpt2": (partial(build, "gpt2"), causal_inputs, {"fan_in_fan_out": True}),
    "opt": (partial(build, "opt"), causal_inputs, {}),
    "llama": (partial(build, "llama"), causal_inputs, {}),
    "bert": (partial(build, "bert-seq-cls"), classification_inputs, {"modules_to_save": ["classifier"]}),
    "roberta": (partial(build, "roberta-seq-cls"), classification_inputs, {"modules_to_save": ["classifier"]}),
    "t5": (partial(build, "t5"), seq2seq_inputs, {}),
    "bart": (partial(build, "bart"), seq2seq_inputs, {}),
}


def config(case: str, **kw: Any) -> VBLoRAConfig:
    return VBLoRAConfig(vector_length=8, num_vectors=32, r=2, **{**ECOSYSTEM[case][2], **kw})


def adapted_model(case: str, **kw: Any) -> nn.Module:
    """The case's model with an adapter of the case's config, its values drawn by :func:`randomize`."""
    model = get_peft_model(ECOSYSTEM[case][0](), config(case, **kw))
    randomize(model)
    return model
