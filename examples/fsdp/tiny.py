"""The tiny Llama and VB-LoRA adapter the FSDP examples train (built from a config: nothing is downloaded)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

LLAMA = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 64,
    "max_position_embeddings": 64,
}
ADAPTER = {"target_modules": ["q_proj", "v_proj"], "r": 4, "num_vectors": 32, "vector_length": 16, "topk": 2}
BATCH = 4  # sequences per step, over all processes
SEQ = 8
STEPS = 3
LR = 1e-2


def base_model() -> nn.Module:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**LLAMA))


def peft_model() -> nn.Module:
    from vblora_rs import VBLoRAConfig, get_peft_model

    return get_peft_model(base_model(), VBLoRAConfig(**ADAPTER))


def batch(step: int) -> torch.Tensor:
    """The full batch of ``step``; each process trains on its share."""
    return torch.randint(0, LLAMA["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(10 + step))
