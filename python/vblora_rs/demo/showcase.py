"""The second half of the demo, the same for any model: what this package does that PEFT does not.

The trained adapter is saved in every format, sizes side by side with the exactly equivalent plain LoRA
(``vblora to-lora``); the packed file is loaded back; ``vblora merge`` (torch-free, streaming) merges it into
the base model's safetensors folder; the merged model must give the adapter model's logits (and greedy
answers, when the caller can generate), its weights must equal an in-memory ``merge_and_unload`` bit for bit,
and PEFT must load the LoRA export and give the adapter model's outputs.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from ..errors import VBLoRAError
from . import adapter_calls

FLOAT32_EPS = torch.finfo(torch.float32).eps
# A merged weight is one rounding of W + BA; the same sum from softmax weights a last bit apart may round to
# the next float32, one eps of the tensor's largest magnitude at most, or two.
WEIGHT_EPS = 2.0


@dataclass
class Inputs:
    """A batch the logits are compared on (right-padded; the mask marks real tokens)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor


@dataclass
class Model:
    """What the checks need to know of the model beside the adapter: how to load a saved folder, its
    longest reduction (for tolerances), and optionally how to answer the demo's prompts greedily."""

    load: Callable[[str], nn.Module]
    layers: int
    reduction: int
    answer: Optional[Callable[[nn.Module], list[str]]] = None


def file_bytes(folder: str) -> tuple[int, int]:
    """(bytes, stored numbers) of the one weights file in ``folder``; a packed file stores the same numbers as
    PEFT's top-K file (its indices just take fewer bits each)."""
    from safetensors import safe_open

    from ..convert.packed import read_packed
    from ..storage.names import PACKED_WEIGHTS_NAME

    path = next(os.path.join(folder, n) for n in sorted(os.listdir(folder)) if n.endswith(".safetensors"))
    if os.path.basename(path) == PACKED_WEIGHTS_NAME:
        return os.path.getsize(path), sum(t.numel() for t in read_packed(path)[1].values())
    values = 0
    with safe_open(path, framework="pt") as fh:
        for key in fh.keys():  # noqa: SIM118 (safe_open has no __iter__)
            values += math.prod(fh.get_slice(key).get_shape())
    return os.path.getsize(path), values


def save_every_format(model: nn.Module, out_dir: str, rank: int) -> dict[str, str]:
    """Save the adapter in every format plus its LoRA export; print stored numbers and bytes of each. Returns
    the folders by format (``"lora"`` for the export)."""
    from ..convert.lora import export_lora

    labels = {
        adapter_calls.FULL: "PEFT, full logits",
        adapter_calls.TOPK: "PEFT, top-K",
        adapter_calls.PACKED: "packed (lossless)",
        adapter_calls.PACKED_HALF: "packed, half precision",
        "lora": f"plain LoRA, r={rank}",
    }
    folders = {fmt: os.path.join(out_dir, f"adapter_{fmt}") for fmt in labels}
    for fmt in adapter_calls.FORMATS:
        adapter_calls.save_adapter(model, folders[fmt], fmt)
    export_lora(folders[adapter_calls.PACKED], folders["lora"], force=True)
    lora_bytes = file_bytes(folders["lora"])[0]
    print(f"   {'format':<24} {'stored numbers':>14} {'bytes':>12} {'vs LoRA':>8}")
    for fmt, label in labels.items():
        size, values = file_bytes(folders[fmt])
        print(f"   {label:<24} {values:>14,d} {size:>12,d} {size / lora_bytes:>7.1%}")
    return folders


def same_tensors_as_topk(packed_dir: str, topk_dir: str) -> tuple[int, int]:
    """(tensors equal bit for bit, tensors) between the packed file, decoded, and PEFT's top-K file."""
    from safetensors.torch import load_file

    from ..convert.packed import read_packed
    from ..storage.names import PACKED_WEIGHTS_NAME, WEIGHTS_NAME

    decoded = read_packed(os.path.join(packed_dir, PACKED_WEIGHTS_NAME))[1]
    stored = load_file(os.path.join(topk_dir, WEIGHTS_NAME))
    same = sum(k in decoded and decoded[k].dtype == v.dtype and torch.equal(decoded[k], v) for k, v in stored.items())
    return same, len(set(stored) | set(decoded))


def merge_folder(base_dir: str, adapter_dir: str, out_dir: str) -> None:
    """What ``vblora merge BASE ADAPTER -o OUT --force`` does, called as the library it is."""
    from ..merge import merge

    merge(base_dir, [adapter_dir], out_dir, force=True)


@torch.no_grad()
def logits(model: nn.Module, inputs: Inputs) -> torch.Tensor:
    """Logits at the real (unpadded) positions."""
    out = model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask).logits
    return out[inputs.attention_mask.bool()]


