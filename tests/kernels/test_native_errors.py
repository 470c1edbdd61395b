"""How the Rust extension reports failures: an operating-system failure (missing file, full disk, name too long)
is the ``OSError`` subclass Python's own ``open()`` would raise, with ``errno`` and ``filename``; a bad value is
``VBLoRAError`` (a ``ValueError``, never an ``OSError``) naming the file or argument."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
from vblora_rs import VBLoRAError, _native


def packed_file(path: Path) -> Path:
    """A valid packed file: one module of rank 1, one sub-vector per side, top-2 over a bank of 4 vectors."""
    metadata = {"indices_dtype": "int64", "key_prefix": "base_model.model.", "config": "{}"}
    indices = np.array([[0, 1], [2, 3]], dtype=np.int64)
    weights = np.full((2, 1), 0.5, dtype=np.float32)
    bank = np.ones((4, 8), dtype=np.float32)
    _native.encode_packed(str(path), metadata, [("lin", 1, 1, 1)], indices, weights, bank, [])
    return path


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_full_disk_is_os_error_not_value_error(tmp_path: Path) -> None:
    src = packed_file(tmp_path / "a.vblora")
    with pytest.raises(OSError) as info:
        _native.unpack_packed(str(src), "/dev/full")
    assert info.value.errno == errno.ENOSPC and info.value.filename == "/dev/full"
    assert not isinstance(info.value, ValueError)
    assert "writing" in str(info.value)


def test_missing_file_is_file_not_found_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "absent" / "adapter_packed.safetensors"
    readers = [
        lambda: _native.decode_packed(str(missing)),
        lambda: _native.unpack_packed(str(missing), str(tmp_path / "out")),
        lambda: _native.packed_modules_outside(str(missing), []),
        lambda: _native.safetensors_header(str(missing)),
        lambda: _native.adapter_shapes(str(missing), 2, 4, 8, 1),
        lambda: _native.packed_adapter_shapes(str(missing), 1),
    ]
    for read in readers:
        with pytest.raises(FileNotFoundError) as info:
            read()
        assert info.value.errno == errno.ENOENT and info.value.filename == str(missing)
        assert str(missing) in str(info.value)


def test_write_into_missing_folder_names_the_target(tmp_path: Path) -> None:
    # safetensors writes a sibling temporary file first: the error names the file asked for, with its errno
    target = tmp_path / "absent" / "a.vblora"
    with pytest.raises(FileNotFoundError) as info:
        packed_file(target)
    assert info.value.errno == errno.ENOENT and info.value.filename == str(target)


def test_name_too_long_is_os_error(tmp_path: Path) -> None:
    long = tmp_path / ("x" * 300)
    with pytest.raises(OSError) as info:
        _native.decode_packed(str(long))
    assert info.value.errno == errno.ENAMETOOLONG and info.value.filename == str(long)


def test_bad_values_are_vblora_errors(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\": 1")
    for read in (lambda: _native.decode_packed(str(garbage)), lambda: _native.safetensors_header(str(garbage))):
        with pytest.raises(VBLoRAError, match=str(garbage)) as info:
            read()
        assert not isinstance(info.value, OSError)
    with pytest.raises(VBLoRAError, match="k = 5 must satisfy 1 <= k <= 4"):
        _native.topk_softmax(np.zeros((2, 4), dtype=np.float32), 5, 1)
