"""Training VB-LoRA adapters: optimizer groups with the paper's learning rates (:mod:`.optim`) and FSDP2 helpers
(:mod:`.fsdp`). Both work on models built by PEFT with our classes."""
