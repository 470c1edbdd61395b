"""``vblora inspect ADAPTER [--json] [--plot FILE.png]``: what a VB-LoRA adapter holds and what it costs on disk.

Sizes are computed, not estimated: each storage format is a set of tensor columns (keys, dtype, shapes) from which
the safetensors file is sized exactly as the safetensors crate writes it (header JSON included,
:mod:`vblora_rs.storage.header_size`), so the row of the adapter's own format equals its file size. Everything is
computed from the adapter's summary (:mod:`.adapter_summary`): per-module numbers are arrays, so a packed file
listing 300k modules is inspected in seconds. Another format is one more function in :data:`FORMATS`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from .._gc_pause import collector_paused
from ..errors import VBLoRAError
from ..storage.header_size import Columns, header_bytes
from ..storage.names import BANK_KEY, MODEL_PREFIX, TOPK_INDICES, TOPK_WEIGHTS, index_bits
from .adapter_summary import ITEMSIZE, ST_TO_TORCH, Summary, read_summary, st_dtype

__all__ = ["FORMATS", "FormatSize", "TensorSpec", "build_report", "histogram", "safetensors_header_bytes", "st_dtype"]

PEFT_METADATA = {"format": "pt"}  # what PEFT (and vblora_rs, and to-lora) write into __metadata__
LOGITS_A, LOGITS_B = ".vblora_logits_A", ".vblora_logits_B"
# Parts of a file, in the order tables list them.
PARTS = ("bank", "logits", "indices", "weights", "lora_A", "lora_B", "extras", "header")


# --- exact safetensors sizes ------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    """A tensor as a safetensors file stores it; ``part`` says which row of the size breakdown it counts in."""

    key: str
    dtype: str  # safetensors name, e.g. "F32"
    shape: tuple[int, ...]
    part: str

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]


def spec_columns(specs: list[TensorSpec]) -> list[Columns]:
    """A few tensors of any shapes as columns, one per dtype."""
    by_dtype: dict[str, list[TensorSpec]] = {}
    for spec in specs:
        by_dtype.setdefault(spec.dtype, []).append(spec)
    return [
        Columns.of_keys(
            dtype,
            [s.key for s in group],
            np.array([len(",".join(map(str, s.shape))) for s in group], dtype=np.int64),
            np.array([s.nbytes for s in group], dtype=np.int64),
        )
        for dtype, group in by_dtype.items()
    ]


def safetensors_header_bytes(specs: list[TensorSpec], metadata: Optional[dict[str, str]]) -> int:
    """Bytes before the tensor data of a safetensors file holding ``specs``: the 8-byte length, then the header
    JSON (``__metadata__`` first, tensors with dtype, shape and data_offsets; no spaces) padded with spaces to a
    multiple of 8, as the safetensors crate (0.4 to 0.8) writes it."""
    return header_bytes(spec_columns(specs), metadata)


@dataclass(frozen=True)
class FormatSize:
    """Bytes of one storage format of the adapter, by part; ``total`` is the file size."""

    name: str
    parts: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.parts.values())


@dataclass
class Part:
    """Tensors of one part of a format: columns, and their bytes (summed here once)."""

    name: str
    columns: list[Columns]

    @property
    def nbytes(self) -> int:
        return sum(int(c.nbytes.sum()) for c in self.columns)


def size_of(name: str, parts: list[Part], metadata: Optional[dict[str, str]]) -> FormatSize:
    sizes = dict.fromkeys(PARTS, 0)
    for part in parts:
        sizes[part.name] += part.nbytes
    sizes["header"] = header_bytes([c for part in parts for c in part.columns], metadata)
    return FormatSize(name, sizes)


# --- the formats ------------------------------------------------------------------------------------


def _module_columns(s: Summary, suffix: str, dtype: str, *dims: np.ndarray) -> Columns:
    """One tensor per module, ``MODEL_PREFIX + name + suffix``, of shape ``dims`` (a column each)."""
    dims = tuple(np.broadcast_to(np.asarray(d, dtype=np.int64), s.in_sub.shape) for d in dims)
    nbytes = np.prod(np.stack(dims), axis=0) * ITEMSIZE[dtype]
    # the prefix and suffix are plain ASCII: each adds its length to the name's JSON bytes
    key_bytes = s.name_json_bytes + len(MODEL_PREFIX) + len(suffix)
    shape_chars = Columns.shape_text_chars(*dims)
    return Columns(dtype, key_bytes, shape_chars, nbytes, lambda: [f"{MODEL_PREFIX}{n}{suffix}" for n in s.names])


def _common_parts(s: Summary, bank_key: str = BANK_KEY, bank_dtype: Optional[str] = None) -> list[Part]:
    """The bank (under ``bank_key``, in ``bank_dtype`` if given) and the extras: the same tensors in every format
    that keeps them."""
    cfg = s.config
    bank = TensorSpec(bank_key, bank_dtype or s.bank_dtype, (cfg.num_vectors, cfg.vector_length), "bank")
    return [Part("bank", spec_columns([bank])), _extras_part(s)]


def _extras_part(s: Summary) -> Part:
    return Part("extras", spec_columns([TensorSpec(k, d, shape, "extras") for k, d, shape in s.extras]))


def full_logits_size(s: Summary) -> FormatSize:
    """PEFT's default file: every logit of every sub-vector."""
    r, nv = s.config.r, s.config.num_vectors
    logits = [
        _module_columns(s, LOGITS_A, s.value_dtype, r, s.in_sub, nv),
        _module_columns(s, LOGITS_B, s.value_dtype, s.out_sub, r, nv),
    ]
    metadata = s.file_metadata if s.storage == "full" else PEFT_METADATA
    return size_of("full logits", [*_common_parts(s), Part("logits", logits)], metadata)


