"""vblora_rs: VB-LoRA (vector-bank LoRA) for PyTorch with Rust CPU kernels, checkpoint-compatible with PEFT.

from vblora_rs import VBLoRAConfig, get_peft_model
model = get_peft_model(model, VBLoRAConfig(target_modules=["q_proj", "v_proj"], vector_length=64))
"""

from ._native import __version__
from .config import VBLoRAConfig
from .errors import VBLoRAError
from .layer import Linear, VBLoRALayer
from .model import PeftModel, VBLoRAModel, get_peft_model
from .modules_to_save import ModulesToSaveWrapper
from .ops import get_num_threads, set_num_threads
from .tuner import VBLoRATuner

__all__ = [
    "Linear",
    "ModulesToSaveWrapper",
    "PeftModel",
    "VBLoRAConfig",
    "VBLoRAError",
    "VBLoRALayer",
    "VBLoRAModel",
    "VBLoRATuner",
    "__version__",
    "get_num_threads",
    "get_peft_model",
    "set_num_threads",
]
