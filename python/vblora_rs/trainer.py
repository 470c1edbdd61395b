"""``VBLoRATrainer``: transformers' ``Trainer`` that checkpoints a VB-LoRA model as it does a PEFT model.

``Trainer`` saves models it does not know (anything but ``PreTrainedModel`` and ``peft.PeftModel``) as their raw
``state_dict`` with safetensors, which refuses tensors that share memory: the shared vector bank appears under
every adapted layer's key, exactly as in PEFT's state dict. For a ``PeftModel`` it calls ``save_pretrained``,
writing the adapter alone; this subclass does the same for ours, so ``save_strategy`` and ``save_model`` work.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch
from transformers import Trainer
from transformers.trainer import TRAINING_ARGS_NAME


class VBLoRATrainer(Trainer):
    """A ``transformers.Trainer`` whose checkpoints of a VB-LoRA model are adapter folders (``save_pretrained``),
    loadable with ``PeftModel.from_pretrained`` (ours or PEFT's)."""

    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict[str, Any]] = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if not hasattr(model, "peft_config"):
            super()._save(output_dir, state_dict)
            return
        model.save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
