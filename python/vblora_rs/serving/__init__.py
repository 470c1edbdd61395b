"""Serving VB-LoRA adapters with vLLM, by name (see docs/serving.md).

vLLM serves LoRA adapters only. This room gives it VB-LoRA adapters: a ``LoRAResolver`` (:mod:`.resolver`),
registered by a plugin in vLLM's ``vllm.general_plugins`` entry-point group (:mod:`.plugin`), finds the
adapter a request names in the configured folders, checks it against the served model, converts it to the
exactly equivalent LoRA (``vblora to-lora``'s path) into a content-addressed, size-bounded cache
(:mod:`.lora_cache`) and hands vLLM a ``LoRARequest`` for the result.

Only :mod:`.plugin` (when vLLM loads it), :mod:`.resolver` and :mod:`.offline` import vLLM; :mod:`.lora_cache`
and :mod:`.base_model` do not, and nothing outside this room imports any of them.
"""
