"""Merging into a 4-bit/8-bit base rounds whole layers again: warned, as PEFT's LoRA warns, pointing to the
full-precision merge."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("bitsandbytes")

import peft  # noqa: E402
import vblora_rs  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402

# out-features multiples of 32 (bitsandbytes' CPU layout packs rows in groups of 32)
LLAMA = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 64,
    "max_position_embeddings": 64,
}
ADAPTER = {"r": 4, "num_vectors": 48, "vector_length": 16, "topk": 2, "target_modules": ["q_proj", "down_proj"]}
QUANT = {
    "4-bit": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": torch.float32},
    "8-bit": {"load_in_8bit": True},
}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**LLAMA)).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind", sorted(QUANT))
def test_merging_into_a_quantized_base_warns_and_points_to_vblora_merge(base_dir: Path, kind: str) -> None:
    base = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=BitsAndBytesConfig(**QUANT[kind]))
    model = vblora_rs.get_peft_model(base, peft.VBLoRAConfig(**ADAPTER))
    with pytest.warns(UserWarning, match=f"Merge VB-LoRA module to {kind} linear may get different generations") as rec:
        model.merge_and_unload()
    assert any("vblora merge BASE ADAPTER -o OUT" in str(w.message) for w in rec)


def test_merging_into_a_float_base_does_not_warn(base_dir: Path) -> None:
    model = vblora_rs.get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), peft.VBLoRAConfig(**ADAPTER))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        model.merge_and_unload()
    assert not [w for w in rec if "may get different generations" in str(w.message)]
