"""pytest plugin for the out-of-tree PEFT VB-LoRA harness (loaded with `-p vblora_harness_plugin`).

Jobs:
  * select PEFT's own VB-LoRA test cases out of the collected items (everything else is deselected);
  * with --vblora-backend: import vblora_rs from the tree given in $HARNESS_VBLORA_TREE, call
    vblora_rs.apply_to_peft() once before collection and check that PEFT now serves VBLORA with
    vblora_rs's classes; at session end call vblora_rs.remove_from_peft() and check the registry is
    restored. Any failure here aborts the run loudly (pytest.UsageError / non-zero exit);
  * record one outcome per selected test id (passed/failed/error/skipped/xfailed/xpassed) plus the
    failure text into $HARNESS_OUT/results.json and a human summary into $HARNESS_OUT/summary.txt.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, ClassVar

import pytest

# Files whose every test is VB-LoRA specific.
WHOLE_FILES = {"test_vblora.py"}
# Files in which only the VB-LoRA rows/tests are selected.
FILTERED_FILES = {
    "test_custom_models.py",
    "test_decoder_models.py",
    "test_encoder_decoder_models.py",
    "test_feature_extraction_models.py",
}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("vblora-harness")
    group.addoption(
        "--vblora-backend",
        action="store_true",
        default=False,
        help="call vblora_rs.apply_to_peft() before collection and verify PEFT uses it",
    )
    group.addoption(
        "--vblora-select-all",
        action="store_true",
        default=False,
        help="do not deselect anything (debug: see the whole collection)",
    )


def _is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def _worker_id(config: pytest.Config) -> str:
    return getattr(config, "workerinput", {}).get("workerid", "main")


def _out_dir() -> Path | None:
    out = os.environ.get("HARNESS_OUT")
    return Path(out) if out else None


# --------------------------------------------------------------------------------------------
# Backend activation and checks
# --------------------------------------------------------------------------------------------


def _registry_entry() -> Any:
    """The tuner class PEFT's method registry maps VBLORA to (what get_peft_model instantiates)."""
    import peft.mapping

    tuner_map = getattr(peft.mapping, "PEFT_TYPE_TO_TUNER_MAPPING", None)
    if tuner_map is None:
        raise pytest.UsageError("harness: peft.mapping.PEFT_TYPE_TO_TUNER_MAPPING not found in this peft version")
    return tuner_map["VBLORA"]


def _describe(cls: Any) -> str:
    return f"{cls.__module__}.{cls.__qualname__}" if isinstance(cls, type) else repr(cls)


class BackendState:
    original_tuner: Any = None
    original_layer: Any = None
    original_linear: Any = None
    report: ClassVar[list[str]] = []
    failed: bool = False


def _note(line: str) -> None:
    BackendState.report.append(line)
    print(f"[vblora-harness] {line}", flush=True)


def _activate_backend() -> None:
    tree = os.environ.get("HARNESS_VBLORA_TREE", "")
    import peft.tuners.vblora.layer as peft_layer
    import peft.tuners.vblora.model as peft_model

    BackendState.original_tuner = peft_model.VBLoRAModel
    BackendState.original_layer = peft_layer.VBLoRALayer
    BackendState.original_linear = peft_layer.Linear
    before = _registry_entry()
    if before is not BackendState.original_tuner:
        raise pytest.UsageError(
            "harness: PEFT's VBLORA registry entry is not peft's own VBLoRAModel before apply_to_peft(): "
            + _describe(before)
        )

    try:
        import vblora_rs
    except Exception as exc:
        raise pytest.UsageError(f"harness: cannot import vblora_rs (tree {tree!r}): {exc!r}") from exc
    vfile = str(Path(vblora_rs.__file__).resolve())
    if tree and not vfile.startswith(str(Path(tree).resolve()) + os.sep):
        raise pytest.UsageError(
            f"harness: vblora_rs was imported from {vfile}, not from the requested tree {tree}/python "
            "(is PYTHONPATH set? does the tree have python/vblora_rs?)"
        )
    _note(f"vblora_rs imported from {vfile}")
    for name in ("apply_to_peft", "remove_from_peft"):
        if not callable(getattr(vblora_rs, name, None)):
            raise pytest.UsageError(
                f"harness: vblora_rs.{name} is missing in {vfile} -- this tree has no PEFT backend API yet"
            )

    vblora_rs.apply_to_peft()
    _note("vblora_rs.apply_to_peft() called")
    _check_backend_active()


def _from_vblora_rs(obj: Any) -> bool:
    return isinstance(obj, type) and obj.__module__.split(".")[0] == "vblora_rs"


