"""The package's rooms and the direction of their imports (docs/architecture.md): every import, lazy ones inside
functions included, points to the importer's own room or a room below it, and the torch-free rooms import
neither torch nor peft."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import vblora_rs

# the package the tests import: the tree's (PYTHONPATH=python) or the installed one (CI installs it)
PACKAGE = Path(vblora_rs.__file__).resolve().parent

# room -> level: a module may import its own room or a room of a lower level
LEVELS = {
    "_native": 0,
    "errors": 0,
    "_progress": 0,
    "_gc_pause": 0,
    "storage": 1,
    "merge": 2,
    "_threads": 2,
    "ops": 3,
    "convert": 4,
    "tuner": 5,
    "training": 6,
    "api": 7,
    "__init__": 7,
    "__main__": 9,
    "demo": 8,
    "serving": 8,
    "cli": 9,
}
TORCH_FREE = ("storage", "merge")


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(module: str, path: Path) -> list[str]:
    """Every module ``module`` imports (absolute names), at any depth of its code."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append(target)
            # `from . import x` / `from .room import y`: x may be a module of its own
            found += [f"{target}.{alias.name}" for alias in node.names]
    return found


def _own_imports() -> list[tuple[str, str]]:
    modules = _modules()
    pairs = []
    for module, path in modules.items():
        for target in _imports(module, path):
            if target.startswith("vblora_rs.") and target in modules or target.startswith("vblora_rs._native"):
                pairs.append((module, target))
    return pairs


def test_every_import_points_down_or_sideways() -> None:
    pairs = _own_imports()
    assert pairs, "found no imports: the package path is wrong"
    upward = [
        f"{a} ({_room(a)}) imports {b} ({_room(b)})"
        for a, b in pairs
        if _room(b) != _room(a) and LEVELS[_room(b)] > LEVELS[_room(a)]
    ]
    assert not upward, "\n".join(upward)


def test_every_room_has_a_level() -> None:
    assert {_room(m) for m in _modules()} <= set(LEVELS)


def test_no_private_name_of_another_module_is_used() -> None:
    """Private names (``_x``) stay in their module: neither ``from mod import _x`` nor ``mod._x`` elsewhere. The
    package's private modules (``_native``, ``_threads``, ...) are the package's own and may be imported."""
    modules = _modules()
    crossing = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        bound = set()  # local names of the package's own modules
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                for a in node.names:
                    private = a.name.startswith("_") and not a.name.startswith("__")
                    target = _imports(module, path)  # resolved below by name only
                    is_module = a.name == "_native" or any(t.endswith("." + a.name) and t in modules for t in target)
                    if is_module and (node.level or (node.module or "").startswith("vblora_rs")):
                        bound.add(a.asname or a.name)
                    elif private and not is_module:
                        crossing.append(f"{module}: from {'.' * node.level}{node.module or ''} import {a.name}")
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in bound
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                crossing.append(f"{module}: {node.value.id}.{node.attr} (line {node.lineno})")
    assert not crossing, "\n".join(crossing)


@pytest.mark.parametrize("room", TORCH_FREE)
def test_torch_free_rooms_import_without_torch(room: str) -> None:
    modules = sorted(m for m in _modules() if _room(m) == room)
    code = (
        "import sys\n"
        "for name in ('torch', 'peft', 'transformers'):\n"
        "    sys.modules[name] = None  # any import of them fails\n"
        f"for m in {modules!r}:\n"
        "    __import__(m)\n"
    )
    env_path = str(PACKAGE.parent)
    result = subprocess.run(
        [sys.executable, "-c", f"import sys; sys.path.insert(0, {env_path!r}); exec({code!r})"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
