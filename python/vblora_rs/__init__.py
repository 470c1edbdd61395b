"""vblora_rs: VB-LoRA (vector-bank LoRA) for PyTorch with Rust CPU kernels, checkpoint-compatible with PEFT.

from vblora_rs import VBLoRAConfig, get_peft_model
model = get_peft_model(model, VBLoRAConfig(target_modules=["q_proj", "v_proj"], vector_length=64))

The public names are imported lazily (PEP 562): ``import vblora_rs`` alone does not import torch, so the
command line tools that need only numpy and the Rust extension (``vblora merge``) start fast and small.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._native import __version__
from .errors import VBLoRAError

if TYPE_CHECKING:
    from .config import VBLoRAConfig
    from .layer import Linear, VBLoRALayer
    from .lora_cache import get_lora_cache_size, set_lora_cache_size
    from .model import PeftModel, VBLoRAModel, get_peft_model
    from .modules_to_save import ModulesToSaveWrapper
    from .ops import get_num_threads, set_num_threads
    from .optim import create_optimizer, param_groups
    from .trainer import VBLoRATrainer
    from .tuner import VBLoRATuner

# public name -> the submodule that defines it
_LAZY = {
    "Linear": ".layer",
    "ModulesToSaveWrapper": ".modules_to_save",
    "PeftModel": ".model",
    "VBLoRAConfig": ".config",
    "VBLoRALayer": ".layer",
    "VBLoRAModel": ".model",
    "VBLoRATrainer": ".trainer",
    "VBLoRATuner": ".tuner",
    "create_optimizer": ".optim",
    "get_lora_cache_size": ".lora_cache",
    "get_num_threads": ".ops",
    "get_peft_model": ".model",
    "param_groups": ".optim",
    "set_lora_cache_size": ".lora_cache",
    "set_num_threads": ".ops",
}

__all__ = [
    "Linear",
    "ModulesToSaveWrapper",
    "PeftModel",
    "VBLoRAConfig",
    "VBLoRAError",
    "VBLoRALayer",
    "VBLoRAModel",
    "VBLoRATrainer",
    "VBLoRATuner",
    "__version__",
    "create_optimizer",
    "get_lora_cache_size",
    "get_num_threads",
    "get_peft_model",
    "param_groups",
    "set_lora_cache_size",
    "set_num_threads",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    if not name.startswith("_"):  # a submodule, e.g. vblora_rs.ops after a bare `import vblora_rs`
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
