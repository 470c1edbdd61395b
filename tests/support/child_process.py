"""How a test's child process finds the package the tests import (the source tree or site-packages)."""

from __future__ import annotations

import os
import subprocess
import sys

import vblora_rs

PYTHON_DIR = os.path.dirname(os.path.dirname(vblora_rs.__file__))


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment with :data:`PYTHON_DIR` first on ``PYTHONPATH``, and ``extra`` set on top."""
    path = os.pathsep.join(p for p in (PYTHON_DIR, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def run_python(code: str, *args: str, timeout: float, **extra: str) -> subprocess.CompletedProcess[str]:
    """``python -c code *args`` in a child with :func:`child_env` (``extra`` set on top), its output as text."""
    return subprocess.run(
        [sys.executable, "-c", code, *args], env=child_env(**extra), capture_output=True, text=True, timeout=timeout
    )
