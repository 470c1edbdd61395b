"""JSON files (adapter_config.json, config.json, model.safetensors.index.json) read with one set of errors."""

from __future__ import annotations

import json
from typing import Any

from ..errors import VBLoRAError

# The files read here are flat or a few levels deep; deeper nesting is refused before Python's parser recurses
# into it (a RecursionError otherwise).
MAX_DEPTH = 64


def nesting_depth(text: str) -> int:
    """The deepest nesting of ``[`` / ``{`` in JSON ``text``, outside strings (linear in the text)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def parse_object(text: str, source: str) -> dict[str, Any]:
    """``text`` as a JSON object; ``source`` names it in errors."""
    if nesting_depth(text) > MAX_DEPTH:
        raise VBLoRAError(f"{source}: JSON nested deeper than {MAX_DEPTH} levels")
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError, ValueError) as exc:
        raise VBLoRAError(f"{source}: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise VBLoRAError(f"{source}: expected a JSON object, got {type(data).__name__}")
    return data


def read_object(path: str) -> dict[str, Any]:
    """The JSON object in the file at ``path``; VBLoRAError naming the file otherwise."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise VBLoRAError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise VBLoRAError(f"{path}: is a folder, expected a JSON file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise VBLoRAError(f"{path}: not a readable JSON file: {exc}") from None
    return parse_object(text, path)
