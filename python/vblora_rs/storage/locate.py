"""THE adapter locator: where an adapter's config and weights are, from what a user passes.

One rule for every entry point (``vblora merge``, ``to-lora``, ``inspect``, ``pack``/``unpack`` and the model
side's ``from_pretrained``):

* a folder holding ``adapter_model.safetensors`` (PEFT's weights, next to ``adapter_config.json``) or
  ``adapter_packed.safetensors`` (our packed file, its config inside); a folder holding both is ambiguous and
  refused, naming the two files;
* ``adapter_config.json`` or ``adapter_model.safetensors`` itself: its folder's PEFT adapter;
* any other file: a packed adapter file;
* anything else: an error that says whether the path does not exist or what the folder lacks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Union

from ..errors import VBLoRAError
from .names import CONFIG_NAME, PACKED_WEIGHTS_NAME, WEIGHTS_NAME

PEFT = "peft"
PACKED = "packed"


@dataclass(frozen=True)
class Located:
    """An adapter on disk: ``kind`` is :data:`PEFT` (``config_path`` + ``weights_path``) or :data:`PACKED`
    (``weights_path`` holds the config too; ``config_path`` is None)."""

    kind: str
    folder: str
    weights_path: str
    config_path: Optional[str]


def locate(path: Union[str, os.PathLike]) -> Located:
    """Where the adapter at ``path`` is (see the module's rule); VBLoRAError naming ``path`` otherwise."""
    path = os.fspath(path)
    if os.path.isdir(path):
        peft = os.path.join(path, WEIGHTS_NAME)
        packed = os.path.join(path, PACKED_WEIGHTS_NAME)
        has_peft, has_packed = os.path.isfile(peft), os.path.isfile(packed)
        if has_peft and has_packed:
            raise VBLoRAError(f"{path}: holds both {WEIGHTS_NAME} and {PACKED_WEIGHTS_NAME}; pass the file you mean")
        if has_peft:
            config = os.path.join(path, CONFIG_NAME)
            if not os.path.isfile(config):
                raise VBLoRAError(f"{path}: has {WEIGHTS_NAME} but no {CONFIG_NAME}")
            return Located(PEFT, path, peft, config)
        if has_packed:
            return Located(PACKED, path, packed, None)
        if os.path.isfile(os.path.join(path, CONFIG_NAME)):
            raise VBLoRAError(f"{path}: has {CONFIG_NAME} but no {WEIGHTS_NAME} or {PACKED_WEIGHTS_NAME}")
        raise VBLoRAError(f"{path}: not an adapter folder (no {CONFIG_NAME}, {WEIGHTS_NAME} or {PACKED_WEIGHTS_NAME})")
    if os.path.isfile(path):
        folder = os.path.dirname(path) or "."
        name = os.path.basename(path)
        if name == CONFIG_NAME:
            found = locate(folder)
            if found.kind != PEFT:
                raise VBLoRAError(f"{path}: its folder holds no {WEIGHTS_NAME}")
            return found
        if name == WEIGHTS_NAME:
            config = os.path.join(folder, CONFIG_NAME)
            if not os.path.isfile(config):
                raise VBLoRAError(f"{path}: no {CONFIG_NAME} next to it")
            return Located(PEFT, folder, path, config)
        return Located(PACKED, folder, path, None)
    if os.path.lexists(path):
        raise VBLoRAError(f"{path}: not a file or folder (a broken link?)")
    raise VBLoRAError(f"{path}: does not exist")
