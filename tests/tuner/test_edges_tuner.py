"""Sharp edges of the tuner found by a hostile probe: mixed-adapter batches from several threads at once."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator

import pytest
import torch
import vblora_rs
from support import tolerances
from support.child_process import run_python
from support.models import MODEL_CASES
from torch import nn
from vblora_rs.errors import VBLoRAError

NAMES = ["default", "second", "__base__", "default", "second"]


def two_adapter_mlp() -> nn.Module:
    builder, kwargs, _ = MODEL_CASES["mlp"]
    model = vblora_rs.get_peft_model(builder(), vblora_rs.VBLoRAConfig(**kwargs, init_logits_std=1.0))
    torch.manual_seed(5)
    model.add_adapter("second", vblora_rs.VBLoRAConfig(**kwargs, init_logits_std=1.0))
    return model.eval()


def mlp_input() -> torch.Tensor:
    return torch.randn(len(NAMES), 16, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def tiny_switch_interval() -> Iterator[None]:
    """Threads switch after every few bytecodes, so a window of a few instructions is hit within a few thousand
    forwards instead of tens of thousands."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


def test_a_hook_seen_before_torch_marks_it_keyword_taking_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch stores a forward pre-hook in ``_forward_pre_hooks`` a moment before it records it as taking keywords;
    another thread's forward in that moment calls it as ``hook(module, args)``. Replayed deterministically: the
    first registration is held in that state while a second thread runs a plain forward of the same model."""
    model = two_adapter_mlp()
    x = mlp_input()
    with torch.no_grad():
        plain = model(x=x)
        mixed = model(x=x, adapter_names=NAMES)
    original = nn.Module.register_forward_pre_hook
    seen: dict[str, object] = {}

    def register_then_race(self: nn.Module, hook, *, prepend: bool = False, with_kwargs: bool = False):  # type: ignore[no-untyped-def]
        handle = original(self, hook, prepend=prepend, with_kwargs=with_kwargs)
        if with_kwargs and "other" not in seen:
            del self._forward_pre_hooks_with_kwargs[handle.id]  # the state between torch's two stores

            def other_thread() -> None:
                try:
                    with torch.no_grad():
                        seen["other"] = model(x=x)
                except Exception as exc:  # noqa: BLE001 - the failure under test, reported below
                    seen["other"] = exc

            worker = threading.Thread(target=other_thread)
            worker.start()
            worker.join()
            self._forward_pre_hooks_with_kwargs[handle.id] = True
        return handle

    monkeypatch.setattr(nn.Module, "register_forward_pre_hook", register_then_race)
    with torch.no_grad():
        again = model(x=x, adapter_names=NAMES)
    assert not isinstance(seen["other"], Exception), seen["other"]
    # the other thread got no adapter names: the plain output, within reordering (a forward on another thread may
    # take another kernel path, e.g. MKL's on AMD CPUs), and not the mixed batch's
    tol = tolerances.model("mlp")
    torch.testing.assert_close(seen["other"], plain, **tol)
    assert not torch.allclose(seen["other"], mixed, **tol)
    assert torch.equal(again, mixed)


def test_four_threads_of_mixed_batches_all_succeed_with_their_own_rows(tiny_switch_interval: None) -> None:
    model = two_adapter_mlp()
    x = mlp_input()
    with torch.no_grad():
        want = model(x=x, adapter_names=NAMES)
        want_plain = model(x=x)
    errors: list[BaseException] = []
    wrong = [0]
    done = [0]

    def work(mixed: bool) -> None:
        for _ in range(400):
            try:
                with torch.no_grad():
                    got = model(x=x, adapter_names=NAMES) if mixed else model(x=x)
                tol = tolerances.model("mlp")
                if not torch.allclose(got, want if mixed else want_plain, rtol=tol["rtol"], atol=tol["atol"]):
                    wrong[0] += 1
                done[0] += 1
            except Exception as exc:  # noqa: BLE001 - counted and reported
                errors.append(exc)

    threads = [threading.Thread(target=work, args=(i != 3,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, f"{len(errors)} errors in {done[0] + len(errors)} forwards, first: {errors[0]!r}"
    assert wrong[0] == 0 and done[0] == 1600


# --- safe_merge of a broken adapter speaks PEFT's words ---------------------------------------------------------


@pytest.mark.parametrize("case", ["opt", "gpt2", "llama"])
@pytest.mark.parametrize("broken", ["vblora_logits_A", "vblora_logits_B", "vblora_vector_bank"])
def test_safe_merge_of_a_nan_adapter_raises_peft_message_then_ours(case: str, broken: str) -> None:
    """PEFT's own test_merge_layers_nan matches ``ValueError`` and this message; the tensor and row follow."""
    builder, kwargs, _ = MODEL_CASES[case]
    model = vblora_rs.get_peft_model(builder(), vblora_rs.VBLoRAConfig(**kwargs))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if broken in name:
                param[0] = torch.nan
    with pytest.raises(
        ValueError, match=r"^NaNs detected in the merged weights\. The adapter default seems to be broken"
    ):
        model.merge_and_unload(safe_merge=True)