def peft_topk_size(s: Summary) -> FormatSize:
    """PEFT's ``save_only_topk_weights`` file: k indices and k-1 weights per sub-vector."""
    r, k = s.config.r, s.config.topk
    indices, weights = [], []
    for logits, lead in ((LOGITS_A, (r, s.in_sub)), (LOGITS_B, (s.out_sub, r))):
        indices.append(_module_columns(s, logits + TOPK_INDICES, s.index_dtype, *lead, k))
        weights.append(_module_columns(s, logits + TOPK_WEIGHTS, s.value_dtype, *lead, k - 1))
    metadata = s.file_metadata if s.storage == "topk" else PEFT_METADATA
    return size_of("PEFT top-K", [*_common_parts(s), Part("indices", indices), Part("weights", weights)], metadata)


def lora_size(s: Summary) -> FormatSize:
    """The same adapter as plain LoRA of the same rank, float32 A and B: what ``vblora to-lora`` writes."""
    r, L = s.config.r, s.config.vector_length
    parts = [
        _extras_part(s),
        Part("lora_A", [_module_columns(s, ".lora_A.weight", "F32", r, s.in_sub * L)]),
        Part("lora_B", [_module_columns(s, ".lora_B.weight", "F32", s.out_sub * L, r)]),
    ]
    return size_of("LoRA float32", parts, PEFT_METADATA)


def _packed_metadata(s: Summary) -> dict[str, str]:
    """The ``__metadata__`` ``vblora pack`` writes for the adapter (a packed file's own, as it is)."""
    from ..storage.packed_arrays import stored_config_json

    if s.storage == "packed" and s.file_metadata is not None:
        return s.file_metadata
    cfg = s.config
    modules = [[n, cfg.r, int(a), int(b)] for n, a, b in zip(s.names, s.in_sub, s.out_sub)]
    return {
        "format": "pt",
        "vblora_packed": "1",
        "num_vectors": str(cfg.num_vectors),
        "vector_length": str(cfg.vector_length),
        "topk": str(cfg.topk),
        "index_bits": str(index_bits(cfg.num_vectors)),
        "indices_dtype": ST_TO_TORCH[s.index_dtype],
        "key_prefix": MODEL_PREFIX,
        "modules": json.dumps(modules, separators=(",", ":"), ensure_ascii=False),
        "config": stored_config_json(cfg),
    }


def _packed_size(s: Summary, half: Optional[str], name: str) -> FormatSize:
    """The packed file (docs/packed-format.md): bank, bit-packed indices, k-1 weights per sub-vector, extras."""
    cfg = s.config
    subs = int(s.sub_vectors.sum())
    nbytes = (subs * cfg.topk * index_bits(cfg.num_vectors) + 7) // 8
    value_dtype = half or s.value_dtype
    parts = [
        *_common_parts(s, "vector_bank", half),
        Part("indices", spec_columns([TensorSpec("topk_indices", "U8", (nbytes,), "indices")])),
        Part("weights", spec_columns([TensorSpec("topk_weights", value_dtype, (subs, cfg.topk - 1), "weights")])),
    ]
    return size_of(name, parts, _packed_metadata(s))


