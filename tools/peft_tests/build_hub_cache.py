#!/usr/bin/env python3
"""Build the tiny Hub models that PEFT's VB-LoRA tests load, into a local Hugging Face hub cache.

This machine cannot reach huggingface.co, so `from_pretrained("peft-internal-testing/tiny-random-...")` fails.
Each model here is built from a transformers config written below (sizes taken from the real tiny-random
repos where they could be found, see SPECS), with random weights from a fixed seed, saved with
`save_pretrained` and laid out the way huggingface_hub lays out its cache:

    <out>/models--<org>--<name>/refs/main                 -> the commit hash (text)
    <out>/models--<org>--<name>/blobs/<etag>              -> file contents
    <out>/models--<org>--<name>/snapshots/<commit>/<file> -> relative symlink to ../../blobs/<etag>

With HF_HUB_CACHE=<out> and HF_HUB_OFFLINE=1, huggingface_hub resolves refs/main and finds the files.
The commit hash is made up: the SHA-1 of the snapshot's (file name, etag) list, so it changes when a file does.
Same script + same torch/transformers/safetensors versions -> same bytes (checked by `--verify`).

Usage:
    build_hub_cache.py [--out DIR] [--force]   build if DIR/STAMP is missing or stale (default DIR: ./hub_cache)
    build_hub_cache.py --verify                build twice into temporary folders and compare every byte
    build_hub_cache.py --stamp                 print the stamp the current script/versions would write
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "hub_cache"
SEED = 20261206
# Versions that decide the bytes written (config.json records transformers_version; torch draws the weights).
VERSIONED = ("torch", "transformers", "safetensors", "huggingface_hub")


@dataclass(frozen=True)
class Spec:
    """One tiny model: hub id, transformers config class name, model class name, config kwargs, source note."""

    repo_id: str
    config_cls: str
    model_cls: str
    kwargs: dict[str, Any]
    source: str


# Sizes: the hf-internal-testing tiny-random-* repos were made by transformers' create_dummy_models.py from
# the model testers of their day (hidden 16-32, 2-5 layers, 4 heads, intermediate 37 or 4, vocab ~1000 or the
# real tokenizer's size); PEFT's peft-internal-testing copies are their safetensors versions (PEFT's own note in
# test_encoder_decoder_models.py / test_feature_extraction_models.py). Where a figure was found in public
# code it is cited; the rest follows the tester defaults. VB-LoRA's test configs use vector_length=1, so any
# in/out feature size divides; the default target modules (q/v projections etc.) exist in all of these.
SPECS: tuple[Spec, ...] = (
    # PEFT's testing_common.py notes "the fc1 and fc2 layers in OPT have size (16, 4)"; vocab = OPT's GPT-2 BPE.
    Spec(
        "peft-internal-testing/tiny-random-OPTForCausalLM",
        "OPTConfig",
        "OPTForCausalLM",
        dict(
            vocab_size=50265,
            hidden_size=16,
            word_embed_proj_dim=16,
            ffn_dim=4,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=100,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
        ),
        "PEFT testing_common.py comment (fc1/fc2 16x4); OPTModelTester defaults",
    ),
    Spec(
        "peft-internal-testing/tiny-random-GPT2LMHeadModel",
        "GPT2Config",
        "GPT2LMHeadModel",
        dict(
            vocab_size=1000,
            n_embd=32,
            n_layer=5,
            n_head=4,
            n_inner=37,
            n_positions=512,
            activation_function="gelu",
            bos_token_id=999,  # the testers use vocab_size - 1; GPT-2's own 50256 is outside this vocab
            eos_token_id=999,
            pad_token_id=999,
        ),
        "GPT2ModelTester of the time (hidden 32, 5 layers, 4 heads, inner 37); tiny tokenizer vocab 1000",
    ),
    Spec(
        "peft-internal-testing/tiny-random-GPTJForCausalLM",
        "GPTJConfig",
        "GPTJForCausalLM",
        dict(
            vocab_size=1000,
            n_embd=32,
            n_layer=5,
            n_head=4,
            n_inner=37,
            rotary_dim=4,
            n_positions=512,
            bos_token_id=999,  # as GPTJModelTester: vocab_size - 1
            eos_token_id=999,
            pad_token_id=999,
        ),
        "GPTJModelTester (hidden 32, 4 heads, rotary_dim 4, intermediate 37)",
    ),
    # trl-internal-testing's tiny Llama: hidden 16, 2 layers, 4 heads, Llama-2 tokenizer (32000).
    Spec(
        "trl-internal-testing/tiny-random-LlamaForCausalLM",
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            vocab_size=32000,
            hidden_size=16,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=2048,
            rms_norm_eps=1e-6,
        ),
        "hf-internal-testing/tiny-random-LlamaForCausalLM sizes (TRL's copy)",
    ),
    # Public code describes it as "real qwen2 arch, F32, tied embed, rope_theta=1e6, QKV bias, GQA 4q/2kv".
    Spec(
        "peft-internal-testing/tiny-dummy-qwen2",
        "Qwen2Config",
        "Qwen2ForCausalLM",
        dict(
            vocab_size=151936,
            hidden_size=8,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=32768,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        ),
        "fxmarty/tiny-dummy-qwen2 description (tied, rope 1e6, GQA 4/2); hidden 8 as in the TRL tiny models",
    ),
    # transformers' test feeds token ids up to 255445 to it, so the vocab is Gemma 3's (262144).
    Spec(
        "hf-internal-testing/tiny-random-Gemma3ForCausalLM",
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(
            vocab_size=262144,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            query_pre_attn_scalar=8,
            max_position_embeddings=512,
            sliding_window=512,
            layer_types=["sliding_attention", "full_attention"],
        ),
        "GemmaModelTester sizes (hidden 32, 4 heads, 2 kv heads, intermediate 37); vocab from transformers' test",
    ),
    Spec(
        "peft-internal-testing/tiny-random-BartForConditionalGeneration",
        "BartConfig",
        "BartForConditionalGeneration",
        dict(
            vocab_size=1000,
            d_model=16,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=4,
            decoder_ffn_dim=4,
            max_position_embeddings=100,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            decoder_start_token_id=2,
            forced_eos_token_id=2,
        ),
        "BartModelTester (d_model 16, 2+2 layers, 4 heads, ffn 4)",
    ),
    Spec(
        "peft-internal-testing/tiny-random-T5ForConditionalGeneration-calibrated",
        "T5Config",
        "T5ForConditionalGeneration",
        dict(
            vocab_size=1302,
            d_model=32,
            d_kv=8,
            d_ff=37,
            num_layers=5,
            num_decoder_layers=5,
            num_heads=4,
            relative_attention_num_buckets=8,
            dropout_rate=0.1,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        ),
        "T5ModelTester (d_model 32, d_kv 8, d_ff 37, 4 heads, 8 buckets); 'calibrated' = PEFT's re-upload",
    ),
    Spec(
        "peft-internal-testing/tiny-random-BertModel",
        "BertConfig",
        "BertModel",
        dict(
            vocab_size=1124,
            hidden_size=32,
            num_hidden_layers=5,
            num_attention_heads=4,
            intermediate_size=37,
            max_position_embeddings=512,
            type_vocab_size=16,
        ),
        "BertModelTester (hidden 32, 5 layers, 4 heads, intermediate 37, type vocab 16)",
    ),
    Spec(
        "peft-internal-testing/tiny-random-RobertaModel",
        "RobertaConfig",
        "RobertaModel",
        dict(
            vocab_size=1000,
            hidden_size=32,
            num_hidden_layers=5,
            num_attention_heads=4,
            intermediate_size=37,
            max_position_embeddings=512,
            type_vocab_size=16,
            pad_token_id=1,
        ),
        "RobertaModelTester (as Bert)",
    ),
    Spec(
        "peft-internal-testing/tiny-random-DebertaModel",
        "DebertaConfig",
        "DebertaModel",
        dict(
            vocab_size=1000,
            hidden_size=32,
            num_hidden_layers=5,
            num_attention_heads=4,
            intermediate_size=37,
            max_position_embeddings=512,
            type_vocab_size=16,
            relative_attention=False,
            position_biased_input=True,
            pos_att_type=None,
        ),
        "DebertaModelTester (as Bert, no relative attention)",
    ),
    Spec(
        "peft-internal-testing/tiny-random-DebertaV2Model",
        "DebertaV2Config",
        "DebertaV2Model",
        dict(
            vocab_size=1000,
            hidden_size=32,
            num_hidden_layers=5,
            num_attention_heads=4,
            intermediate_size=37,
            max_position_embeddings=512,
            type_vocab_size=16,
            relative_attention=False,
            position_biased_input=True,
            pos_att_type=None,
        ),
        "DebertaV2ModelTester (as Bert, no relative attention)",
    ),
)


def stamp() -> str:
    """What the cache's bytes depend on: this script and the versions that write them."""
    h = hashlib.sha256(Path(__file__).read_bytes())
    for pkg in VERSIONED:
        h.update(f"\n{pkg}={importlib.metadata.version(pkg)}".encode())
    return h.hexdigest()


