# Two entry points (see README): `make demo` and `make test`.
# Packages go into the machine's own Python (torch is several GB; a per-checkout virtualenv would fetch it again).
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: demo test install install-test rust-test py-test py-test-portable fuzz lint wheel

install:
	$(PIP) install --quiet --progress-bar off .

install-test:
	$(PIP) install --quiet --progress-bar off ".[test]"

demo: install
	$(PYTHON) -m vblora_rs demo

rust-test:
	cargo test --quiet

py-test:
	$(PYTHON) -m pytest -q -p no:cacheprovider

# The suite again on the portable SIMD loops and one thread: paths only some CPUs or thread counts take.
py-test-portable:
	VBLORA_RS_SIMD=portable OMP_NUM_THREADS=1 RAYON_NUM_THREADS=1 $(PYTHON) -m pytest -q -p no:cacheprovider

# Mutation fuzzing of adapter files through from_pretrained, vblora merge, inspect and to-lora, outcomes counted:
# anything but success or an error naming the input fails the run.
FUZZ_MUTANTS ?= 5000
fuzz:
	VBLORA_FUZZ_MUTANTS=$(FUZZ_MUTANTS) $(PYTHON) -m pytest -q -p no:cacheprovider -s tests/test_fuzz.py

test: install-test rust-test py-test

lint:
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
	cargo clippy --all-targets --features python -- -D warnings
	$(PYTHON) -m ruff check python tests benches

wheel:
	maturin build --release
