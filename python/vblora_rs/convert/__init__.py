"""An adapter's tensors between forms, in torch (no peft): files read into checked tensors
(:mod:`.adapter_tensors`), PEFT's top-K encoding and its exact decoding (:mod:`.topk`), PEFT's top-K tensors and
the packed file (:mod:`.packed`), and the exactly equivalent plain LoRA (:mod:`.lora`). The command line, the
tuner, the demo and the vLLM plugin call these; file names and rules come from :mod:`vblora_rs.storage`.
"""
