"""The served base model's linear layers, and the check of a converted LoRA against them (no vLLM here).

The shapes come from the base model's own safetensors headers (no tensor is read): every 2-D ``<module>.weight``
is a candidate LoRA target of shape ``(out, in)``. The converted adapter is checked against them, and against
what vLLM accepts of a PEFT LoRA (rank at most ``max_lora_rank``, no bias, no modules_to_save), so that a
mismatch is refused with a message naming the adapter, the module and both shapes instead of failing inside
vLLM's engine with a generic error.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Optional

from ..errors import VBLoRAError
from ..storage.names import CONFIG_NAME, MODEL_PREFIX, WEIGHTS_NAME

MAX_HEADER_BYTES = 100_000_000  # safetensors readers refuse longer headers
LORA_A = ".lora_A.weight"
LORA_B = ".lora_B.weight"


def read_header(path: str) -> dict[str, dict]:
    """The tensor entries of a safetensors file's header (``{key: {"dtype", "shape", "data_offsets"}}``)."""
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) != 8:
            raise VBLoRAError(f"{path}: too short for a safetensors file")
        size = int.from_bytes(head, "little")
        if size > MAX_HEADER_BYTES:
            raise VBLoRAError(f"{path}: safetensors header of {size:,d} bytes (at most {MAX_HEADER_BYTES:,d})")
        text = fh.read(size)
    try:
        header = json.loads(text)
    except ValueError as exc:
        raise VBLoRAError(f"{path}: safetensors header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise VBLoRAError(f"{path}: safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    return header


@dataclass
class BaseModel:
    """A served model: its name as vLLM knows it, its local folder, architectures and linear layers."""

    name: str
    folder: str
    architectures: list[str]
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)  # module -> (out, in)


def model_folder(name: str) -> str:
    """The local folder of the served model ``name``: itself if it is a folder, else its snapshot in the Hugging
    Face cache (where vLLM downloaded it)."""
    if os.path.isdir(name):
        return os.path.abspath(name)
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name, local_files_only=True, allow_patterns=["*.json", "*.safetensors"])
    except Exception as exc:  # not a repo id, not cached, no huggingface_hub: one answer for the user
        raise VBLoRAError(
            f"served model {name}: no local folder or Hugging Face cache entry to check adapters against ({exc})"
        ) from None


def read_base(name: str) -> BaseModel:
    folder = model_folder(name)
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as fh:
            config = json.load(fh)
    except (OSError, ValueError) as exc:
        raise VBLoRAError(f"served model {name}: cannot read its config.json ({exc})") from None
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not files:
        raise VBLoRAError(f"served model {name}: {folder} holds no .safetensors weights to check adapters against")
    shapes: dict[str, tuple[int, int]] = {}
    for file in files:
        for key, entry in read_header(os.path.join(folder, file)).items():
            shape = entry.get("shape") if isinstance(entry, dict) else None
            if key.endswith(".weight") and isinstance(shape, list) and len(shape) == 2:
                shapes[key[: -len(".weight")]] = (int(shape[0]), int(shape[1]))
    return BaseModel(name, folder, list(config.get("architectures") or []), shapes)


@dataclass(frozen=True)
class LoraShape:
    rank: int
    out_features: int
    in_features: int


def lora_modules(adapter: str, folder: str) -> tuple[dict, dict[str, LoraShape]]:
    """The LoRA config and ``{module: shape}`` of the converted adapter in ``folder``; anything in its weights
    besides ``lora_A`` / ``lora_B`` pairs is refused (vLLM would not apply it)."""
    with open(os.path.join(folder, CONFIG_NAME), encoding="utf-8") as fh:
        config = json.load(fh)
    header = read_header(os.path.join(folder, WEIGHTS_NAME))
    pairs: dict[str, dict[str, list[int]]] = {}
    for key, entry in header.items():
        for tail in (LORA_A, LORA_B):
            if key.startswith(MODEL_PREFIX) and key.endswith(tail):
                module = key[len(MODEL_PREFIX) : -len(tail)]
                pairs.setdefault(module, {})[tail] = list(entry["shape"])
                break
        else:
            raise VBLoRAError(
                f"adapter '{adapter}': holds tensor {key}, which is not a LoRA factor (modules_to_save or bias); "
                "vLLM serves only the low-rank factors"
            )
    out = {}
    for module, parts in sorted(pairs.items()):
        a, b = parts.get(LORA_A), parts.get(LORA_B)
        if a is None or b is None or len(a) != 2 or len(b) != 2 or a[0] != b[1]:
            raise VBLoRAError(f"adapter '{adapter}': module {module} has LoRA factors of shapes {a} and {b}")
        out[module] = LoraShape(a[0], b[0], a[1])
    return config, out


def check_lora(
    adapter: str,
    folder: str,
    base: BaseModel,
    max_lora_rank: int,
    servable: Optional[Collection[str]] = None,
) -> None:
    """Refuse the converted LoRA in ``folder`` (of the VB-LoRA adapter named ``adapter``) where vLLM serving
    ``base`` could not apply it exactly: a module the model lacks, another shape, a rank over
    ``max_lora_rank``, a module name (last component) not in ``servable`` (None: every linear layer), a bias or
    modules_to_save."""
    config, modules = lora_modules(adapter, folder)
    if config.get("bias", "none") != "none":
        raise VBLoRAError(f"adapter '{adapter}': trains biases (bias={config['bias']!r}); vLLM serves no LoRA bias")
    if config.get("modules_to_save"):
        raise VBLoRAError(
            f"adapter '{adapter}': has modules_to_save {config['modules_to_save']}; vLLM serves only LoRA factors"
        )
    for module, shape in modules.items():
        want = base.shapes.get(module)
        if want is None:
            like = next(iter(sorted(base.shapes)), "none")
            raise VBLoRAError(
                f"adapter '{adapter}': module {module} is not a linear layer of the served model {base.name} "
                f"(whose layers are named like {like}); was it trained on another base?"
            )
        got = (shape.out_features, shape.in_features)
        if got != want:
            raise VBLoRAError(
                f"adapter '{adapter}': module {module} has shape (out, in) = {got} in the adapter and {want} in the "
                f"served model {base.name}; was it trained on another base?"
            )
        if servable is not None and module.rsplit(".", 1)[-1] not in servable:
            arch = ", ".join(base.architectures)
            raise VBLoRAError(
                f"adapter '{adapter}': module {module}: vLLM serves LoRA on {base.name} ({arch}) only on modules "
                f"named {sorted(servable)}"
            )
        if shape.rank > max_lora_rank:
            raise VBLoRAError(
                f"adapter '{adapter}': rank r={shape.rank} (module {module}) exceeds the server's "
                f"max_lora_rank={max_lora_rank}; restart vLLM with --max-lora-rank {_rank_setting(shape.rank)}"
            )


# vLLM's accepted --max-lora-rank values (vllm.config.lora.MaxLoRARanks)
_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def _rank_setting(rank: int) -> int:
    return next((r for r in _RANKS if r >= rank), rank)
