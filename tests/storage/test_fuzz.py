"""The mutation fuzzer (tests/support/fuzz_adapters.py) in a child process under an address-space limit: every mutant
through from_pretrained, vblora merge, inspect and to-lora ends in success or a VBLoRAError naming the input.

``VBLORA_FUZZ_MUTANTS`` sets the number of mutants (a quick 60 by default; CI's ``make fuzz`` runs thousands) and
``VBLORA_FUZZ_SEED`` the seed."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from support.child_process import child_env

FUZZER = Path(__file__).resolve().parents[1] / "support" / "fuzz_adapters.py"
# torch alone maps a few GiB of address space; a mutant that makes anything allocate far beyond its file's size
# fails inside this limit with an error the fuzzer counts, instead of taking the machine's memory.
MEMORY_LIMIT = 12 * 2**30
COUNT = int(os.environ.get("VBLORA_FUZZ_MUTANTS", "60"))
SEED = int(os.environ.get("VBLORA_FUZZ_SEED", "0"))


@pytest.fixture(scope="module")
def fuzz_result() -> dict[str, Any]:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))

    done = subprocess.run(
        [sys.executable, str(FUZZER), str(COUNT), str(SEED)],
        env=child_env(OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=3600,
        preexec_fn=limit,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps(result["counts"], indent=1))  # shown with -s: the outcome counts of this run
    return result


def check(result: dict[str, Any], entry: str, also_fine: tuple[str, ...] = ()) -> None:
    outcomes = result["counts"][entry]
    assert sum(outcomes.values()) == COUNT
    bad = {k: v for k, v in outcomes.items() if k not in ("success", "named_error", *also_fine)}
    examples = [e for e in result["examples"] if e.startswith(f"{entry} ")]
    assert not bad, (bad, examples)


@pytest.mark.parametrize("entry", ["merge", "inspect", "to_lora"])
def test_torch_free_readers_end_in_success_or_a_named_error(fuzz_result: dict[str, Any], entry: str) -> None:
    check(fuzz_result, entry)


def test_from_pretrained_ends_in_success_or_a_named_error(fuzz_result: dict[str, Any]) -> None:
    # errors raised inside PEFT's own readers and checks are PEFT's, as without vblora_rs; everything our hooks and
    # load_packed raise is a VBLoRAError naming the file, or the adapter's tensor or config field
    check(fuzz_result, "from_pretrained", also_fine=("peft_reader_error",))