def git_blob_sha1(data: bytes) -> str:
    """The etag the Hub gives a regular (non-LFS) git file: git's blob hash."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def etag(name: str, data: bytes) -> str:
    # The Hub stores weights in LFS (etag = sha256 of the content) and small text files in git.
    return hashlib.sha256(data).hexdigest() if name.endswith(".safetensors") else git_blob_sha1(data)


def build_model_files(spec: Spec, seed: int) -> dict[str, bytes]:
    """Instantiate the model from its config with a fixed seed and return save_pretrained's files."""
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()  # one summary line per model is enough
    config = getattr(transformers, spec.config_cls)(**spec.kwargs)
    torch.manual_seed(seed)
    model: Any = getattr(transformers, spec.model_cls)(config).eval()
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        return {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}


def place_in_cache(cache: Path, repo_id: str, files: dict[str, bytes]) -> str:
    """Lay the files out as huggingface_hub's cache does (blobs + snapshot symlinks + refs/main)."""
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    tags = {name: etag(name, data) for name, data in sorted(files.items())}
    commit = hashlib.sha1("".join(f"{n}\0{t}\n" for n, t in tags.items()).encode()).hexdigest()
    snap = repo_dir / "snapshots" / commit
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    for name, data in sorted(files.items()):
        (repo_dir / "blobs" / tags[name]).write_bytes(data)
        os.symlink(Path("..", "..", "blobs", tags[name]), snap / name)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)  # no trailing newline, as huggingface_hub writes it
    return commit


