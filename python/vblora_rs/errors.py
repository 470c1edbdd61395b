"""The package's one exception type.

``VBLoRAError`` is created by the Rust extension (so kernel errors and Python-side checks raise the
same class) and subclasses ``ValueError``, so code that catches ``ValueError`` keeps working.
"""

from ._native import VBLoRAError

__all__ = ["VBLoRAError"]
