"""VB-LoRA adapters served by vLLM's real engine (CPU build), by name, against PEFT's VB-LoRA under transformers.

Skipped where vLLM is not importable; `make test-vllm` runs it in its own virtualenv. Each engine starts once
(about a minute on two cores): the offline ``vllm.LLM`` for one class, the OpenAI server on 127.0.0.1 for the
other.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

import pytest

vllm = pytest.importorskip("vllm")

from serving_support import (  # noqa: E402
    GOOD,
    MAX_LORA_RANK,
    NEW_TOKENS,
    TOP_LOGPROBS,
    AdapterSet,
    Comparison,
    Oracle,
    Served,
    adapters_fixture,  # noqa: F401  (the fixtures these tests use)
    log_tail,
    logprob_tol_fixture,  # noqa: F401
    openai_server,
    oracle_fixture,  # noqa: F401
    prompt_ids_fixture,  # noqa: F401
    report,
    smollm2_fixture,  # noqa: F401
    total,
)
from vblora_rs.errors import VBLoRAError  # noqa: E402

# one engine on two cores: a small KV cache, no CUDA graphs, float32 for exact comparisons
KV_CACHE_GIB = "1"
# More LoRA slots than the adapters these tests load (four, with the static one): vLLM's CPU kernels (torch_ops
# bgmv/sgmv) index the slots with the no-LoRA index -1, which Python reads as the last slot, so while every slot
# holds an adapter, base-model requests batched with LoRA requests get the last slot's adapter (vLLM 0.32.0 CPU;
# its GPU kernels skip -1). docs/serving.md, "What vLLM's LoRA support limits".
MAX_LORAS = 8
ENGINE_START_S = 600
# an engine start and PEFT's reference models take minutes on a busy two-core machine
pytestmark = pytest.mark.timeout(1800)


@pytest.fixture(scope="module")
def static_lora(adapters: AdapterSet, tmp_path_factory: pytest.TempPathFactory) -> str:
    """``vblora to-lora``'s output for ``full-all``: the static path (``--lora-modules``, ``LoRARequest``)."""
    folder = str(tmp_path_factory.mktemp("static") / "full-all-lora")
    result = subprocess.run(
        [sys.executable, "-m", "vblora_rs", "to-lora", os.path.join(adapters.folder, "full-all"), "-o", folder],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return folder


def _show(lines: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with capsys.disabled():
        for line in lines:
            print(f"\n  {line}", end="")
        print()


# --- the offline LLM API ------------------------------------------------------------------------------------------


@pytest.fixture(scope="class")
def llm(smollm2: str) -> Iterator[Any]:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", KV_CACHE_GIB)
    engine = vllm.LLM(
        model=smollm2,
        dtype="float32",
        enforce_eager=True,
        max_model_len=512,
        enable_lora=True,
        max_lora_rank=MAX_LORA_RANK,
        max_loras=MAX_LORAS,
        seed=0,
    )
    yield engine
    shutdown = getattr(getattr(engine.llm_engine, "engine_core", None), "shutdown", None)
    if shutdown is not None:
        shutdown()


def _offline(llm: Any, prompts: list[list[int]], requests: list[Optional[Any]]) -> list[Served]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, logprobs=TOP_LOGPROBS, ignore_eos=True)
    outputs = llm.generate(
        [TokensPrompt(prompt_token_ids=ids) for ids in prompts], params, lora_request=requests, use_tqdm=False
    )
    served = []
    for out in outputs:
        completion = out.outputs[0]
        top = [{token: lp.logprob for token, lp in step.items()} for step in completion.logprobs]
        served.append(Served(list(completion.token_ids), top))
    return served


def _differs_from_base(served: dict[str, list[Served]]) -> None:
    """Each adapter changes the greedy tokens of at least one prompt: the test can tell them apart."""
    for name in GOOD:
        assert any(a.tokens != b.tokens for a, b in zip(served[name], served["base"])), name


class TestOffline:
    def test_adapters_by_name_match_peft(
        self,
        llm: Any,
        adapters: AdapterSet,
        oracle: Oracle,
        prompt_ids: list[list[int]],
        logprob_tol: float,
        tmp_path: str,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        from vblora_rs.serving.lora_cache import LoraCache
        from vblora_rs.serving.offline import lora_request

        cache = LoraCache(os.path.join(tmp_path, "cache"))
        lines, served = [], {}
        for name in ("base", *GOOD):
            request = None if name == "base" else lora_request(llm, name, [adapters.folder], cache)
            served[name] = _offline(llm, prompt_ids, [request] * len(prompt_ids))
            parts = [oracle.check(name, ids, out, logprob_tol) for ids, out in zip(prompt_ids, served[name])]
            lines.append(report(f"offline {name}", parts, logprob_tol))
        _differs_from_base(served)
        assert cache.conversions == len(GOOD)
        # one batch mixing every adapter and the base: each prompt gets its own
        names = ["base", *GOOD] * len(prompt_ids)
        prompts = [ids for ids in prompt_ids for _ in range(len(GOOD) + 1)]
        requests = [None if n == "base" else lora_request(llm, n, [adapters.folder], cache) for n in names]
        mixed = _offline(llm, prompts, requests)
        parts = [oracle.check(n, ids, out, logprob_tol, f"mixed {n}") for n, ids, out in zip(names, prompts, mixed)]
        lines.append(report("offline, one batch of all four", parts, logprob_tol))
        assert cache.conversions == len(GOOD), "resolving again converts nothing"
        _show(lines, capsys)

    def test_static_lora_request(
        self,
        llm: Any,
        smollm2: str,
        static_lora: str,
        oracle: Oracle,
        prompt_ids: list[list[int]],
        logprob_tol: float,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        from vllm.lora.request import LoRARequest

        with open(os.path.join(static_lora, "adapter_config.json")) as fh:
            config = json.load(fh)
        assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == smollm2
        request = LoRARequest("static-full-all", 999, static_lora)
        served = _offline(llm, prompt_ids, [request] * len(prompt_ids))
        parts = [oracle.check("full-all", ids, out, logprob_tol, "static") for ids, out in zip(prompt_ids, served)]
        _show([report("offline static to-lora LoRARequest", parts, logprob_tol)], capsys)

    def test_errors_name_the_adapter(
        self,
        llm: Any,
        adapters: AdapterSet,
        oracle: Oracle,
        prompt_ids: list[list[int]],
        logprob_tol: float,
        tmp_path: str,
    ) -> None:
        from vblora_rs.serving.lora_cache import LoraCache
        from vblora_rs.serving.offline import lora_request

        cache = LoraCache(os.path.join(tmp_path, "cache"))
        expected = {
            "wrong-base": r"adapter 'wrong-base': module model\.layers\.0\.self_attn\.q_proj has shape \(out, in\) = "
            r"\(32, 32\) in the adapter and \(576, 576\) in the served model",
            "broken": r"adapter 'broken': .*adapter_model\.safetensors",
            "rank-16": r"adapter 'rank-16': rank r=16 .* max_lora_rank=8.*--max-lora-rank 16",
            "no-such-adapter": r"adapter 'no-such-adapter': not found in",
            "../full-all": r"adapter '\.\./full-all': not found in",
        }
        for name, pattern in expected.items():
            with pytest.raises(VBLoRAError, match=pattern):
                lora_request(llm, name, [adapters.folder], cache)
        # the engine serves on
        request = lora_request(llm, "topk-attn", [adapters.folder], cache)
        served = _offline(llm, prompt_ids, [request] * len(prompt_ids))
        for ids, out in zip(prompt_ids, served):
            oracle.check("topk-attn", ids, out, logprob_tol, "topk-attn after errors")


# --- the OpenAI server -------------------------------------------------------------------------------------------


class Server:
    def __init__(self, port: int, process: subprocess.Popen, log: str, cache: str) -> None:
        self.port, self.process, self.log, self.cache = port, process, log, cache

    def post(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=300) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as exc:
            return exc.code, json.load(exc)

    def complete(self, model: str, ids: list[int]) -> tuple[int, Any]:
        status, body = self.post(
            "/v1/completions",
            {
                "model": model,
                "prompt": ids,
                "max_tokens": NEW_TOKENS,
                "temperature": 0.0,
                "logprobs": TOP_LOGPROBS,
                "ignore_eos": True,
                "return_tokens_as_token_ids": True,
            },
        )
        if status != 200:
            return status, body
        logprobs = body["choices"][0]["logprobs"]
        tokens = [int(t.split(":", 1)[1]) for t in logprobs["tokens"]]
        top = [{int(k.split(":", 1)[1]): v for k, v in step.items()} for step in logprobs["top_logprobs"]]
        return status, Served(tokens, top)

    def tail(self) -> str:
        return log_tail(self.log)


@pytest.fixture(scope="class")
def server(
    smollm2: str, adapters: AdapterSet, static_lora: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("server")
    log, cache = str(root / "server.log"), str(root / "cache")
    env = {
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1",
        "VBLORA_RS_VLLM_ADAPTER_DIRS": adapters.folder,
        "VBLORA_RS_VLLM_CACHE_DIR": cache,
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", KV_CACHE_GIB),
    }
    args = ["--max-lora-rank", str(MAX_LORA_RANK), "--max-loras", str(MAX_LORAS)]
    args += ["--lora-modules", f"static-full-all={static_lora}"]
    try:
        with openai_server(smollm2, args, env, log, ENGINE_START_S) as (port, process):
            yield Server(port, process, log, cache)
    except RuntimeError as exc:
        pytest.fail(str(exc))


class TestServer:
    def test_concurrent_cold_adapters_by_name(
        self,
        server: Server,
        oracle: Oracle,
        prompt_ids: list[list[int]],
        logprob_tol: float,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """Every adapter cold, requested at once with the base (each adapter twice: one conversion each)."""
        jobs = [(name, i) for name in ("base", *GOOD) for i in range(len(prompt_ids))]
        with ThreadPoolExecutor(len(jobs)) as pool:
            answers = list(pool.map(lambda job: server.complete(_model(server, job[0]), prompt_ids[job[1]]), jobs))
        parts: dict[str, list[Comparison]] = {}
        served: dict[str, list[Served]] = {}
        for (name, i), (status, out) in zip(jobs, answers):
            assert status == 200, (name, out, server.tail())
            served.setdefault(name, []).append(out)
            parts.setdefault(name, []).append(oracle.check(name, prompt_ids[i], out, logprob_tol, f"server {name}"))
        _differs_from_base(served)
        entries = [e for e in os.listdir(server.cache) if not e.startswith(".")]
        assert len(entries) == len(GOOD), entries
        lines = [report(f"server {name}", p, logprob_tol) for name, p in parts.items()]
        lines.append(report("server, all", [total(p) for p in parts.values()], logprob_tol))
        _show(lines, capsys)

    def test_static_lora_modules(
        self,
        server: Server,
        oracle: Oracle,
        prompt_ids: list[list[int]],
        logprob_tol: float,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        parts = []
        for ids in prompt_ids:
            status, out = server.complete("static-full-all", ids)
            assert status == 200, out
            parts.append(oracle.check("full-all", ids, out, logprob_tol, "static-full-all"))
        _show([report("server --lora-modules static to-lora", parts, logprob_tol)], capsys)

    def test_errors_while_others_succeed(
        self,
        server: Server,
        oracle: Oracle,
        prompt_ids: list[list[int]],
        logprob_tol: float,
    ) -> None:
        expected = {
            "wrong-base": (400, ["adapter 'wrong-base'", "model.layers.0.self_attn.q_proj", "(32, 32)", "(576, 576)"]),
            "broken": (400, ["adapter 'broken'"]),
            "rank-16": (400, ["adapter 'rank-16'", "max_lora_rank=8"]),
            "no-such-adapter": (404, ["no-such-adapter"]),
            "..": (404, [".."]),
        }
        jobs = [*expected, "full-all", "base"]
        with ThreadPoolExecutor(len(jobs)) as pool:
            answers = dict(zip(jobs, pool.map(lambda n: server.complete(_model(server, n), prompt_ids[0]), jobs)))
        for name, (status, words) in expected.items():
            got_status, body = answers[name]
            message = body["error"]["message"] if isinstance(body, dict) else body
            assert got_status == status, (name, body)
            for word in words:
                assert word in message, (name, word, message)
        for name in ("full-all", "base"):
            status, out = answers[name]
            assert status == 200, out
            oracle.check(name, prompt_ids[0], out, logprob_tol, f"server {name} beside errors")
        assert server.process.poll() is None


def _model(server: Server, name: str) -> str:
    """The ``model`` field: the served model's own name for the base."""
    if name != "base":
        return name
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/v1/models", timeout=30) as response:
        return json.load(response)["data"][0]["id"]
