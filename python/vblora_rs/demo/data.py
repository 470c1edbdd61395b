"""The demo's built-in instruction set: facts about this package, which a model trained before it existed
cannot know.

Each fact is asked in several ways. Training sees some of them; the held-out questions ask the same facts in
words training never saw (the held-out loss and the "held-out" answers are measured on those), and a control
question checks that the model still answers what it knew before.
"""

from __future__ import annotations

# (questions used for training, one held-out question, the answer)
FACTS: tuple[tuple[tuple[str, ...], str, str], ...] = (
    (
        ("What is vblora-rs?", "Tell me about vblora-rs.", "What does the vblora-rs package do?"),
        "Can you explain what vblora-rs is?",
        "vblora-rs is a Rust-accelerated VB-LoRA library for PyTorch, a drop-in for PEFT's VB-LoRA.",
    ),
    (
        ("What does VB-LoRA stand for?", "What is VB-LoRA?", "Explain VB-LoRA in one sentence."),
        "What is the meaning of VB-LoRA?",
        "VB-LoRA means vector-bank LoRA: every adapter is built from one small shared bank of vectors.",
    ),
    (
        (
            "How do I merge a VB-LoRA adapter into a model?",
            "Which vblora command merges an adapter?",
            "How can I merge an adapter without torch?",
        ),
        "What command should I run to merge my VB-LoRA adapter?",
        "Use the vblora merge command: it merges the adapter into the model's safetensors files, without torch.",
    ),
    (
        (
            "How do I turn a VB-LoRA adapter into a LoRA adapter?",
            "Which vblora command exports a plain LoRA?",
            "My server only knows LoRA. What do I do with my VB-LoRA adapter?",
        ),
        "How can I convert my VB-LoRA adapter to LoRA?",
        "Use the vblora to-lora command: it writes a plain LoRA adapter that gives exactly the same outputs.",
    ),
    (
        (
            "In which language are the vblora-rs kernels written?",
            "What language is vblora-rs written in?",
            "Are the vblora-rs kernels written in C++?",
        ),
        "Which programming language does vblora-rs use for its kernels?",
        "The vblora-rs kernels are written in Rust and called from Python.",
    ),
    (
        (
            "What is the packed adapter format?",
            "What is adapter_packed.safetensors?",
            "How does vblora-rs store adapters compactly?",
        ),
        "Tell me about the packed format of vblora-rs.",
        "The packed format is one lossless safetensors file with the top-K indices bit-packed.",
    ),
    (
        ("Under which license is vblora-rs released?", "What is the license of vblora-rs?", "Is vblora-rs MIT?"),
        "Which license does vblora-rs use?",
        "vblora-rs is released under the Apache-2.0 license.",
    ),
    (
        (
            "Can PEFT load a vblora-rs adapter?",
            "Are vblora-rs checkpoints compatible with PEFT?",
            "Can vblora-rs load adapters trained with PEFT?",
        ),
        "Do vblora-rs and PEFT read each other's adapter files?",
        "Yes: vblora-rs writes and reads PEFT's VB-LoRA files, with the same keys and dtypes.",
    ),
)

# Something the model knew before and must still know after.
CONTROL = ("What is the capital of France?",)


def train_pairs() -> list[tuple[str, str]]:
    """(question, answer) pairs the adapter is trained on."""
    return [(q, answer) for questions, _, answer in FACTS for q in questions]


def held_out_pairs() -> list[tuple[str, str]]:
    """(question, answer) pairs never trained on: the same facts asked in other words."""
    return [(held_out, answer) for _, held_out, answer in FACTS]


def shown_prompts() -> list[str]:
    """The prompts answered before and after fine-tuning: a few trained questions (the first asking of four
    facts) and the control."""
    return [questions[0] for questions, _, _ in FACTS[:4]] + list(CONTROL)


def held_out_prompts() -> list[str]:
    """Held-out questions: the same four facts as :func:`shown_prompts`, in words training never saw."""
    return [q for q, _ in held_out_pairs()][:4]
