"""Small transformers models built from configs (nothing to download): one table of named setups shared by the
tests, the benchmarks and the toy demo, so that a model called "llama" is the same model wherever it is built.

Each setup names a transformers config class, a model class and the config's values; :func:`build` seeds torch and
builds it, :func:`save` also writes it as a base model folder. Overrides change single values (the benchmarks give
their own sizes this way):

    build("llama")                                     # the tests' tiny Llama, seed 0, eval mode
    build("tinyllama", num_hidden_layers=4)            # TinyLlama-1.1B's shape, four layers
    save("llama", folder, dtype=torch.bfloat16)        # a base folder for ``vblora merge`` or a quantized load

transformers is imported on the first build, not with this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Optional

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import PretrainedConfig


@dataclass(frozen=True)
class Setup:
    """A model built from a config: transformers' class names (imported on use) and the config's values."""

    config_class: str
    model_class: str
    values: Mapping[str, Any] = field(default_factory=dict)


# The tests' tiny Llama: 2 layers, grouped-query attention (2 key/value heads for 4 query heads).
_TINY_LLAMA = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 64,
    "max_position_embeddings": 64,
}
# BERT and RoBERTa classifiers of the same size, three labels.
_TINY_ENCODER = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "vocab_size": 64,
    "max_position_embeddings": 64,
    "num_labels": 3,
}

MINI_MODEL_SETUPS: dict[str, Setup] = {
    # causal language models
    "gpt2": Setup(
        "GPT2Config", "GPT2LMHeadModel", {"n_embd": 32, "n_layer": 2, "n_head": 2, "vocab_size": 64, "n_positions": 32}
    ),
    "llama": Setup("LlamaConfig", "LlamaForCausalLM", _TINY_LLAMA),
    "opt": Setup(
        "OPTConfig",
        "OPTForCausalLM",
        {
            "hidden_size": 32,
            "ffn_dim": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "vocab_size": 64,
            "max_position_embeddings": 64,
            "word_embed_proj_dim": 32,
        },
    ),
    # the toy demo's byte-level GPT-2 (256 byte values), without dropout
    "gpt2-bytes": Setup(
        "GPT2Config",
        "GPT2LMHeadModel",
        {
            "vocab_size": 256,
            "n_positions": 128,
            "n_embd": 128,
            "n_layer": 2,
            "n_head": 4,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "bos_token_id": 0,
            "eos_token_id": 0,
        },
    ),
    # sequence classifiers
    "bert-seq-cls": Setup("BertConfig", "BertForSequenceClassification", _TINY_ENCODER),
    "roberta-seq-cls": Setup("RobertaConfig", "RobertaForSequenceClassification", _TINY_ENCODER),
    "llama-seq-cls": Setup(
        "LlamaConfig", "LlamaForSequenceClassification", {**_TINY_LLAMA, "num_labels": 3, "pad_token_id": 0}
    ),
    # encoder-decoders
    "t5": Setup(
        "T5Config",
        "T5ForConditionalGeneration",
        {
            "d_model": 32,
            "d_ff": 64,
            "d_kv": 8,
            "num_layers": 2,
            "num_heads": 4,
            "vocab_size": 64,
            "decoder_start_token_id": 0,
            "pad_token_id": 0,
            "eos_token_id": 1,
        },
    ),
    "bart": Setup(
        "BartConfig",
        "BartForConditionalGeneration",
        {
            "d_model": 32,
            "encoder_layers": 2,
            "decoder_layers": 2,
            "encoder_attention_heads": 4,
            "decoder_attention_heads": 4,
            "encoder_ffn_dim": 64,
            "decoder_ffn_dim": 64,
            "vocab_size": 64,
            "max_position_embeddings": 64,
            "pad_token_id": 1,
            "bos_token_id": 0,
            "eos_token_id": 2,
            "decoder_start_token_id": 2,
            "forced_eos_token_id": None,
        },
    ),
    # real shapes, for the benchmarks (build them on the meta device, or with fewer layers)
    "gpt2-small": Setup("GPT2Config", "GPT2LMHeadModel", {}),  # transformers' defaults: GPT-2 small, 124M
    "tinyllama": Setup(
        "LlamaConfig",
        "LlamaForCausalLM",
        {
            "hidden_size": 2048,
            "intermediate_size": 5632,
            "num_hidden_layers": 22,
            "num_attention_heads": 32,
            "num_key_value_heads": 4,
            "vocab_size": 32000,
        },
    ),
    "llama-7b": Setup(
        "LlamaConfig",
        "LlamaForCausalLM",
        {
            "hidden_size": 4096,
            "intermediate_size": 11008,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 32,
            "vocab_size": 32000,
        },
    ),
}


def setup(name: str) -> Setup:
    """The setup called ``name``.

    Raises:
        KeyError: no setup has that name (the message lists those that do).
    """
    try:
        return MINI_MODEL_SETUPS[name]
    except KeyError:
        raise KeyError(f"no mini model {name!r}; the setups are {', '.join(sorted(MINI_MODEL_SETUPS))}") from None


def config(name: str, **overrides: Any) -> PretrainedConfig:
    """The transformers config of setup ``name`` with ``overrides`` replacing single values."""
    import transformers

    chosen = setup(name)
    return getattr(transformers, chosen.config_class)(**{**chosen.values, **overrides})


def build(name: str, seed: int = 0, **overrides: Any) -> nn.Module:
    """Setup ``name`` built from its config after ``torch.manual_seed(seed)``, in eval mode.

    Args:
        name: a key of :data:`MINI_MODEL_SETUPS`.
        seed: seeds torch's generator right before the weights are drawn: same name, seed and overrides, same
            weights.
        overrides: config values replacing the setup's (``num_hidden_layers=4``, ``num_labels=2``, ...).

    Returns:
        The model, in eval mode (call ``.train()`` to train with dropout).
    """
    import torch
    import transformers

    cfg = config(name, **overrides)
    torch.manual_seed(seed)
    return getattr(transformers, setup(name).model_class)(cfg).eval()


def save(name: str, folder: str, seed: int = 0, dtype: Optional[torch.dtype] = None, **overrides: Any) -> str:
    """Builds setup ``name`` (as :func:`build` does), casts it to ``dtype`` if given and saves it to ``folder`` with
    ``save_pretrained``, a base model folder. Returns ``folder``."""
    model = build(name, seed, **overrides)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(folder)
    return str(folder)