# --- every field PEFT matches as a regex is bounded -------------------------------------------------------------

MANY_WILDCARDS = ".*" * 14 + "X"  # polynomial backtracking: ~len(name)**14 steps on a name it does not match


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("target_modules", MANY_WILDCARDS, "14 unbounded repetitions"),
        ("exclude_modules", MANY_WILDCARDS, "14 unbounded repetitions"),
        ("layers_pattern", MANY_WILDCARDS, "unbounded repetitions"),
        ("modules_to_save", ["(.+)+X"], "exponentially many ways"),
        ("modules_to_save", [MANY_WILDCARDS], "unbounded repetitions"),
    ],
)
def test_regexes_that_cannot_finish_are_refused_before_matching(field: str, value: object, problem: str) -> None:
    builder, kwargs, _ = MODEL_CASES["mlp"]
    fields = {**kwargs, field: value}
    if field == "layers_pattern":
        fields["layers_to_transform"] = [0]
    with pytest.raises(VBLoRAError, match=problem):
        vblora_rs.get_peft_model(builder(), vblora_rs.VBLoRAConfig(**fields))


def test_usual_target_regexes_are_accepted() -> None:
    from vblora_rs.storage.regex_guard import regex_problem

    for pattern in (
        r".*\.(q_proj|v_proj)",
        r".*decoder.*(SelfAttention|EncDecAttention).*(q|k|v|o)$",
        r"model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj",
        r"(^|.*\.)lm_head($|\..*)",
    ):
        assert regex_problem(pattern) == "", pattern


# --- the memory budget knows ulimit -v and the cgroup's limit ---------------------------------------------------

ULIMIT_SCRIPT = """
import resource, sys
import torch
from torch import nn
import vblora_rs
from vblora_rs.errors import VBLoRAError

with open("/proc/self/status") as fh:
    size = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (size + 2**30, resource.RLIM_INFINITY))
model = nn.Sequential(nn.Linear(4096, 4096))
# dense logits of 2 x 4 x 256 x 2**18 float32 values: 2 GiB, more than the 1 GiB left under the limit
config = vblora_rs.VBLoRAConfig(target_modules=["0"], r=4, vector_length=16, num_vectors=2**18)
try:
    vblora_rs.get_peft_model(model, config)
except VBLoRAError as exc:
    print("VBLoRAError", exc)
except BaseException as exc:
    print("OTHER", type(exc).__name__, str(exc)[:200])
"""


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_AS and /proc are Linux's")
def test_an_adapter_over_ulimit_v_is_refused_by_the_budget(tmp_path) -> None:  # type: ignore[no-untyped-def]
    done = run_python(ULIMIT_SCRIPT, timeout=300)
    out = done.stdout.strip().splitlines()
    assert out and out[-1].startswith("VBLoRAError"), (out, done.stderr[-2000:])
    assert "ulimit -v" in out[-1]