def packed_size(s: Summary) -> FormatSize:
    """vblora_rs's packed file (``vblora pack``): indices bit-packed, weights and bank as stored."""
    return _packed_size(s, None, "packed")


def packed_half_size(s: Summary) -> FormatSize:
    """The lossy packed file (``vblora pack --half float16``): bank and weights in float16."""
    return _packed_size(s, "F16", "packed float16")


# Every format the adapter can be sized in, each a function of the adapter's summary.
FORMATS: list[Callable[[Summary], FormatSize]] = [
    full_logits_size,
    peft_topk_size,
    packed_size,
    packed_half_size,
    lora_size,
]
STORAGE_FORMAT = {"full": "full logits", "topk": "PEFT top-K", "packed": "packed"}


# --- bank usage -------------------------------------------------------------------------------------


def histogram(counts: list[int], max_bins: int = 12) -> list[tuple[int, int, int]]:
    """``(low, high, vectors)``: how many bank vectors are selected between low and high times (inclusive).
    Unused vectors get a bin of their own; the rest share at most ``max_bins - 1`` equal-width bins."""
    top = max(counts, default=0)
    bins = [(0, 0)]
    if top > 0:
        width = max(1, -(-top // (max_bins - 1)))
        bins += [(lo, min(lo + width - 1, top)) for lo in range(1, top + 1, width)]
    return [(lo, hi, sum(1 for c in counts if lo <= c <= hi)) for lo, hi in bins]


# --- the report -------------------------------------------------------------------------------------


def build_report(s: Summary) -> dict[str, Any]:
    """Everything ``inspect`` shows, as plain JSON-able data."""
    usage = s.usage
    formats = [fmt(s) for fmt in FORMATS]
    order = sorted(range(len(usage.counts)), key=lambda i: (-usage.counts[i], i))
    L = s.config.vector_length
    return {
        "adapter": {
            "weights_path": s.weights_path,
            "storage": s.storage,
            "format": STORAGE_FORMAT[s.storage],
            "file_bytes": os.path.getsize(s.weights_path),
        },
        "config": s.config.to_dict(),
        "modules": [
            {"module": name, "shape": [out_sub * L, in_sub * L], "sub_vectors": subs, "stored_bytes": stored}
            for name, out_sub, in_sub, subs, stored in zip(
                s.names, s.out_sub.tolist(), s.in_sub.tolist(), s.sub_vectors.tolist(), s.stored_bytes.tolist()
            )
        ],
        "formats": [{"name": f.name, "parts": f.parts, "total": f.total} for f in formats],
        "bank_usage": {
            "num_vectors": len(usage.counts),
            "sub_vectors": usage.sub_vectors,
            "selections": sum(usage.counts),
            "unused": usage.unused,
            "mean_top1_weight": usage.mean_top1_weight,
            "counts": usage.counts,
            "histogram": [{"low": lo, "high": hi, "vectors": n} for lo, hi, n in histogram(usage.counts)],
            "most_selected": [[i, usage.counts[i]] for i in order[:5]],
        },
    }


def _table(rows: list[list[str]], right: set[int]) -> list[str]:
    """Rows as aligned lines (columns ``right`` right-aligned), padded a column at a time: a table may have a row
    per module, hundreds of thousands of them."""
    columns = []
    for i, cells in enumerate(zip(*rows)):
        width = max(map(len, cells))
        columns.append([c.rjust(width) for c in cells] if i in right else [c.ljust(width) for c in cells])
    return ["  ".join(cells).rstrip() for cells in zip(*columns)]


def render_text(report: dict[str, Any]) -> str:
    info, cfg, usage = report["adapter"], report["config"], report["bank_usage"]
    lines = [f"adapter: {info['weights_path']} ({info['format']}, {info['file_bytes']:,d} bytes)", "", "config:"]
    lines += [f"  {key}: {value}" for key, value in cfg.items()]

    mods = report["modules"]
    rows = [["module", "shape (out, in)", "sub-vectors", "stored bytes"]]
    rows += [
        [m["module"], f"({m['shape'][0]}, {m['shape'][1]})", f"{m['sub_vectors']:,d}", f"{m['stored_bytes']:,d}"]
        for m in mods
    ]
    rows.append(
        [
            f"{len(mods)} modules",
            "",
            f"{sum(m['sub_vectors'] for m in mods):,d}",
            f"{sum(m['stored_bytes'] for m in mods):,d}",
        ]
    )
    lines += ["", f"modules ({info['format']}):", *("  " + s for s in _table(rows, {2, 3}))]

    parts = [p for p in PARTS if any(f["parts"][p] for f in report["formats"])]
    rows = [["format", *parts, "total"]]
    rows += [[f["name"], *(f"{f['parts'][p]:,d}" for p in parts), f"{f['total']:,d}"] for f in report["formats"]]
    lines += ["", "bytes by part (header: 8-byte length + JSON, padded to 8):"]
    lines += ["  " + s for s in _table(rows, set(range(1, len(parts) + 2)))]
    own = next(f for f in report["formats"] if f["name"] == info["format"])
    check = "equal" if own["total"] == info["file_bytes"] else "DIFFERENT"
    lines.append(f"  file on disk: {info['file_bytes']:,d} bytes ({check} to the {info['format']} row)")

    lines += [
        "",
        f"bank usage: {usage['selections']:,d} selections (topk={cfg['topk']} x {usage['sub_vectors']:,d} sub-vectors) "
        f"of {usage['num_vectors']:,d} vectors; {usage['unused']:,d} unused "
        f"({100 * usage['unused'] / usage['num_vectors']:.1f}%); mean top-1 weight {usage['mean_top1_weight']:.4f}",
    ]
    peak = max((b["vectors"] for b in usage["histogram"]), default=0) or 1
    rows = [["selected", "vectors", ""]]
    for b in usage["histogram"]:
        span = str(b["low"]) if b["low"] == b["high"] else f"{b['low']}-{b['high']}"
        rows.append([f"{span}x", f"{b['vectors']:,d}", "#" * round(40 * b["vectors"] / peak)])
    lines += ["  " + s for s in _table(rows, {1})]
    lines.append("  most selected: " + ", ".join(f"#{i} ({n}x)" for i, n in usage["most_selected"]))
    return "\n".join(lines)


# --- plot -------------------------------------------------------------------------------------------


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise VBLoRAError("--plot needs matplotlib, which is not installed (pip install 'vblora-rs[plot]')") from exc


def plot_report(report: dict[str, Any], path: str) -> None:
    """Bank usage (sub-vectors selecting each bank vector), as a PNG written atomically to ``path``."""
    _require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = report["bank_usage"]["counts"]
    # (Stored bytes per layer were drawn here too; every layer of a VB-LoRA adapter stores the same number of
    # indices and weights per sub-vector, so that panel was flat by construction.)
    fig, ax_bank = plt.subplots(1, 1, figsize=(10, 4), layout="constrained")
    ax_bank.bar(range(len(counts)), counts, width=1.0)
    ax_bank.set(
        title=f"bank usage: {report['bank_usage']['unused']} of {len(counts)} vectors unused",
        xlabel="bank vector",
        ylabel="sub-vectors selecting it",
    )
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".plot.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)


# --- command ----------------------------------------------------------------------------------------


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="show a VB-LoRA adapter's config, modules, exact bytes per storage format and bank usage",
        description="Print the config, a per-module table, the exact file size by part of the adapter in full "
        "logits, PEFT top-K, packed (lossless and float16) and float32 LoRA form, and how often each bank vector "
        "is selected.",
    )
    parser.add_argument(
        "adapter", help="VB-LoRA adapter folder (PEFT's adapter_model.safetensors or a packed file) or its weights file"
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--plot", metavar="FILE.png", help="also draw the bank usage (needs the plot extra)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.plot:
        _require_matplotlib()  # before the work, not after
    with collector_paused():  # a few objects per module, no cycles
        report = build_report(read_summary(args.adapter))
        text = json.dumps(report, indent=2) if args.json else render_text(report)
    print(text)
    if args.plot:
        plot_report(report, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0
