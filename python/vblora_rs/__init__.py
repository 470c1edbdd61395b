"""vblora_rs: Rust-accelerated VB-LoRA (vector-bank LoRA) for PEFT, checkpoint-compatible with it.

PEFT owns the model level; vblora_rs gives it faster VB-LoRA classes::

    import vblora_rs
    vblora_rs.apply_to_peft()        # peft.get_peft_model / PeftModel.from_pretrained now use vblora_rs's classes
    model = peft.get_peft_model(model, peft.VBLoRAConfig(target_modules=["q_proj", "v_proj"], vector_length=64))

``from vblora_rs import get_peft_model, PeftModel, VBLoRAConfig`` gives PEFT's own objects with the backend
applied. The public names are imported lazily (PEP 562): ``import vblora_rs`` alone imports neither torch nor
peft, so the command line tools that need only numpy and the Rust extension (``vblora merge``) start fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._native import __version__
from .errors import VBLoRAError

if TYPE_CHECKING:
    from peft import PeftModel, VBLoRAConfig

    from .api import get_peft_model
    from .ops import get_num_threads, set_num_threads
    from .training.optim import create_optimizer, param_groups
    from .tuner.cache import get_lora_cache_size, set_lora_cache_size
    from .tuner.layer import Linear, VBLoRALayer
    from .tuner.model import VBLoRAModel
    from .tuner.packed_adapters import load_packed, save_packed
    from .tuner.peft_backend import apply_to_peft, is_applied, remove_from_peft

# public name -> (module that defines it, whether PEFT must serve VBLORA with our classes once it is used)
_LAZY = {
    "Linear": (".tuner.layer", False),
    "PeftModel": (".api", True),
    "VBLoRAConfig": (".api", True),
    "VBLoRALayer": (".tuner.layer", False),
    "VBLoRAModel": (".tuner.model", False),
    "apply_to_peft": (".tuner.peft_backend", False),
    "create_optimizer": (".training.optim", False),
    "get_lora_cache_size": (".tuner.cache", False),
    "get_num_threads": (".ops", False),
    "get_peft_model": (".api", True),
    "is_applied": (".tuner.peft_backend", False),
    "load_packed": (".tuner.packed_adapters", False),
    "param_groups": (".training.optim", False),
    "remove_from_peft": (".tuner.peft_backend", False),
    "save_packed": (".tuner.packed_adapters", False),
    "set_lora_cache_size": (".tuner.cache", False),
    "set_num_threads": (".ops", False),
}

__all__ = [
    "Linear",
    "PeftModel",
    "VBLoRAConfig",
    "VBLoRAError",
    "VBLoRALayer",
    "VBLoRAModel",
    "__version__",
    "apply_to_peft",
    "create_optimizer",
    "get_lora_cache_size",
    "get_num_threads",
    "get_peft_model",
    "is_applied",
    "load_packed",
    "param_groups",
    "remove_from_peft",
    "save_packed",
    "set_lora_cache_size",
    "set_num_threads",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module_name, applies = _LAZY[name]
        module = importlib.import_module(module_name, __name__)
        if applies:
            importlib.import_module(".tuner.peft_backend", __name__).apply_to_peft()
        value = getattr(module, name)
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
