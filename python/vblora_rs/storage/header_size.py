"""The exact length of a safetensors header, from columns of tensors instead of a dict per tensor.

The safetensors crate (0.4 to 0.8) writes an 8-byte length, then the header JSON without spaces: ``__metadata__``
first, then one entry ``"KEY":{"dtype":"D","shape":[..],"data_offsets":[start,end]}`` per tensor, padded with
spaces to a multiple of 8. Data is laid out by descending dtype (the crate's ``Dtype`` order), then by name,
which fixes every entry's offsets and so the header's length. An adapter listing 300k modules has 1.2M such
entries in PEFT's format, so the length is summed from arrays (digit counts, cumulative offsets) rather than by
encoding the JSON: cost linear in the number of tensors (plus one sort of the names when sizes differ).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..errors import VBLoRAError

__all__ = ["DTYPE_ORDER", "Columns", "digits", "header_bytes", "json_string_bytes"]

# safetensors dtype names in the order of the crate's `Dtype` enum (data is laid out by descending rank).
DTYPE_ORDER = (
    "BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ",
    "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64",
)  # fmt: skip
_DTYPE_RANK = {name: i for i, name in enumerate(DTYPE_ORDER)}
# characters JSON escapes (serde_json and Python's json alike)
_ESCAPED = re.compile(r'[\x00-\x1f"\\]')
# one entry without its key, dtype, shape and offsets: {"dtype":"","shape":[],"data_offsets":[,]} plus the colon
_ENTRY_CHARS = len(':{"dtype":"","shape":[],"data_offsets":[,]}')


def digits(values: np.ndarray) -> np.ndarray:
    """Decimal digits of each non-negative integer (0 has one)."""
    values = np.asarray(values, dtype=np.int64)
    out = np.ones(values.shape, dtype=np.int64)
    power = 10
    while True:
        more = values >= power
        if not more.any():
            return out
        out += more
        if power > np.iinfo(np.int64).max // 10:
            return out
        power *= 10


def json_string_bytes(texts: Sequence[str]) -> np.ndarray:
    """UTF-8 bytes of each string JSON-encoded (quotes included, ``ensure_ascii=False``, as serde_json writes it)."""
    lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts)) + 2
    joined = "".join(texts)
    if not joined.isascii() or _ESCAPED.search(joined):  # rare: measure those strings one by one
        for i, text in enumerate(texts):
            if not text.isascii() or _ESCAPED.search(text):
                lengths[i] = len(json.dumps(text, ensure_ascii=False).encode("utf-8"))
    return lengths


@dataclass
class Columns:
    """Tensors of one dtype: the JSON bytes of their keys (quotes included), the characters of their shape lists
    (``"3,4,2"``: 5), their byte sizes, and the keys themselves, built only when the data order depends on them
    (sizes that differ)."""

    dtype: str
    key_bytes: np.ndarray
    shape_chars: np.ndarray
    nbytes: np.ndarray
    keys: Callable[[], list[str]]

    @staticmethod
    def of_keys(dtype: str, keys: list[str], shape_chars: np.ndarray, nbytes: np.ndarray) -> Columns:
        return Columns(dtype, json_string_bytes(keys), shape_chars, nbytes, lambda: keys)

    @staticmethod
    def shape_text_chars(*dims: np.ndarray) -> np.ndarray:
        """Characters of ``"a,b,c"`` for per-tensor dims columns of equal length (no columns: ``""``)."""
        if not dims:
            return np.zeros(0, dtype=np.int64)
        return sum(digits(d) for d in dims) + (len(dims) - 1)


def header_bytes(columns: Sequence[Columns], metadata: Optional[dict[str, str]]) -> int:
    """Bytes before the tensor data of a safetensors file holding ``columns`` (8-byte length + padded JSON)."""
    groups: dict[str, list[Columns]] = {}
    for col in columns:
        groups.setdefault(col.dtype, []).append(col)
    length = 2  # {}
    entries = 0
    if metadata is not None:
        length += len(json.dumps({"__metadata__": metadata}, separators=(",", ":"), ensure_ascii=False).encode()) - 2
        entries += 1
    offset = 0
    for dtype in sorted(groups, key=lambda d: -_DTYPE_RANK[d]):
        cols = groups[dtype]
        count = sum(len(c.nbytes) for c in cols)
        if not count:
            continue
        nbytes = np.concatenate([c.nbytes for c in cols]).astype(np.int64)
        if float(nbytes.sum(dtype=np.float64)) + offset >= 2**62:
            raise VBLoRAError(f"the {dtype} tensors of this format would take more than 2^62 bytes")
        if np.any(nbytes != nbytes[0]):  # equal sizes give the same offsets in any order
            keys = [k for c in cols for k in c.keys()]
            nbytes = nbytes[np.array(sorted(range(count), key=keys.__getitem__), dtype=np.int64)]
        ends = offset + np.cumsum(nbytes)
        starts = ends - nbytes
        length += sum(int(c.key_bytes.sum()) + int(c.shape_chars.sum()) for c in cols)
        length += int(digits(starts).sum() + digits(ends).sum())
        length += count * (_ENTRY_CHARS + len(dtype))
        entries += count
        offset = int(ends[-1])
    length += max(entries - 1, 0)  # commas
    return 8 + -(-length // 8) * 8
