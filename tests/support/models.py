"""The tests' small models: an MLP, and the model cases most tests run on (model, adapter config, inputs); the
transformers models are the setups of :mod:`vblora_rs.demo.mini_models`."""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from torch import nn
from vblora_rs.demo.mini_models import build


class MLP(nn.Module):
    """Linear layers of sizes the bank's vector_length (8) divides, plus a head for modules_to_save."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.lin0 = nn.Linear(16, 32, bias=bias)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(32, 24, bias=False)
        self.lin2 = nn.Linear(24, 16, bias=bias)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lin2(self.relu(self.lin1(self.relu(self.lin0(x))))))


def make_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MLP().eval()


def randomize(model: nn.Module, seed: int = 0) -> None:
    """Adapter values large enough that every adapted layer changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "vblora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen))


# name -> (builder, config kwargs, input maker)
MODEL_CASES: dict[str, tuple[Callable[[], nn.Module], dict, Callable[[], dict]]] = {
    "mlp": (
        make_mlp,
        {"target_modules": ["lin0", "lin1", "lin2"], "vector_length": 8, "num_vectors": 32, "r": 4},
        lambda: {"x": torch.randn(5, 16, generator=torch.Generator().manual_seed(1))},
    ),
    "gpt2": (
        partial(build, "gpt2"),
        {
            "target_modules": ["c_attn", "c_proj"],
            "vector_length": 16,
            "num_vectors": 40,
            "r": 2,
            "fan_in_fan_out": True,
        },
        lambda: {"input_ids": torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))},
    ),
    "llama": (
        partial(build, "llama"),
        {
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            "vector_length": 8,
            "num_vectors": 300,
            "r": 3,
            "topk": 3,
        },
        lambda: {"input_ids": torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))},
    ),
    "opt": (
        partial(build, "opt"),
        {"target_modules": None, "vector_length": 8, "num_vectors": 64, "r": 4},
        lambda: {"input_ids": torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))},
    ),
}


def output_tensor(out: object) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out  # type: ignore[return-value]
