"""The names and encodings every adapter file uses, spelled once (torch-free): file names, checkpoint keys, the
top-K index dtype and the packed format's bits per index. The tuner, the command line and the packed format all
read them from here.
"""

from __future__ import annotations

import os
import re

from .. import _native

CONFIG_NAME = "adapter_config.json"
# The adapter's weights file: PEFT's, or our packed single file.
WEIGHTS_NAME = "adapter_model.safetensors"
PACKED_WEIGHTS_NAME = "adapter_packed.safetensors"
PEFT_TYPE = "VBLORA"

# where PEFT puts a module's keys, and the bank's key, in a checkpoint (the adapter name removed)
MODEL_PREFIX = "base_model.model."
BANK_KEY = "base_model.vblora_vector_bank"
# suffixes of a top-K checkpoint's tensors (PEFT's names), after `<module>.vblora_logits_A` / `_B`
TOPK_INDICES = "_topk_indices"
TOPK_WEIGHTS = "_topk_weights"


def cache_root() -> str:
    """The package's cache folder (the demo's converted model, the vLLM plugin's LoRA conversions):
    ``$VBLORA_RS_CACHE``, else ``$XDG_CACHE_HOME/vblora_rs``, else ``~/.cache/vblora_rs``."""
    if os.environ.get("VBLORA_RS_CACHE"):
        return os.environ["VBLORA_RS_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "vblora_rs")


def indices_dtype_name(num_vectors: int) -> str:
    """The integer dtype PEFT stores top-K indices in (the smallest that holds ``num_vectors - 1``), by its numpy /
    torch name: ``uint8``, ``int16``, ``int32`` or ``int64``."""
    if num_vectors < 2**8:
        return "uint8"
    if num_vectors < 2**15:
        return "int16"
    if num_vectors < 2**31:
        return "int32"
    return "int64"


def index_bits(num_vectors: int) -> int:
    """Bits per index in a packed file: ``max(1, ceil(log2(num_vectors)))``, the Rust encoder's own rule."""
    return int(_native.index_bits(num_vectors))


def module_order(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key of a module path in the order people read it: numbered parts by number (``layers.2`` before
    ``layers.10``), the others by text."""
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", name) if part)