def logits_tolerance(model: Model, reference: torch.Tensor) -> float:
    """How far two float32 evaluations of the same function may drift apart: a merged weight rounds ``W + BA``
    once where the adapter model rounds ``xW`` and ``xAB`` apart, a relative error of order ``eps * sqrt(K)``
    per reduction of length K, and each of the L layers passes its error on. Scaled to the logits' size."""
    return model.layers * math.sqrt(model.reduction) * FLOAT32_EPS * float(reference.abs().max())


def _compare(name: str, got: torch.Tensor, want: torch.Tensor, tolerance: float) -> float:
    diff = float((got - want).abs().max())
    verdict = "bit for bit" if torch.equal(got, want) else f"max |diff| {diff:.2e} (tolerance {tolerance:.1e})"
    print(f"   {name}: {verdict}")
    if not diff <= tolerance:
        raise VBLoRAError(f"demo check failed: {name} differ from the adapter model's by {diff:.3e}")
    return diff


def compare_weights(merged: nn.Module, reference: nn.Module) -> tuple[int, int, float]:
    """(tensors equal bit for bit, tensors, worst difference in units of its tensor's largest magnitude times
    float32's eps) between two models' state dicts."""
    a, b = merged.state_dict(), reference.state_dict()
    if a.keys() != b.keys():
        raise VBLoRAError("demo check failed: the merged model's tensors are not the base model's")
    worst = 0.0
    for key in a:
        if not torch.equal(a[key], b[key]):
            scale = float(b[key].abs().max()) * FLOAT32_EPS
            worst = max(worst, float((a[key] - b[key]).abs().max()) / scale)
    return sum(torch.equal(a[k], b[k]) for k in a), len(a), worst


def run_checks(
    adapter_model: nn.Module,
    model: Model,
    base_dir: str,
    out_dir: str,
    rank: int,
    inputs: Inputs,
    answers: Optional[list[str]] = None,
) -> dict[str, float]:
    """Sizes, packed reload, ``vblora merge``, LoRA export: print each result and raise ``VBLoRAError`` on a
    failed check. ``answers`` are the adapter model's greedy answers, compared with the merged model's."""
    print(f"3. the adapter in each storage format (in {out_dir})")
    folders = save_every_format(adapter_model, out_dir, rank)
    want = logits(adapter_model, inputs)
    tolerance = logits_tolerance(model, want)
    results: dict[str, float] = {"bytes_packed": float(file_bytes(folders[adapter_calls.PACKED])[0])}
    results["bytes_lora"] = float(file_bytes(folders["lora"])[0])

    print("4. the packed file loaded back, merged with `vblora merge` (torch-free) into the saved base model")
    same, total = same_tensors_as_topk(folders[adapter_calls.PACKED], folders[adapter_calls.TOPK])
    print(f"   packed file holds PEFT's top-K tensors bit for bit: {same} of {total}")
    if same != total:
        raise VBLoRAError(f"demo check failed: {total - same} tensors of the packed file differ from PEFT's top-K file")
    reloaded = adapter_calls.load_adapter(model.load(base_dir), folders[adapter_calls.PACKED])
    # top-K files keep k-1 weights and take the last as 1 minus their sum: an ulp away from the softmax
    results["reload_diff"] = _compare("reloaded packed adapter, logits", logits(reloaded, inputs), want, tolerance)
    merged_dir = os.path.join(out_dir, "merged")
    start = time.perf_counter()
    merge_folder(base_dir, folders[adapter_calls.PACKED], merged_dir)
    print(f"   `vblora merge` wrote {merged_dir} in {time.perf_counter() - start:.1f} s")
    merged = model.load(merged_dir)
    results["merge_diff"] = _compare("merged model, logits", logits(merged, inputs), want, tolerance)
    in_memory = adapter_calls.merge_in_memory(reloaded)
    equal, total, worst = compare_weights(merged, in_memory)
    # Rust's exp/ln in the top-K softmax are not torch's: a weight may round the other way in its last bit
    rest = f", the others within {worst:.1f} eps of their largest weight" if equal < total else ""
    print(f"   merged weights against merge_and_unload in memory: {equal} of {total} tensors bit for bit{rest}")
    if not worst <= WEIGHT_EPS:
        raise VBLoRAError(f"demo check failed: merged weights differ from merge_and_unload's by {worst:.1f} eps")
    del in_memory, reloaded
    if model.answer is not None and answers is not None:
        merged_answers = model.answer(merged)
        same = sum(a == b for a, b in zip(merged_answers, answers))
        print(f"   merged model, greedy answers: {same} of {len(answers)} the same as the adapter model's")
        for got, wanted in zip(merged_answers, answers):
            if got != wanted:
                print(f"     merged: {got!r}\n     adapter: {wanted!r}")
        if same != len(answers):
            raise VBLoRAError("demo check failed: the merged model answers differently")
    del merged

    print("5. `vblora to-lora`, loaded by PEFT as a plain LoRA adapter")
    lora = adapter_calls.load_lora_with_peft(model.load(base_dir), folders["lora"])
    results["lora_diff"] = _compare("PEFT LoRA model, logits", logits(lora, inputs), want, tolerance)
    return results
