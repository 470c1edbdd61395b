"""``vblora inspect ADAPTER [--json] [--plot FILE.png]``: what a VB-LoRA adapter holds and what it costs on disk.

Sizes are computed, not estimated: each storage format is a list of tensor specs (key, dtype, shape) from which
the safetensors file is sized exactly as the safetensors crate writes it (header JSON included), so the row of
the adapter's own format equals its file size. Another format is one more function in :data:`FORMATS`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

from ..errors import VBLoRAError

if TYPE_CHECKING:
    from ..adapter_files import AdapterFile

PEFT_METADATA = {"format": "pt"}  # what PEFT (and vblora_rs, and to-lora) write into __metadata__
# safetensors dtype names in the order of the crate's `Dtype` enum: tensors are laid out by descending dtype,
# then by name, which fixes each tensor's data_offsets and hence the header's length.
_DTYPE_ORDER = (
    "BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ",
    "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64",
)  # fmt: skip
_DTYPE_RANK = {name: i for i, name in enumerate(_DTYPE_ORDER)}
_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "F8_E4M3FNUZ": 1, "F8_E5M2FNUZ": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "C64": 8, "F64": 8, "I64": 8, "U64": 8,
}  # fmt: skip
# torch dtype (str without "torch.") -> safetensors name, as safetensors.torch maps them
_TORCH_TO_ST = {
    "bool": "BOOL", "uint8": "U8", "int8": "I8", "float8_e5m2": "F8_E5M2", "float8_e4m3fn": "F8_E4M3",
    "float8_e8m0fnu": "F8_E8M0", "float8_e4m3fnuz": "F8_E4M3FNUZ", "float8_e5m2fnuz": "F8_E5M2FNUZ",
    "int16": "I16", "uint16": "U16", "float16": "F16", "bfloat16": "BF16", "int32": "I32", "uint32": "U32",
    "float32": "F32", "complex64": "C64", "float64": "F64", "int64": "I64", "uint64": "U64",
}  # fmt: skip
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
        return math.prod(self.shape) * _ITEMSIZE[self.dtype]


def st_dtype(dtype: Any, what: str) -> str:
    """The safetensors name of a torch dtype."""
    name = _TORCH_TO_ST.get(str(dtype).removeprefix("torch."))
    if name is None:
        raise VBLoRAError(f"{what}: dtype {dtype} has no safetensors equivalent")
    return name


def safetensors_header_bytes(specs: list[TensorSpec], metadata: Optional[dict[str, str]]) -> int:
    """Bytes before the tensor data of a safetensors file holding ``specs``: the 8-byte length, then the header
    JSON (``__metadata__`` first, tensors in file order with dtype, shape and data_offsets; no spaces) padded
    with spaces to a multiple of 8, as the safetensors crate (0.4 to 0.8) writes it."""
    entries: dict[str, Any] = {}
    if metadata is not None:
        entries["__metadata__"] = metadata
    offset = 0
    for spec in sorted(specs, key=lambda s: (-_DTYPE_RANK[s.dtype], s.key)):
        entries[spec.key] = {
            "dtype": spec.dtype,
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    length = len(json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
    return 8 + -(-length // 8) * 8


@dataclass(frozen=True)
class FormatSize:
    """Bytes of one storage format of the adapter, by part; ``total`` is the file size."""

    name: str
    parts: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.parts.values())


def size_of(name: str, specs: list[TensorSpec], metadata: Optional[dict[str, str]]) -> FormatSize:
    parts = dict.fromkeys(PARTS, 0)
    for spec in specs:
        parts[spec.part] += spec.nbytes
    parts["header"] = safetensors_header_bytes(specs, metadata)
    return FormatSize(name, parts)


# --- the formats ------------------------------------------------------------------------------------


def _file_metadata(adapter: AdapterFile) -> Optional[dict[str, str]]:
    from safetensors import safe_open

    with safe_open(adapter.weights_path, framework="pt") as fh:
        return fh.metadata()


def _common_specs(adapter: AdapterFile) -> list[TensorSpec]:
    """The bank and the extras: the same tensors in every format that keeps them."""
    from ..checkpoint import BANK_KEY

    specs = [TensorSpec(BANK_KEY, st_dtype(adapter.bank.dtype, BANK_KEY), tuple(adapter.bank.shape), "bank")]
    return specs + _extra_specs(adapter)


def _extra_specs(adapter: AdapterFile) -> list[TensorSpec]:
    return [TensorSpec(k, st_dtype(v.dtype, k), tuple(v.shape), "extras") for k, v in adapter.extras.items()]


def _value_dtype(adapter: AdapterFile) -> str:
    """The dtype PEFT saves logits and top-K weights in (the model's): that of the ones the file holds."""
    name = next(iter(adapter.modules))
    values = adapter.logits(name)[0] if adapter.storage == "full" else adapter.topk(name)[1]
    return st_dtype(values.dtype, name)


def _peft_indices_dtype(num_vectors: int) -> str:
    """PEFT's smallest integer dtype for top-K indices (``checkpoint.indices_dtype``, in safetensors' names)."""
    return "U8" if num_vectors < 2**8 else "I16" if num_vectors < 2**15 else "I32" if num_vectors < 2**31 else "I64"


def full_logits_size(adapter: AdapterFile) -> FormatSize:
    """PEFT's default file: every logit of every sub-vector."""
    from ..adapter_files import LOGITS_A, LOGITS_B, MODULE_PREFIX

    cfg, dtype = adapter.config, _value_dtype(adapter)
    specs = _common_specs(adapter)
    L, nv = cfg.vector_length, cfg.num_vectors
    for name, m in adapter.modules.items():
        specs.append(TensorSpec(MODULE_PREFIX + name + LOGITS_A, dtype, (cfg.r, m.in_features // L, nv), "logits"))
        specs.append(TensorSpec(MODULE_PREFIX + name + LOGITS_B, dtype, (m.out_features // L, cfg.r, nv), "logits"))
    metadata = _file_metadata(adapter) if adapter.storage == "full" else PEFT_METADATA
    return size_of("full logits", specs, metadata)


def peft_topk_size(adapter: AdapterFile) -> FormatSize:
    """PEFT's ``save_only_topk_weights`` file: k indices and k-1 weights per sub-vector."""
    from ..adapter_files import LOGITS_A, LOGITS_B, MODULE_PREFIX
    from ..checkpoint import TOPK_INDICES, TOPK_WEIGHTS

    cfg, dtype = adapter.config, _value_dtype(adapter)
    idx_dtype = _peft_indices_dtype(cfg.num_vectors)
    if adapter.storage == "topk":  # the file's own (PEFT's rule, unless another writer chose otherwise)
        first = adapter.topk(next(iter(adapter.modules)))[0]
        idx_dtype = st_dtype(first.dtype, "top-K indices")
    specs = _common_specs(adapter)
    L, k = cfg.vector_length, cfg.topk
    for name, m in adapter.modules.items():
        for logits, lead in ((LOGITS_A, (cfg.r, m.in_features // L)), (LOGITS_B, (m.out_features // L, cfg.r))):
            key = MODULE_PREFIX + name + logits
            specs.append(TensorSpec(key + TOPK_INDICES, idx_dtype, (*lead, k), "indices"))
            specs.append(TensorSpec(key + TOPK_WEIGHTS, dtype, (*lead, k - 1), "weights"))
    metadata = _file_metadata(adapter) if adapter.storage == "topk" else PEFT_METADATA
    return size_of("PEFT top-K", specs, metadata)


def lora_size(adapter: AdapterFile) -> FormatSize:
    """The same adapter as plain LoRA of the same rank, float32 A and B: what ``vblora to-lora`` writes."""
    from ..adapter_files import MODULE_PREFIX

    r = adapter.config.r
    specs = _extra_specs(adapter)
    for name, m in adapter.modules.items():
        specs.append(TensorSpec(f"{MODULE_PREFIX}{name}.lora_A.weight", "F32", (r, m.in_features), "lora_A"))
        specs.append(TensorSpec(f"{MODULE_PREFIX}{name}.lora_B.weight", "F32", (m.out_features, r), "lora_B"))
    return size_of("LoRA float32", specs, PEFT_METADATA)


def _packed_size(adapter: AdapterFile, half: Optional[Any], name: str) -> FormatSize:
    """The packed file, measured by writing it (its header holds a JSON modules table and the config)."""
    import torch

    from .. import packed
    from ..checkpoint import BANK_KEY

    tensors = adapter.tensors
    if adapter.storage == "full":
        tensors = packed.topk_tensors_from_full(tensors, adapter.config)
    if half is not None:
        # sizes depend on shapes only: a bank beyond float16's range (legal) must not stop the measurement
        limit = float(torch.finfo(half).max)
        tensors = {**tensors, BANK_KEY: tensors[BANK_KEY].clamp(-limit, limit)}
    with tempfile.TemporaryDirectory(prefix="vblora_inspect_") as tmp:
        scratch = os.path.join(tmp, packed.PACKED_WEIGHTS_NAME)
        try:
            report = packed.write_packed(scratch, tensors, adapter.config, half, report_errors=False)
        except VBLoRAError as exc:  # about the adapter, not the scratch file it was measured with
            raise VBLoRAError(f"{adapter.weights_path}: {str(exc).replace(scratch + ': ', '')}") from None
    parts = dict.fromkeys(PARTS, 0)
    parts.update(bank=report.bank_bytes, indices=report.indices_bytes, weights=report.weights_bytes)
    parts["extras"] = sum(spec.nbytes for spec in _extra_specs(adapter))
    parts["header"] = report.header_and_extras_bytes - parts["extras"]
    return FormatSize(name, parts)


def packed_size(adapter: AdapterFile) -> FormatSize:
    """vblora_rs's packed file (``vblora pack``): indices bit-packed, weights and bank as stored."""
    return _packed_size(adapter, None, "packed")


def packed_half_size(adapter: AdapterFile) -> FormatSize:
    """The lossy packed file (``vblora pack --half float16``): bank and weights in float16."""
    import torch

    return _packed_size(adapter, torch.float16, "packed float16")


# Every format the adapter can be sized in, each a function of the adapter.
FORMATS: list[Callable[[AdapterFile], FormatSize]] = [
    full_logits_size,
    peft_topk_size,
    packed_size,
    packed_half_size,
    lora_size,
]
STORAGE_FORMAT = {"full": "full logits", "topk": "PEFT top-K", "packed": "packed"}


# --- bank usage -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BankUsage:
    counts: list[int]  # how many sub-vectors select each bank vector (one of their top-k)
    mean_top1_weight: float  # mean over sub-vectors of the largest of their k weights
    sub_vectors: int

    @property
    def unused(self) -> int:
        return sum(1 for c in self.counts if c == 0)


def bank_usage(adapter: AdapterFile) -> BankUsage:
    """Selections per bank vector: the stored indices (top-K), or the top-k of the logits as PEFT picks them."""
    import torch

    from .. import ops
    from ..progress import bar
    from ..tuner import topk_table as compact

    counts = torch.zeros(adapter.config.num_vectors, dtype=torch.long)
    top1_sum, rows = 0.0, 0
    progress = bar(len(adapter.modules), "bank usage", unit="module")
    for name in adapter.modules:
        progress.update(1)
        if adapter.storage == "full":
            pairs = [ops.topk_softmax(t.contiguous(), adapter.config.topk) for t in adapter.logits(name)]
        else:
            idx_A, w_A, idx_B, w_B = adapter.topk(name)
            pairs = [(idx_A, compact.full_weights(w_A)), (idx_B, compact.full_weights(w_B))]
        for indices, weights in pairs:
            counts += torch.bincount(indices.reshape(-1).long(), minlength=counts.numel())
            top1_sum += float(weights.float().amax(-1).double().sum())
            rows += weights[..., 0].numel()
    progress.close()
    return BankUsage(counts.tolist(), top1_sum / rows if rows else 0.0, rows)


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


def _stored_bytes(adapter: AdapterFile, keys: tuple[str, ...]) -> int:
    """Bytes a module's tensors take in the adapter's file (packed: indices at their bit width, rounded up)."""
    from ..checkpoint import TOPK_INDICES

    if adapter.storage != "packed":
        return sum(adapter.tensors[k].nbytes for k in keys)
    bits = max(1, (adapter.config.num_vectors - 1).bit_length())
    total = 0
    for key in keys:
        t = adapter.tensors[key]
        total += (t.numel() * bits + 7) // 8 if key.endswith(TOPK_INDICES) else t.nbytes
    return total


def build_report(adapter: AdapterFile) -> dict[str, Any]:
    """Everything ``inspect`` shows, as plain JSON-able data."""
    usage = bank_usage(adapter)
    formats = [fmt(adapter) for fmt in FORMATS]
    order = sorted(range(len(usage.counts)), key=lambda i: (-usage.counts[i], i))
    return {
        "adapter": {
            "weights_path": adapter.weights_path,
            "storage": adapter.storage,
            "format": STORAGE_FORMAT[adapter.storage],
            "file_bytes": os.path.getsize(adapter.weights_path),
        },
        "config": adapter.config.to_dict(),
        "modules": [
            {
                "module": m.name,
                "shape": [m.out_features, m.in_features],
                "sub_vectors": m.sub_vectors,
                "stored_bytes": _stored_bytes(adapter, m.keys),
            }
            for m in adapter.modules.values()
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
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(
            cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))
        ).rstrip()
        for row in rows
    ]


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
        raise VBLoRAError(
            "--plot needs matplotlib, which is not installed (pip install 'vblora-rs[plot]')"
        ) from exc


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
    from ..adapter_files import read_adapter

    if args.plot:
        _require_matplotlib()  # before the work, not after
    report = build_report(read_adapter(args.adapter))
    print(json.dumps(report, indent=2) if args.json else render_text(report))
    if args.plot:
        plot_report(report, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0
