"""The mutation fuzzer (tests/fuzz_adapters.py) in a child process under an address-space limit: every mutant
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

import vblora_rs

PYTHON_DIR = os.path.dirname(os.path.dirname(vblora_rs.__file__))
# torch alone maps a few GiB of address space; a mutant that makes anything allocate far beyond its file's size
# fails inside this limit with an error the fuzzer counts, instead of taking the machine's memory.
MEMORY_LIMIT = 12 * 2**30


def test_mutants_end_in_success_or_a_named_error() -> None:
    count = int(os.environ.get("VBLORA_FUZZ_MUTANTS", "60"))
    seed = int(os.environ.get("VBLORA_FUZZ_SEED", "0"))

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))

    done = subprocess.run(
        [sys.executable, str(Path(__file__).parent / "fuzz_adapters.py"), str(count), str(seed)],
        env={**os.environ, "PYTHONPATH": PYTHON_DIR, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=3600,
        preexec_fn=limit,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    counts = result["counts"]
    print(json.dumps(counts, indent=1))  # shown with -s: the outcome counts of this run
    for entry, outcomes in counts.items():
        assert sum(outcomes.values()) == count, entry
    bad = {e: {k: v for k, v in o.items() if k not in ("success", "named_error")} for e, o in counts.items()}
    assert not any(bad.values()), (bad, result["examples"])