def _check_backend_active() -> None:
    import peft.tuners.vblora as peft_vblora_pkg
    import torch
    from peft import VBLoRAConfig, get_peft_model

    problems: list[str] = []
    entry = _registry_entry()
    ok = _from_vblora_rs(entry) and issubclass(entry, BackendState.original_tuner)
    _note(f"PEFT_TYPE_TO_TUNER_MAPPING['VBLORA'] -> {_describe(entry)} ({'ok' if ok else 'NOT vblora_rs'})")
    if not ok:
        problems.append("PEFT_TYPE_TO_TUNER_MAPPING['VBLORA']")
    # Informational only: no PEFT test references these names directly.
    _note(f"(info) peft.tuners.vblora.VBLoRAModel -> {_describe(peft_vblora_pkg.VBLoRAModel)}")

    # End-to-end: what does PEFT actually build now? (RNG state restored so both modes start tests alike)
    with torch.random.fork_rng(devices=[]):
        base = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
        model = get_peft_model(base, VBLoRAConfig(target_modules=["0", "2"], vector_length=2, num_vectors=4, r=2))
    tuner = model.base_model
    layer = tuner.model[0]
    _note(f"get_peft_model -> tuner {type(tuner).__module__}.{type(tuner).__qualname__}")
    _note(f"get_peft_model -> layer {type(layer).__module__}.{type(layer).__qualname__}")
    if not (_from_vblora_rs(type(tuner)) and isinstance(tuner, BackendState.original_tuner)):
        problems.append("tuner built by get_peft_model")
    if not (
        _from_vblora_rs(type(layer))
        and isinstance(layer, BackendState.original_linear)
        and isinstance(layer, BackendState.original_layer)
    ):
        problems.append("Linear layer built by get_peft_model")
    if problems:
        raise pytest.UsageError(
            "harness: after vblora_rs.apply_to_peft() PEFT still does not use vblora_rs for: " + ", ".join(problems)
        )
    _note("backend check passed: PEFT serves VBLORA with vblora_rs classes")


def _deactivate_backend() -> None:
    import vblora_rs

    vblora_rs.remove_from_peft()
    entry = _registry_entry()
    if entry is not BackendState.original_tuner:
        BackendState.failed = True
        _note(f"remove_from_peft() did NOT restore PEFT's registry: VBLORA -> {_describe(entry)}")
    else:
        _note("vblora_rs.remove_from_peft() restored PEFT_TYPE_TO_TUNER_MAPPING['VBLORA'] to peft's VBLoRAModel")


def _hub_fail_fast() -> str:
    """No hub here, and PEFT's `hub_online_once` switches offline mode *off* for a model's first use, so
    huggingface_hub asks the network first. It falls back to the hub cache (build_hub_cache.py) for the files
    the cache holds; a file it lacks (transformers probes adapter_config.json twice) is first retried with
    backoff (1+2+4+8+8 s each) and then reported missing, which transformers accepts: 50.5 s measured for
    one from_pretrained, 2.4 s with zero retries. Zero retries gives the same outcome at once (same in both
    modes, so no effect on comparisons)."""
    if os.environ.get("HARNESS_HUB_RETRIES") == "keep":
        return "huggingface_hub retries left as they are (HARNESS_HUB_RETRIES=keep)"
    from huggingface_hub.utils import _http

    patched = []
    for name in ("http_backoff", "http_stream_backoff", "_http_backoff_base"):
        fn = getattr(_http, name, None)
        kw = getattr(fn, "__kwdefaults__", None)
        if kw is not None and "max_retries" in kw:
            kw["max_retries"] = 0
            patched.append(name)
    return f"huggingface_hub max_retries=0 for {', '.join(patched) or 'nothing (API changed?)'}"


def pytest_configure(config: pytest.Config) -> None:
    if not _is_worker(config):
        print(f"[vblora-harness] {_hub_fail_fast()}", flush=True)
    else:
        _hub_fail_fast()
    config._vblora_results = {}  # type: ignore[attr-defined]
    config._vblora_selected = []  # type: ignore[attr-defined]
    config._vblora_t0 = time.time()  # type: ignore[attr-defined]
    if config.getoption("--vblora-backend"):
        _activate_backend()
    else:
        # Plain mode must really be plain: refuse if something already patched PEFT.
        entry = _registry_entry()
        if _from_vblora_rs(entry):
            raise pytest.UsageError(f"harness: plain-PEFT run but VBLORA is served by {_describe(entry)}")


# --------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------


def _mentions_vblora(value: Any, depth: int = 0) -> bool:
    if depth > 4:
        return False
    from peft import VBLoRAConfig

    if isinstance(value, type):
        return issubclass(value, VBLoRAConfig) or "vblora" in value.__name__.lower()
    if isinstance(value, VBLoRAConfig):
        return True
    if isinstance(value, str):  # also covers PeftType.VBLORA (a str enum)
        return "vblora" in value.lower()
    if isinstance(value, dict):
        return any(_mentions_vblora(k, depth + 1) or _mentions_vblora(v, depth + 1) for k, v in value.items())
    if isinstance(value, (list, tuple, set, frozenset)):
        return any(_mentions_vblora(v, depth + 1) for v in value)
    return False