def build(out: Path, log: Callable[[str], None] = print) -> None:
    """Build every SPECS model into a fresh folder next to `out`, then swap it in (no half-built cache)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".building-", dir=out.parent))
    try:
        for i, spec in enumerate(SPECS):
            files = build_model_files(spec, SEED + i)
            commit = place_in_cache(tmp, spec.repo_id, files)
            size = sum(len(b) for b in files.values())
            log(f"  {spec.repo_id}: {', '.join(sorted(files))} ({size / 1e6:.1f} MB) @ {commit[:10]}")
        (tmp / "STAMP").write_text(stamp() + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def is_current(out: Path) -> bool:
    stamp_file = out / "STAMP"
    return stamp_file.is_file() and stamp_file.read_text().strip() == stamp()


def tree_digest(root: Path) -> dict[str, str]:
    """Every file/symlink under root -> sha256 of its bytes (or its link target)."""
    res: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            res[rel] = "link:" + os.readlink(p)
        elif p.is_file():
            res[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return res


def verify() -> int:
    """Build twice and compare: the determinism promise, checked."""
    with tempfile.TemporaryDirectory() as tmp:
        a, b = Path(tmp, "a"), Path(tmp, "b")
        build(a, log=lambda _line: None)
        build(b, log=lambda _line: None)
        da, db = tree_digest(a), tree_digest(b)
    diff = sorted(k for k in set(da) | set(db) if da.get(k) != db.get(k))
    if diff:
        print(f"NOT deterministic: {len(diff)} paths differ, e.g. {diff[:5]}", file=sys.stderr)
        return 1
    print(f"deterministic: two builds agree on all {len(da)} paths")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="hub cache folder (HF_HUB_CACHE)")
    ap.add_argument("--force", action="store_true", help="rebuild even if the stamp is current")
    ap.add_argument("--verify", action="store_true", help="build twice in temporary folders, compare bytes")
    ap.add_argument("--stamp", action="store_true", help="print the stamp and exit")
    args = ap.parse_args(argv)
    if args.stamp:
        print(stamp())
        return 0
    if args.verify:
        return verify()
    if not args.force and is_current(args.out):
        print(f"hub cache {args.out} is up to date")
        return 0
    print(f"building hub cache {args.out} ({len(SPECS)} models, seed {SEED})")
    build(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
