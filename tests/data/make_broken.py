"""Writes the hand-made hostile files of ``tests/data/broken/`` (deterministic: same bytes on every run).

    python tests/data/make_broken.py [OUT_DIR]      # default: tests/data/broken next to this script

Everything is built here in plain Python (struct + json), independently of vblora_rs, for a tiny adapter that fits
``support.models.make_mlp()`` with ``target_modules=["lin0", "lin1"]`` (lin0 16->32, lin1 32->24), r=2, num_vectors=30,
vector_length=8, topk=2:

* ``peft_valid/`` and ``packed_valid.safetensors``: the same adapter as a PEFT top-K folder and as a packed file (the
  packed one written by this script's own bit packer, so tests also cross-check the Rust encoder's layout);
* ``peft_<case>/``: PEFT-format folders, each broken in one way;
* ``packed_<case>.safetensors``: packed files, each broken in one way;
* ``cases.json``: for every broken case, its path and the names (tensor, metadata field or file) its error must give.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import sys
from typing import Callable

R, NUM_VECTORS, VECTOR_LENGTH, TOPK = 2, 30, 8, 2
BITS = 5  # ceil(log2(30))
MODULES = [("lin0", R, 16 // VECTOR_LENGTH, 32 // VECTOR_LENGTH), ("lin1", R, 32 // VECTOR_LENGTH, 24 // VECTOR_LENGTH)]
PREFIX = "base_model.model."
BANK = "base_model.vblora_vector_bank"
CONFIG = {
    "auto_mapping": None,
    "base_model_name_or_path": None,
    "bias": "none",
    "exclude_modules": None,
    "fan_in_fan_out": False,
    "inference_mode": True,
    "init_logits_std": 0.1,
    "init_vector_bank_bound": 0.02,
    "layers_pattern": None,
    "layers_to_transform": None,
    "modules_to_save": None,
    "num_vectors": NUM_VECTORS,
    "peft_type": "VBLORA",
    "r": R,
    "revision": None,
    "save_only_topk_weights": True,
    "target_modules": ["lin0", "lin1"],
    "task_type": None,
    "topk": TOPK,
    "vblora_dropout": 0.0,
    "vector_length": VECTOR_LENGTH,
}

# A tensor as this script handles it: (safetensors dtype, shape, raw little-endian bytes).
Tensor = tuple[str, list[int], bytes]
_FORMATS = {"F32": "f", "F16": "e", "U8": "B", "I8": "b", "I16": "h", "I32": "i", "I64": "q"}


def pack_values(dtype: str, values: list) -> bytes:
    return struct.pack(f"<{len(values)}{_FORMATS[dtype]}", *values)


def unpack_values(dtype: str, data: bytes) -> list:
    size = struct.calcsize(_FORMATS[dtype])
    return list(struct.unpack(f"<{len(data) // size}{_FORMATS[dtype]}", data))


def safetensors_bytes(tensors: dict[str, Tensor], metadata: dict[str, str] | None) -> bytes:
    """A safetensors file: tensors laid out in the given order (callers put 4-byte dtypes first)."""
    header: dict = {"__metadata__": metadata} if metadata is not None else {}
    offset, blobs = 0, []
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + b"".join(blobs)


def split(data: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join(header: dict, rest: bytes) -> bytes:
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + rest


def pack_bits(indices: list[int], bits: int) -> bytes:
    """The format's definition: index j at stream bits j*bits.., LSB first within each byte, zero padded."""
    out = bytearray((len(indices) * bits + 7) // 8)
    for j, v in enumerate(indices):
        for t in range(bits):
            if (v >> t) & 1:
                p = j * bits + t
                out[p // 8] |= 1 << (p % 8)
    return bytes(out)


class Adapter:
    """The valid adapter: per module and grid, the top-K indices and first k-1 weights, and the bank."""

    def __init__(self, seed: int = 1234) -> None:
        rng = random.Random(seed)
        self.grids: list[tuple[str, list[int], list[list[int]], list[float]]] = []  # key, grid shape, idx, w
        for name, r, in_sub, out_sub in MODULES:
            for grid, shape in (("A", [r, in_sub]), ("B", [out_sub, r])):
                n = shape[0] * shape[1]
                idx = [rng.sample(range(NUM_VECTORS), TOPK) for _ in range(n)]
                # the largest of two softmax weights, rounded to float32 as PEFT stores it
                w = [struct.unpack("<f", struct.pack("<f", 0.5 + 0.5 * rng.random()))[0] for _ in range(n)]
                self.grids.append((f"{PREFIX}{name}.vblora_logits_{grid}", shape, idx, w))
        self.bank = [round(rng.uniform(-0.02, 0.02), 6) for _ in range(NUM_VECTORS * VECTOR_LENGTH)]

    def peft_tensors(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {BANK: ("F32", [NUM_VECTORS, VECTOR_LENGTH], pack_values("F32", self.bank))}
        for key, shape, _, w in self.grids:
            out[key + "_topk_weights"] = ("F32", [*shape, TOPK - 1], pack_values("F32", w))
        for key, shape, idx, _ in self.grids:
            flat = [i for row in idx for i in row]
            out[key + "_topk_indices"] = ("U8", [*shape, TOPK], pack_values("U8", flat))
        return out

    def packed_parts(self) -> tuple[dict[str, Tensor], dict[str, str]]:
        indices = [i for _, _, idx, _ in self.grids for row in idx for i in row]
        weights = [x for _, _, _, w in self.grids for x in w]
        s = len(weights)
        tensors: dict[str, Tensor] = {
            "vector_bank": ("F32", [NUM_VECTORS, VECTOR_LENGTH], pack_values("F32", self.bank)),
            "topk_weights": ("F32", [s, TOPK - 1], pack_values("F32", weights)),
            "topk_indices": ("U8", [(s * TOPK * BITS + 7) // 8], pack_bits(indices, BITS)),
        }
        metadata = {
            "format": "pt",
            "vblora_packed": "1",
            "num_vectors": str(NUM_VECTORS),
            "vector_length": str(VECTOR_LENGTH),
            "topk": str(TOPK),
            "index_bits": str(BITS),
            "indices_dtype": "uint8",
            "key_prefix": PREFIX,
            "modules": json.dumps([list(m) for m in MODULES], separators=(",", ":")),
            "config": json.dumps(CONFIG, sort_keys=True, separators=(",", ":")),
        }
        return tensors, metadata


def replace_values(tensor: Tensor, at: int, values: list) -> Tensor:
    dtype, shape, data = tensor
    current = unpack_values(dtype, data)
    current[at : at + len(values)] = values
    return dtype, shape, pack_values(dtype, current)


# --- PEFT-format folders ------------------------------------------------------------------------------------------

A0 = f"{PREFIX}lin0.vblora_logits_A"
B1 = f"{PREFIX}lin1.vblora_logits_B"


def peft_cases(adapter: Adapter) -> dict[str, tuple[Callable[[dict, dict], bytes | None], list[str]]]:
    """case -> (edit of (tensors, config) returning the weights file bytes, or None to write them as edited;
    the names the error must give)."""
    valid = safetensors_bytes(adapter.peft_tensors(), {"format": "pt"})
    header, rest = split(valid)

    def offsets_lie(t: dict, c: dict) -> bytes:
        h = json.loads(json.dumps(header))
        h[A0 + "_topk_weights"]["data_offsets"][1] += 4
        return join(h, rest)

    def set_tensor(key: str, tensor: Tensor) -> Callable[[dict, dict], None]:
        return lambda t, c: t.__setitem__(key, tensor)

    def edit_weights(key: str, at: int, values: list) -> Callable[[dict, dict], None]:
        return lambda t, c: t.__setitem__(key, replace_values(t[key], at, values))

    def set_config(**fields: object) -> Callable[[dict, dict], None]:
        return lambda t, c: c.update(fields)

    idx_a0 = adapter.peft_tensors()[A0 + "_topk_indices"]
    n_a0 = len(idx_a0[2])
    return {
        "truncated": (lambda t, c: valid[:-10], ["adapter_model.safetensors"]),
        "header_length_lie": (lambda t, c: (10**12).to_bytes(8, "little") + valid[8:], ["adapter_model.safetensors"]),
        "offsets_lie": (offsets_lie, ["adapter_model.safetensors"]),
        "shape_not_fitting": (
            lambda t, c: t.update(
                {
                    A0 + "_topk_indices": ("U8", [2, 3, 2], pack_values("U8", [0, 1] * 6)),
                    A0 + "_topk_weights": ("F32", [2, 3, 1], pack_values("F32", [0.75] * 6)),
                }
            ),
            [A0],
        ),
        "indices_float_dtype": (
            set_tensor(A0 + "_topk_indices", ("F32", [2, 2, 2], pack_values("F32", [1.0] * 8))),
            [A0 + "_topk_indices"],
        ),
        "index_too_big": (
            set_tensor(A0 + "_topk_indices", replace_values(idx_a0, 3, [NUM_VECTORS])),
            [A0 + "_topk_indices"],
        ),
        "index_negative": (
            set_tensor(A0 + "_topk_indices", ("I16", [2, 2, 2], pack_values("I16", [0] * (n_a0 - 1) + [-1]))),
            [A0 + "_topk_indices"],
        ),
        "weights_nan": (edit_weights(B1 + "_topk_weights", 2, [float("nan")]), [B1 + "_topk_weights"]),
        "weights_inf": (edit_weights(B1 + "_topk_weights", 0, [float("inf")]), [B1 + "_topk_weights"]),
        "weights_negative": (edit_weights(B1 + "_topk_weights", 1, [-0.25]), [B1 + "_topk_weights"]),
        "weights_sum_above_one": (edit_weights(B1 + "_topk_weights", 5, [1.5]), [B1 + "_topk_weights"]),
        "bank_wrong_shape": (
            set_tensor(BANK, ("F32", [NUM_VECTORS, 4], pack_values("F32", [0.0] * NUM_VECTORS * 4))),
            [BANK],
        ),
        "bank_int_dtype": (
            set_tensor(BANK, ("I32", [NUM_VECTORS, VECTOR_LENGTH], pack_values("I32", [0] * NUM_VECTORS * 8))),
            [BANK],
        ),
        "missing_bank": (lambda t, c: t.pop(BANK), [BANK]),
        "missing_weights": (lambda t, c: t.pop(B1 + "_topk_weights"), [B1 + "_topk_weights"]),
        "vector_length_not_dividing": (set_config(vector_length=5), ["adapter_config.json", "vector_length"]),
        "unknown_peft_type": (set_config(peft_type="LORA"), ["adapter_config.json", "peft_type"]),
        "bad_json": (lambda t, c: None, ["adapter_config.json"]),
    }


def write_peft_folder(folder: str, tensors: dict[str, Tensor], config: dict | str, weights: bytes | None) -> None:
    os.makedirs(folder)
    text = config if isinstance(config, str) else json.dumps(config, indent=2, sort_keys=True) + "\n"
    with open(os.path.join(folder, "adapter_config.json"), "w", encoding="utf-8") as fh:
        fh.write(text)
    data = weights if weights is not None else safetensors_bytes(tensors, {"format": "pt"})
    with open(os.path.join(folder, "adapter_model.safetensors"), "wb") as fh:
        fh.write(data)


# --- packed files -------------------------------------------------------------------------------------------------


def packed_cases(adapter: Adapter) -> dict[str, tuple[bytes, list[str]]]:
    tensors, metadata = adapter.packed_parts()
    valid = safetensors_bytes(tensors, metadata)
    header, rest = split(valid)

    def with_meta(**fields: str | None) -> bytes:
        meta = {k: v for k, v in {**metadata, **fields}.items() if v is not None}
        return safetensors_bytes(tensors, meta)

    def with_tensor(name: str, tensor: Tensor | None) -> bytes:
        edited = {k: v for k, v in {**tensors, name: tensor}.items() if v is not None}
        return safetensors_bytes(edited, metadata)

    def with_header(edit: Callable[[dict], None]) -> bytes:
        h = json.loads(json.dumps(header))
        edit(h)
        return join(h, rest)

    def stretch_weights(h: dict) -> None:
        h["topk_weights"]["data_offsets"][1] += 8

    bank, weights, packed = tensors["vector_bank"], tensors["topk_weights"], tensors["topk_indices"]
    s = weights[1][0]
    # index 1 (stream bits 5..9) set to 31 >= num_vectors
    too_big = bytearray(packed[2])
    too_big[0] |= 0b1110_0000
    too_big[1] |= 0b0000_0011
    padded = bytearray(packed[2])
    padded[-1] |= 0x80  # 26 * 2 * 5 = 260 bits: the last byte's top 4 bits are padding
    config = dict(CONFIG)
    return {
        "truncated": (valid[:-7], ["not a readable safetensors file"]),
        "header_length_lie": ((1 << 40).to_bytes(8, "little") + valid[8:], ["not a readable safetensors file"]),
        "offsets_lie": (with_header(stretch_weights), ["not a readable safetensors file"]),
        "weights_shape": (with_tensor("topk_weights", ("F32", [s // 2, 2], weights[2])), ["topk_weights"]),
        "indices_dtype": (with_tensor("topk_indices", ("I8", packed[1], packed[2])), ["topk_indices"]),
        "indices_length": (with_tensor("topk_indices", ("U8", [len(packed[2]) - 1], packed[2][:-1])), ["topk_indices"]),
        "bank_int_dtype": (with_tensor("vector_bank", ("I32", bank[1], bank[2])), ["vector_bank"]),
        "bank_wrong_shape": (
            with_tensor("vector_bank", ("F32", [VECTOR_LENGTH, NUM_VECTORS], bank[2])),
            ["vector_bank"],
        ),
        "bank_nan": (with_tensor("vector_bank", replace_values(bank, 17, [float("nan")])), ["vector_bank"]),
        "index_too_big": (with_tensor("topk_indices", ("U8", packed[1], bytes(too_big))), ["topk_indices", "lin0"]),
        "pad_bits": (with_tensor("topk_indices", ("U8", packed[1], bytes(padded))), ["topk_indices"]),
        "weights_nan": (with_tensor("topk_weights", replace_values(weights, 3, [float("nan")])), ["topk_weights"]),
        "weights_inf": (with_tensor("topk_weights", replace_values(weights, 3, [float("inf")])), ["topk_weights"]),
        "weights_negative": (
            with_tensor("topk_weights", replace_values(weights, 20, [-0.5])),
            ["topk_weights", "lin1"],
        ),
        "weights_sum_above_one": (with_tensor("topk_weights", replace_values(weights, 0, [1.25])), ["topk_weights"]),
        "missing_bank": (with_tensor("vector_bank", None), ["vector_bank"]),
        "missing_indices": (with_tensor("topk_indices", None), ["topk_indices"]),
        "missing_weights": (with_tensor("topk_weights", None), ["topk_weights"]),
        "version_2": (with_meta(vblora_packed="2"), ["vblora_packed"]),
        "not_packed": (safetensors_bytes(tensors, {"format": "pt"}), ["vblora_packed"]),
        "num_vectors_not_a_number": (with_meta(num_vectors="thirty"), ["num_vectors"]),
        "topk_too_big": (with_meta(topk="31"), ["topk"]),
        "index_bits_wrong": (with_meta(index_bits="6"), ["index_bits"]),
        "indices_dtype_unknown": (with_meta(indices_dtype="float32"), ["indices_dtype"]),
        "modules_bad_json": (with_meta(modules='[["lin0",2,2]'), ["modules"]),
        "modules_huge": (with_meta(modules='[["lin0",1048576,1048576,1]]'), ["topk_indices"]),
        "modules_missing": (with_meta(modules=None), ["modules"]),
        "config_bad_json": (with_meta(config="{not json"), ["config"]),
        "config_unknown_peft_type": (
            with_meta(config=json.dumps({**config, "peft_type": "LORA"}, separators=(",", ":"))),
            ["config", "peft_type"],
        ),
        "config_vector_length_mismatch": (
            with_meta(config=json.dumps({**config, "vector_length": 5}, separators=(",", ":"))),
            ["vector_length"],
        ),
    }


def main(out: str) -> None:
    if os.path.exists(out):
        # only ever replace an earlier output of this script
        if os.listdir(out) and not os.path.isfile(os.path.join(out, "cases.json")):
            raise SystemExit(f"{out} exists and is not an output of this script; not touching it")
        shutil.rmtree(out)
    os.makedirs(out)
    adapter = Adapter()
    cases: dict[str, dict] = {}

    write_peft_folder(os.path.join(out, "peft_valid"), adapter.peft_tensors(), CONFIG, None)
    for name, (edit, names) in peft_cases(adapter).items():
        tensors, config = adapter.peft_tensors(), dict(CONFIG)
        weights = edit(tensors, config)
        text = "{not json\n" if name == "bad_json" else config
        folder = f"peft_{name}"
        write_peft_folder(os.path.join(out, folder), tensors, text, weights if isinstance(weights, bytes) else None)
        cases[folder] = {"kind": "peft", "names": names}

    tensors, metadata = adapter.packed_parts()
    with open(os.path.join(out, "packed_valid.safetensors"), "wb") as fh:
        fh.write(safetensors_bytes(tensors, metadata))
    for name, (data, names) in packed_cases(adapter).items():
        file = f"packed_{name}.safetensors"
        with open(os.path.join(out, file), "wb") as fh:
            fh.write(data)
        cases[file] = {"kind": "packed", "names": names}

    with open(os.path.join(out, "cases.json"), "w", encoding="utf-8") as fh:
        json.dump(cases, fh, indent=1, sort_keys=True)
        fh.write("\n")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)), "broken"))
