#!/usr/bin/env python3
"""Compare two harness runs per test id.

usage: compare.py A B [--lines N]
  A, B: run directories (runs/peft-..., runs/latest-backend) or their results.json files.
Prints the regressions (passed in A, anything else in B) with the first lines of B's error text,
then the tests that improved, changed in other ways, or ran in only one of the runs.
Exit status: 1 if there are regressions or ids without a result in B, else 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def load(path_arg: str) -> tuple[Path, dict[str, dict[str, str]], list[str]]:
    path = Path(path_arg)
    run_dir = path if path.is_dir() else path.parent
    results_file = run_dir / "results.json"
    if not results_file.exists():
        sys.exit(f"error: {results_file} does not exist (did the run abort before testing? see {run_dir}/pytest.log)")
    results = json.loads(results_file.read_text())
    selected_file = run_dir / "selected.txt"
    selected = [s for s in selected_file.read_text().splitlines() if s] if selected_file.exists() else []
    return run_dir.resolve(), results, selected


def tests_source(run_dir: Path) -> str:
    summary = run_dir / "summary.txt"
    if summary.exists():
        for line in summary.read_text().splitlines():
            if line.startswith("tests: "):
                return line.removeprefix("tests: ")
    return "?"


def error_head(text: str, n: int) -> list[str]:
    """The most telling lines of a pytest failure: the `E ` lines if any, else the last lines."""
    lines = text.splitlines()
    e_lines = [ln for ln in lines if ln.startswith("E ")]
    picked = e_lines[:n] if e_lines else lines[-n:]
    # the location line (path:lineno: Exception) closes pytest's long representation
    loc = [ln for ln in lines if ln.startswith(("peft/tests/", "tests/", "/")) and ": " in ln]
    if loc:
        picked.append(loc[-1])
    return [ln[:240] for ln in picked]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", help="baseline run (e.g. runs/latest-peft)")
    ap.add_argument("b", help="candidate run (e.g. runs/latest-backend)")
    ap.add_argument("--lines", type=int, default=6, help="error lines per regression (default 6)")
    args = ap.parse_args()

    dir_a, res_a, sel_a = load(args.a)
    dir_b, res_b, sel_b = load(args.b)
    print(f"A = {dir_a}\nB = {dir_b}")
    src_a, src_b = tests_source(dir_a), tests_source(dir_b)
    if src_a != src_b:
        print(f"WARNING: A and B ran different PEFT test sources ({src_a} vs {src_b}); ids may not line up")

    def outcome(res: dict[str, dict[str, str]], tid: str) -> str:
        return res[tid]["outcome"] if tid in res else "NO RESULT"

    ids = sorted(set(sel_a or res_a) | set(sel_b or res_b))
    only_a = [t for t in ids if t in (sel_a or res_a) and t not in (sel_b or res_b)]
    only_b = [t for t in ids if t in (sel_b or res_b) and t not in (sel_a or res_a)]
    common = [t for t in ids if t not in only_a and t not in only_b]

    regressions = [t for t in common if outcome(res_a, t) == "passed" and outcome(res_b, t) != "passed"]
    improved = [t for t in common if outcome(res_a, t) != "passed" and outcome(res_b, t) == "passed"]
    other = [
        t for t in common if t not in regressions and t not in improved and outcome(res_a, t) != outcome(res_b, t)
    ]
    no_result_b = [t for t in common if t not in res_b]

    for name, res in (("A", res_a), ("B", res_b)):
        counts: dict[str, int] = {}
        for r in res.values():
            counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
        print(f"{name}: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))
    print(f"common ids: {len(common)}; only in A: {len(only_a)}; only in B: {len(only_b)}")

    print(f"\n=== REGRESSIONS: passed in A, not in B ({len(regressions)}) ===")
    for t in regressions:
        print(f"\n- {t}  [{outcome(res_b, t)}]")
        if t in res_b:
            for ln in error_head(res_b[t]["text"], args.lines):
                print(f"    {ln}")

    print(f"\n=== improved: not passing in A, passing in B ({len(improved)}) ===")
    for t in improved:
        print(f"- {t}  [A: {outcome(res_a, t)}]")
    print(f"\n=== other outcome changes ({len(other)}) ===")
    for t in other:
        print(f"- {t}  [A: {outcome(res_a, t)} -> B: {outcome(res_b, t)}]")
    for label, lst in (("only in A", only_a), ("only in B", only_b)):
        if lst:
            print(f"\n=== {label} ({len(lst)}) ===")
            for t in lst:
                print(f"- {t}")
    print(f"\nsummary: {len(regressions)} regressions, {len(improved)} improved, {len(other)} other changes")
    return 1 if regressions or no_result_b else 0


if __name__ == "__main__":
    sys.exit(main())