def _selected(item: pytest.Item) -> bool:
    fname = item.path.name
    if fname in WHOLE_FILES:
        return True
    if fname not in FILTERED_FILES:
        return False
    if "vblora" in item.nodeid.lower():
        return True
    callspec = getattr(item, "callspec", None)
    return callspec is not None and _mentions_vblora(list(callspec.params.values()))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--vblora-select-all"):
        keep = list(items)
        drop: list[pytest.Item] = []
    else:
        keep = [it for it in items if _selected(it)]
        drop = [it for it in items if not _selected(it)]
    if not keep:
        raise pytest.UsageError("harness: selection is empty -- did the PEFT test layout change?")
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep
    config._vblora_selected = [it.nodeid for it in keep]  # type: ignore[attr-defined]
    out = _out_dir()
    if out is not None and _worker_id(config) in ("main", "gw0"):
        out.mkdir(parents=True, exist_ok=True)
        (out / "selected.txt").write_text("\n".join(it.nodeid for it in keep) + "\n")


# --------------------------------------------------------------------------------------------
# Outcome recording (controller / single process only)
# --------------------------------------------------------------------------------------------


def _skip_reason(rep: pytest.TestReport) -> str:
    lr = rep.longrepr
    if isinstance(lr, tuple) and len(lr) == 3:
        return str(lr[2])
    return rep.longreprtext


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    # pytest passes no config here; the results dict lives on the module.
    _record(report)


_RESULTS: dict[str, dict[str, str]] = {}


def _record(rep: pytest.TestReport) -> None:
    cur = _RESULTS.get(rep.nodeid)
    wasxfail = hasattr(rep, "wasxfail")
    if rep.when == "setup":
        if rep.failed:
            _RESULTS[rep.nodeid] = {"outcome": "error", "when": "setup", "text": rep.longreprtext}
        elif rep.skipped:
            _RESULTS[rep.nodeid] = {
                "outcome": "xfailed" if wasxfail else "skipped",
                "when": "setup",
                "text": _skip_reason(rep),
            }
    elif rep.when == "call":
        if rep.passed:
            _RESULTS[rep.nodeid] = {"outcome": "xpassed" if wasxfail else "passed", "when": "call", "text": ""}
        elif rep.failed:
            _RESULTS[rep.nodeid] = {"outcome": "failed", "when": "call", "text": rep.longreprtext}
        else:
            _RESULTS[rep.nodeid] = {
                "outcome": "xfailed" if wasxfail else "skipped",
                "when": "call",
                "text": _skip_reason(rep),
            }
    elif rep.when == "teardown" and rep.failed:
        prev = cur["outcome"] if cur else "?"
        _RESULTS[rep.nodeid] = {
            "outcome": "error",
            "when": f"teardown (call outcome: {prev})",
            "text": rep.longreprtext,
        }


def needs_hub(text: str) -> bool:
    """Whether a failure is the hub being unreachable (a model/tokenizer download), not the code under test."""
    return "LocalEntryNotFoundError" in text or "couldn't connect to 'https://huggingface.co'" in text


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    if config.getoption("--vblora-backend") and BackendState.original_tuner is not None:
        try:
            _deactivate_backend()
        except Exception as exc:  # noqa: BLE001 - any failure must be reported, not crash the summary
            BackendState.failed = True
            _note(f"remove_from_peft() raised {exc!r}")
        if BackendState.failed:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
    if _is_worker(config):
        return
    out = _out_dir()
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    selected_file = out / "selected.txt"
    selected = selected_file.read_text().split("\n") if selected_file.exists() else []
    selected = [s for s in selected if s]
    counts: dict[str, int] = {}
    for res in _RESULTS.values():
        counts[res["outcome"]] = counts.get(res["outcome"], 0) + 1
    missing = [s for s in selected if s not in _RESULTS]
    wall = time.time() - config._vblora_t0  # type: ignore[attr-defined]
    (out / "results.json").write_text(json.dumps(_RESULTS, indent=1, sort_keys=True))
    hub = sorted(k for k, v in _RESULTS.items() if v["outcome"] in ("failed", "error") and needs_hub(v["text"]))
    lines = [
        f"mode: {'backend' if config.getoption('--vblora-backend') else 'peft'}",
        f"tests: {os.environ.get('HARNESS_TESTS', '?')}",
        f"selected: {len(selected)}",
        "counts: "
        + ", ".join(f"{k}={counts.get(k, 0)}" for k in ("passed", "failed", "error", "skipped", "xfailed", "xpassed")),
        f"failed/error because the hub is unreachable: {len(hub)}",
        f"no result (crashed/interrupted): {len(missing)}",
        f"pytest exit status: {int(session.exitstatus)}",
        f"wall time (pytest session, s): {wall:.1f}",
    ]
    if BackendState.report:
        lines.append("backend checks:")
        lines += [f"  {r}" for r in BackendState.report]
    for outcome in ("failed", "error"):
        ids = sorted(k for k, v in _RESULTS.items() if v["outcome"] == outcome)
        lines.append(f"{outcome} ids ({len(ids)}):")
        lines += [f"  {i}" for i in ids]
    if missing:
        lines.append(f"ids without a result ({len(missing)}):")
        lines += [f"  {i}" for i in missing]
    (out / "summary.txt").write_text("\n".join(lines) + "\n")