@pytest.mark.parametrize("version", [1, 2])
def test_the_budget_reads_the_cgroup_limit(tmp_path, monkeypatch: pytest.MonkeyPatch, version: int) -> None:  # type: ignore[no-untyped-def]
    from vblora_rs.tuner import memory_budget

    root = tmp_path / "cgroup"
    if version == 2:
        (tmp_path / "proc").write_text("0::/box/inner\n")
        leaf, parent = root / "box" / "inner", root / "box"
        names = ("memory.max", "memory.current")
        leaf.mkdir(parents=True)
        (leaf / names[0]).write_text("max\n")  # no limit of its own: the parent's counts
        (leaf / names[1]).write_text("1000\n")
    else:
        (tmp_path / "proc").write_text("4:memory:/box\n3:cpu:/\n")
        parent = root / "memory" / "box"
        names = ("memory.limit_in_bytes", "memory.usage_in_bytes")
    parent.mkdir(parents=True, exist_ok=True)
    (parent / names[0]).write_text(f"{300 * 2**20}\n")
    (parent / names[1]).write_text(f"{100 * 2**20}\n")
    monkeypatch.setattr(memory_budget, "_PROC_CGROUP", str(tmp_path / "proc"))
    monkeypatch.setattr(memory_budget, "_CGROUP_ROOT", str(root))
    assert memory_budget.available_bytes() == 200 * 2**20  # far below this machine's MemAvailable
    with pytest.raises(VBLoRAError, match="cgroup"):
        memory_budget.MemoryBudget("config of adapter 'x'").take("logits", (256, 2**20))


# --- a checkpoint's shapes are checked against the file before dense logits get memory --------------------------


def saved_dense_adapter(path: str, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 64)).to(dtype)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    config = vblora_rs.VBLoRAConfig(target_modules=["0"], r=2, vector_length=16, num_vectors=32, init_logits_std=1.0)
    model = vblora_rs.get_peft_model(base, config)
    model.save_pretrained(path)
    return model, state


def test_a_config_larger_than_its_file_is_refused_from_the_file_before_logits_get_memory(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    import json

    from vblora_rs.tuner import memory_budget

    saved_dense_adapter(str(tmp_path))
    config_file = tmp_path / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["num_vectors"] = 2**20  # bank 64 MiB, dense logits 2 x 32 MiB: the file holds 32 vectors
    config_file.write_text(json.dumps(config))
    # room for the (unwritten) bank but not for the dense logits: drawing them before reading the file was refused
    # by the budget with no word of the file
    monkeypatch.setattr(memory_budget, "available_bytes", lambda: 100 * 2**20)
    with pytest.raises(VBLoRAError, match=r"tensor base_model\.vblora_vector_bank has shape \(32, 16\)"):
        vblora_rs.PeftModel.from_pretrained(nn.Sequential(nn.Linear(64, 64)), str(tmp_path))


@pytest.mark.parametrize("autocast", [True, False])
def test_dense_logits_loaded_for_inference_take_the_dtype_autocast_gives(tmp_path, autocast: bool) -> None:  # type: ignore[no-untyped-def]
    model, state = saved_dense_adapter(str(tmp_path), torch.bfloat16)
    base = nn.Sequential(nn.Linear(64, 64)).to(torch.bfloat16)
    base.load_state_dict(state)
    loaded = vblora_rs.PeftModel.from_pretrained(base, str(tmp_path), autocast_adapter_dtype=autocast)
    logits = loaded.base_model.model[0].vblora_logits_A["default"]
    assert logits.device.type == "cpu"
    assert logits.dtype == (torch.float32 if autocast else torch.bfloat16)
    saved = model.base_model.model[0].vblora_logits_A["default"]
    assert torch.equal(logits.float(), saved.detach().to(logits.dtype).float())
