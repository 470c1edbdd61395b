"""The package's one exception type for bad values, and how I/O failures are reported.

``VBLoRAError`` is created by the Rust extension (so kernel errors and Python-side checks raise the
same class) and subclasses ``ValueError``, so code that catches ``ValueError`` keeps working: a bad
argument, a malformed file, a value that would overflow. Its message names the file, tensor,
argument or row at fault.

A failure of the operating system (a missing file, no permission, a full disk, a name too long) is
not a ``VBLoRAError``: the extension raises the ``OSError`` that Python's own ``open()`` would,
``OSError(errno, strerror, filename)``, so it arrives as the matching subclass (``FileNotFoundError``,
``PermissionError``, ...; a full disk is ``OSError`` with ``errno.ENOSPC``), ``filename`` the file
concerned and ``strerror`` ending in what was being done, e.g. ``"No space left on device (writing)"``.
Callers that report errors to a user catch ``(VBLoRAError, OSError)``.
"""

from ._native import VBLoRAError

__all__ = ["VBLoRAError"]
