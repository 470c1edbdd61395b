#!/usr/bin/env bash
# Run PEFT's own VB-LoRA test cases against plain PEFT or PEFT + the vblora_rs backend.
#
#   ./run.sh peft                 # plain installed peft
#   ./run.sh backend [TREE]       # PYTHONPATH=TREE/python (default: this checkout) + vblora_rs.apply_to_peft()
#
# Extra pytest arguments can follow after `--`, e.g. ./run.sh peft -- -k test_vblora_dtypes
# Environment:
#   TESTS=sdist (default)  PEFT's tests from the peft 0.21.2 sdist (= the installed peft version)
#   TESTS=snapshot         PEFT's tests from the git mirror snapshot 5d602fd (0.20.1.dev0, Aug 2026)
#   JOBS=N                 pytest-xdist with N workers, if xdist is installed (default: serial)
#   TEST_TIMEOUT=S         per-test timeout when pytest-timeout is installed (default 600)
#   HARNESS_HUB_RETRIES=keep  keep huggingface_hub's retry backoff (default: 0 retries, see README.txt)
#   HARNESS_HUB_CACHE=DIR  hub cache of the tiny test models (default: ./hub_cache, built by build_hub_cache.py)
# Output: runs/<mode>-<tests>-<UTC stamp>/ with env.txt, selected.txt, results.json, summary.txt,
#         junit.xml, pytest.log (-rA); runs/latest-<mode> points at the newest one of that mode.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
MODE="${1:-}"
shift || true
TREE=""
if [[ "$MODE" == "backend" ]]; then
    if [[ $# -gt 0 && "$1" != "--" ]]; then TREE="$1"; shift; fi
    TREE="$(cd "${TREE:-$HERE/../..}" && pwd)"
elif [[ "$MODE" != "peft" ]]; then
    echo "usage: $0 peft | backend [TREE]  [-- extra pytest args]" >&2
    exit 2
fi
if [[ $# -gt 0 && "$1" == "--" ]]; then shift; fi

TESTS="${TESTS:-sdist}"
case "$TESTS" in
    sdist) SRC="$HERE/sources/sdist-0.21.2"; TESTS_PEFT_VERSION=0.21.2 ;;
    snapshot) SRC="$HERE/sources/snapshot-5d602fd"; TESTS_PEFT_VERSION=0.20.1.dev0 ;;
    *) echo "error: TESTS must be sdist or snapshot, got '$TESTS'" >&2; exit 2 ;;
esac

PY=python3
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
OUT="$HERE/runs/$MODE-$TESTS-$STAMP"
mkdir -p "$OUT"
ln -sfn "$(basename "$OUT")" "$HERE/runs/latest-$MODE"

# Keep torch from oversubscribing the shared 2-core machine.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
# The tiny Hub models the tests load, built locally (no network here); rebuilt when its STAMP is stale.
HUB_CACHE="${HARNESS_HUB_CACHE:-$HERE/hub_cache}"
if ! $PY "$HERE/build_hub_cache.py" --out "$HUB_CACHE" >"$OUT/hub_cache.log" 2>&1; then
    echo "error: building the hub cache failed (see $OUT/hub_cache.log):" >&2
    tail -n 20 "$OUT/hub_cache.log" >&2
    exit 1
fi
export HF_HUB_CACHE="$HUB_CACHE"
export TOKENIZERS_PARALLELISM=false
export HARNESS_OUT="$OUT" HARNESS_TESTS="$TESTS"

# rootdir = the test source, so test ids read tests/test_x.py::... whichever source is used.
ARGS=(-c "$HERE/pytest.ini" --rootdir "$SRC" -p no:cacheprovider -p vblora_harness_plugin
      -rA --junitxml "$OUT/junit.xml" -o junit_family=xunit2)
if [[ "$MODE" == "backend" ]]; then
    if [[ ! -d "$TREE/python/vblora_rs" ]]; then
        echo "error: $TREE/python/vblora_rs does not exist" | tee "$OUT/summary.txt" >&2
        exit 1
    fi
    if ! compgen -G "$TREE/python/vblora_rs/_native*.so" >/dev/null; then
        echo "error: no built extension in $TREE/python/vblora_rs (build it into the tree: cd $TREE &&" \
             "cargo build --release --features python && cp target/release/libvblora_rs.so python/vblora_rs/_native.abi3.so)" \
            | tee "$OUT/summary.txt" >&2
        exit 1
    fi
    export PYTHONPATH="$TREE/python:$HERE${PYTHONPATH:+:$PYTHONPATH}"
    export HARNESS_VBLORA_TREE="$TREE/python"
    ARGS+=(--vblora-backend)
else
    export PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}"
    unset HARNESS_VBLORA_TREE
fi
if [[ -n "${JOBS:-}" ]] && $PY -c "import xdist" 2>/dev/null; then
    ARGS+=(-n "$JOBS")
fi
if $PY -c "import pytest_timeout" 2>/dev/null; then
    ARGS+=(--timeout "${TEST_TIMEOUT:-600}")
fi

T=(tests/test_vblora.py tests/test_custom_models.py tests/test_decoder_models.py
   tests/test_encoder_decoder_models.py tests/test_feature_extraction_models.py)

PEFT_VERSION="$($PY -c 'import peft; print(peft.__version__)')"
{
    echo "mode=$MODE tests=$TESTS tree=${TREE:-none} out=$OUT"
    $PY -c "import sys, torch, transformers, peft; print('python', sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, peft.__file__)"
    echo "PEFT tests from: $(cat "$SRC/SNAPSHOT")"
    echo "hub cache: $HF_HUB_CACHE (stamp $(cut -c1-12 "$HF_HUB_CACHE/STAMP"))"
    if [[ -n "$TREE" ]]; then
        if git -C "$TREE" rev-parse --git-dir >/dev/null 2>&1; then
            echo "tree git: $(git -C "$TREE" rev-parse --short HEAD)," \
                 "$(git -C "$TREE" status --short | wc -l) uncommitted paths"
        else
            echo "tree git: not a git tree"
        fi
    fi
    if [[ "$PEFT_VERSION" != "$TESTS_PEFT_VERSION" ]]; then
        echo "WARNING: installed peft $PEFT_VERSION but these tests belong to peft $TESTS_PEFT_VERSION"
    fi
} | tee "$OUT/env.txt"

START=$(date +%s)
set +e
(cd "$SRC" && $PY -m pytest "${ARGS[@]}" "${T[@]}" "$@") >"$OUT/pytest.log" 2>&1
RC=$?
set -e
END=$(date +%s)
echo "run.sh wall time (s): $((END - START))" >>"$OUT/summary.txt"
echo "pytest rc: $RC (log: $OUT/pytest.log)"
if [[ ! -s "$OUT/results.json" ]]; then
    echo "error: pytest produced no results; last lines of the log:" >&2
    tail -n 30 "$OUT/pytest.log" >&2
    { echo "ABORTED (pytest rc $RC), no results:"; grep -E "^(ERROR|E )" "$OUT/pytest.log" | head -n 5; } >>"$OUT/summary.txt"
    exit "$(( RC == 0 ? 1 : RC ))"
fi
sed -n '1,/^failed ids/p' "$OUT/summary.txt"
exit "$RC"
