"""Shared by every test folder: torch's thread count, the ``model_case`` fixture, and ``tests/`` on the import
path so that tests import their helpers as ``support.<module>`` (tests/support/: models, tolerances, writers)."""

from __future__ import annotations

import os
import signal
import sys
import warnings
from collections.abc import Iterator

import pytest
import torch

# Some transformers/peft versions warn on import about optional packages; not our concern here.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import peft  # noqa: F401
    import transformers  # noqa: F401

TESTS = os.path.dirname(os.path.abspath(__file__))
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)

from support.models import MODEL_CASES  # noqa: E402

# two threads unless the run asks for its own count (`make py-test-portable` runs on one)
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 0)) or min(2, os.cpu_count() or 1))


@pytest.fixture(params=sorted(MODEL_CASES))
def model_case(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def python_sigint() -> Iterator[None]:
    """Python's own Ctrl-C handler for the test: a process started in the background has SIGINT ignored (and its
    children inherit that), so a test that sends a Ctrl-C to itself or to a child would see nothing happen."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
