"""A packed adapter file as flat arrays, without torch: what the command line and the early checks read.

A packed file may list any number of modules (a 12 MB file can name 300k), so nothing here builds an object per
module beyond the modules table itself: :func:`read_packed_arrays` gives the decoder's flat ``(S, k)`` indices and
``(S, k-1)`` weights with the table, :func:`unpack` writes PEFT's top-K checkpoint in Rust straight from those
arrays, and :func:`check_modules_known` compares the table (read from the header alone) with a model's modules
before anything is decoded. Every bad file raises VBLoRAError naming it.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import _native
from ..errors import VBLoRAError
from .adapter_config import AdapterConfig, check_config
from .json_file import parse_object

__all__ = [
    "PackedArrays",
    "check_modules_known",
    "config_from_header",
    "encode",
    "first_of_each_rank",
    "read_packed_arrays",
    "stored_config_json",
    "unpack",
]


def config_from_header(
    path: str, metadata: dict[str, str], dims: dict[str, int], module_ranks: Iterable[tuple[str, int]]
) -> AdapterConfig:
    """The config stored in a decoded packed file, checked against its metadata: ``dims`` gives the decoded
    ``num_vectors``, ``vector_length`` and ``topk``; ``module_ranks`` ``(module, r)`` pairs (one per distinct r is
    enough) must all have the config's r."""
    source = f"{path} (metadata field `config`)"
    data = parse_object(metadata["config"], source)
    check_config(data, source)
    config = AdapterConfig.from_dict(data, source=source)
    for name in ("num_vectors", "vector_length", "topk"):
        if getattr(config, name) != dims[name]:
            raise VBLoRAError(
                f"{path}: metadata field `{name}` is {dims[name]} but the stored config says {getattr(config, name)}"
            )
    for module, r in module_ranks:
        if r != config.r:
            raise VBLoRAError(
                f"{path}: metadata field `modules` gives module {module!r} r={r}, the config r={config.r}"
            )
    return config


@dataclass
class PackedArrays:
    """A decoded packed file. ``modules`` rows are ``(path, r, in_sub, out_sub)`` in file order; ``dims`` the same
    numbers as an ``(n, 3)`` int64 array; sub-vector rows of ``indices`` and ``weights`` follow that order (A grid
    then B grid per module). ``weights`` and ``bank`` hold bfloat16 as its uint16 bits (``*_dtype`` names the
    stored dtype)."""

    path: str
    config: AdapterConfig
    metadata: dict[str, str]
    modules: list[tuple[str, int, int, int]]
    dims: np.ndarray
    indices: np.ndarray
    weights: np.ndarray
    weights_dtype: str
    bank: np.ndarray
    bank_dtype: str
    extras: list[tuple[str, str, list[int], bytes]]

    @property
    def sub_vectors(self) -> np.ndarray:
        """Sub-vectors of each module, ``r * (in_sub + out_sub)``."""
        return self.dims[:, 0] * (self.dims[:, 1] + self.dims[:, 2])


def _json_default(value: object) -> object:
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def stored_config_json(config: AdapterConfig) -> str:
    """The ``config`` metadata entry a packed file stores for ``config`` (compact JSON, sorted keys, with
    ``save_only_topk_weights: true``: the file holds top-K data, whatever the source adapter kept)."""
    stored = copy.deepcopy(config)
    stored.save_only_topk_weights = True
    # PEFT's config keeps target_modules as a set; JSON has lists
    return json.dumps(stored.to_dict(), sort_keys=True, separators=(",", ":"), default=_json_default)


def first_of_each_rank(modules: list[tuple[str, int, int, int]]) -> list[tuple[str, int]]:
    """``(path, r)`` of the first module of each distinct rank, in file order."""
    seen: dict[int, str] = {}
    for path, r, _, _ in modules:
        seen.setdefault(r, path)
    return [(path, r) for r, path in seen.items()]


def encode(
    path: str,
    metadata: dict[str, str],
    modules: list[tuple[str, int, int, int]],
    indices: np.ndarray,
    weights: np.ndarray,
    bank: np.ndarray,
    extras: list[tuple[str, str, list[int], bytes]],
) -> int:
    """Write a packed file at ``path`` (atomically, in Rust) from flat arrays laid out as :class:`PackedArrays`
    holds them; returns its size in bytes. Bad values raise VBLoRAError naming ``path`` and the argument."""
    return int(_native.encode_packed(path, metadata, modules, indices, weights, bank, extras))


def read_packed_arrays(path: str) -> PackedArrays:
    """Decode and check the packed file at ``path`` (every index, weight row and bank value, in Rust)."""
    decoded: dict[str, Any] = _native.decode_packed(path)
    modules = decoded["modules"]
    config = config_from_header(path, decoded["metadata"], decoded, first_of_each_rank(modules))
    dims = np.array([m[1:] for m in modules], dtype=np.int64).reshape(len(modules), 3)
    return PackedArrays(
        path=path,
        config=config,
        metadata=decoded["metadata"],
        modules=modules,
        dims=dims,
        indices=decoded["indices"],
        weights=decoded["weights"],
        weights_dtype=decoded["weights_dtype"],
        bank=decoded["bank"],
        bank_dtype=decoded["bank_dtype"],
        extras=decoded["extras"],
    )


def unpack(path: str, target: str) -> tuple[AdapterConfig, int]:
    """Write PEFT's top-K checkpoint of the packed file ``path`` to ``target`` (whole or not at all); returns the
    stored config and the number of modules. Linear in the file: the tensors are slices of the decoded arrays."""
    folder = os.path.dirname(os.path.abspath(target))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".adapter_model.", suffix=".tmp")
    os.close(fd)
    try:
        facts = _native.unpack_packed(path, tmp)
        config = config_from_header(path, facts["metadata"], facts, facts["module_ranks"])
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return config, facts["modules"]


def check_modules_known(path: str, known: Iterable[str], what: str = "the model") -> int:
    """Refuse a packed file listing a module that ``known`` (the module paths of ``what``) lacks, from its header
    alone: before anything is decoded or built per module. Returns the number of modules listed."""
    names = list(known)
    listed, outside, first = _native.packed_modules_outside(path, names)
    if first is not None:
        raise VBLoRAError(
            f"{path}: lists {listed:,d} modules, {outside:,d} of which {what} lacks (the first: module {first!r}); "
            f"{what} has {len(names):,d} modules"
        )
    return listed
