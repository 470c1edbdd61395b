"""Base model and adapter folders for the ``vblora merge`` tests (tests/cli/), and the command itself."""

from __future__ import annotations

import os
from pathlib import Path

import peft
import torch
from vblora_rs.cli import main

from support.models import MODEL_CASES
from support.peft_reference import peft_get_peft_model

# init values large enough that every delta moves the merged weights
ADAPTER_KW = {"init_vector_bank_bound": 0.5, "init_logits_std": 1.0}


def save_base(case: str, folder: Path, dtype: torch.dtype = torch.float32, sharded: bool = False) -> Path:
    model = MODEL_CASES[case][0]().to(dtype)
    model.save_pretrained(folder, max_shard_size="20KB" if sharded else "50GB")
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    return folder


def save_adapter(case: str, folder: Path, seed: int, topk: bool = False, **overrides: object) -> Path:
    builder, cfg_kwargs, _ = MODEL_CASES[case]
    torch.manual_seed(seed)
    kwargs = {**ADAPTER_KW, **cfg_kwargs, "save_only_topk_weights": topk, **overrides}
    model = peft_get_peft_model(builder(), peft.VBLoRAConfig(**kwargs))
    model.save_pretrained(folder)
    return folder


def run_cli(*args: object) -> int:
    return main(["merge", *map(str, args)])


def leftovers(parent: Path) -> list[str]:
    return [n for n in os.listdir(parent) if ".tmp-" in n or ".old-" in n]
