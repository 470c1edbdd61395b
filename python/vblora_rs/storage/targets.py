"""THE rule deciding which modules an adapter config targets (torch-free), PEFT's ``check_target_module_exists``
with the same fields and order: ``exclude_modules``, then ``modules_to_save`` (never adapted), then
``target_modules`` (a string is a regex full-matched against the module name; a list matches a name equal to an
entry or ending in ``.<entry>``), narrowed by ``layers_to_transform`` / ``layers_pattern`` (list targets only,
as in PEFT). The tuner decides injection with it and ``vblora merge`` decides which of a file's modules to merge,
so the model side and the command line agree on every file.

A config whose ``target_modules`` is ``None`` or ``"all-linear"`` names no modules by itself: PEFT resolves it
from the model (its type's default list, or its linear layers) before saving, so saved configs hold a list; for
such a config :func:`targets_named` is False and the file's modules are what it targets.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

TARGETED = "targeted"
EXCLUDED = "excluded"  # excluded by exclude_modules or modules_to_save (PEFT reports these apart)
NOT_TARGETED = "not targeted"
ALL_LINEAR = "all-linear"


def targets_named(config: Mapping[str, Any]) -> bool:
    """Whether ``config`` names its targets itself (a list or a regex), so the rule can be applied to names."""
    targets = config.get("target_modules")
    return targets is not None and targets != ALL_LINEAR


def _listed(names: Any, key: str) -> bool:
    return key in names or any(key.endswith(f".{name}") for name in names)


def _layer_index(config: Mapping[str, Any], key: str) -> Any:
    """The layer number in ``key`` PEFT reads for ``layers_to_transform`` (the first numbered segment, after one
    of ``layers_pattern`` when given), or None."""
    patterns = config.get("layers_pattern")
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        match = None
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    return None if match is None else int(match.group("idx"))


def module_status(config: Mapping[str, Any], key: str) -> str:
    """:data:`TARGETED`, :data:`EXCLUDED` or :data:`NOT_TARGETED` for module ``key`` (its dotted path in the
    model) under ``config`` (a checked adapter config as a mapping: a dict, or ``vars()`` of PEFT's config)."""
    exclude = config.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, key):
                return EXCLUDED
        elif _listed(exclude, key):
            return EXCLUDED
    to_save = config.get("modules_to_save")
    if to_save and any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in to_save):
        return EXCLUDED
    targets = config.get("target_modules")
    if targets is None:
        return NOT_TARGETED
    if isinstance(targets, str):
        return TARGETED if re.fullmatch(targets, key) else NOT_TARGETED
    if key in targets:
        return TARGETED
    if not any(key.endswith(f".{t}") for t in targets):
        return NOT_TARGETED
    layers = config.get("layers_to_transform")
    if layers is None or (isinstance(layers, list) and not layers):
        return TARGETED
    index = _layer_index(config, key)
    if index is None:
        return NOT_TARGETED
    hit = index == layers if isinstance(layers, int) else index in layers
    return TARGETED if hit else NOT_TARGETED


def untargeted_reason(config: Mapping[str, Any], key: str) -> str:
    """Why module ``key`` is not targeted, naming the config field (for the messages of every reader)."""
    status = module_status(config, key)
    if status == EXCLUDED:
        return "the config excludes it (exclude_modules or modules_to_save)"
    targets = config.get("target_modules")
    if isinstance(targets, str) or not any(key == t or key.endswith(f".{t}") for t in targets or ()):
        return f"target_modules={_shown(targets)} does not match it"
    layers, pattern = config.get("layers_to_transform"), config.get("layers_pattern")
    return f"layers_to_transform={layers!r}{f' (layers_pattern={pattern!r})' if pattern else ''} leaves it out"


def _shown(targets: Any) -> str:
    return repr(sorted(targets)) if isinstance(targets, (list, set, tuple)) else repr(targets)
