"""Where the resolver finds VB-LoRA adapters by name, and the cache of their LoRA conversions (no vLLM here).

* :func:`find_adapter`: ``NAME`` in each configured folder, in order: ``DIR/NAME`` (a PEFT adapter folder, full
  or top-K, or a folder or file that :func:`..storage.locate.locate` takes as a packed adapter) or
  ``DIR/NAME.safetensors`` (a packed file). A name that is not one plain path component is never looked up.
* :class:`LoraCache`: ``vblora to-lora``'s conversion of an adapter, kept under the SHA-256 of what was
  converted (the config's and the weights' bytes, the package version), so an edited adapter is converted
  again and two names for one adapter share one entry. Entries are written by the project's one atomic writer
  (whole or absent), a conversion holds a lock (a thread lock and ``flock``) so that concurrent requests for
  one cold adapter, in one process or several, convert it once, and the cache is kept under a byte bound by
  evicting the least recently used entries.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

from ..convert.lora import export_lora
from ..errors import VBLoRAError
from ..storage import atomic
from ..storage.locate import PEFT, Located, locate
from ..storage.names import CONFIG_NAME, WEIGHTS_NAME, cache_root

ADAPTER_DIRS_ENV = "VBLORA_RS_VLLM_ADAPTER_DIRS"
CACHE_DIR_ENV = "VBLORA_RS_VLLM_CACHE_DIR"
CACHE_MAX_BYTES_ENV = "VBLORA_RS_VLLM_CACHE_MAX_BYTES"
DEFAULT_MAX_BYTES = 4 << 30
PACKED_SUFFIX = ".safetensors"
LOCKS = ".locks"
# Bumped when the conversion's output changes for the same input: old entries are then never hit again.
EXPORT_FORMAT = b"vblora-rs lora export 1"
_CHUNK = 1 << 20


def adapter_dirs(value: Optional[str] = None) -> list[str]:
    """The adapter folders of ``$VBLORA_RS_VLLM_ADAPTER_DIRS`` (``os.pathsep``-separated), in order."""
    text = os.environ.get(ADAPTER_DIRS_ENV, "") if value is None else value
    return [os.path.abspath(os.path.expanduser(part)) for part in text.split(os.pathsep) if part]


def default_cache_dir() -> str:
    """``$VBLORA_RS_VLLM_CACHE_DIR``, else ``vllm-lora`` in the package's cache folder."""
    if os.environ.get(CACHE_DIR_ENV):
        return os.path.abspath(os.path.expanduser(os.environ[CACHE_DIR_ENV]))

    return os.path.join(cache_root(), "vllm-lora")


def default_max_bytes() -> int:
    text = os.environ.get(CACHE_MAX_BYTES_ENV)
    if not text:
        return DEFAULT_MAX_BYTES
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value <= 0:
        raise VBLoRAError(f"{CACHE_MAX_BYTES_ENV}={text!r}: expected a positive number of bytes")
    return value


def plain_name(name: str) -> bool:
    """Whether ``name`` can name an adapter: one path component, not hidden, no separators (no ``..``)."""
    return bool(name) and not name.startswith(".") and os.sep not in name and "/" not in name and "\0" not in name


def find_adapter(dirs: Sequence[str], name: str) -> Optional[str]:
    """The path of the adapter called ``name`` in the first folder of ``dirs`` that has one; None if none has."""
    if not plain_name(name):
        return None
    for folder in dirs:
        for candidate in (os.path.join(folder, name), os.path.join(folder, name + PACKED_SUFFIX)):
            if os.path.lexists(candidate):
                return candidate
    return None


def content_key(found: Located) -> str:
    """SHA-256 (hex) of the export format, the package version, the config's and the weights' bytes."""
    from .. import __version__

    digest = hashlib.sha256(EXPORT_FORMAT + b"\0" + __version__.encode() + b"\0")
    paths = [found.config_path, found.weights_path] if found.kind == PEFT else [found.weights_path]
    for path in paths:
        assert path is not None
        digest.update(b"\0file\0")
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(_CHUNK), b""):
                digest.update(chunk)
    return digest.hexdigest()


def folder_bytes(path: str) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


@dataclass(frozen=True)
class Converted:
    """A cached LoRA conversion: its folder and whether this call converted it (False: found in the cache)."""

    folder: str
    key: str
    converted: bool


class LoraCache:
    """LoRA conversions of VB-LoRA adapters in ``root``, at most ``max_bytes`` of them (the newest entry is kept
    even if it alone is larger)."""

    def __init__(self, root: Optional[str] = None, max_bytes: Optional[int] = None) -> None:
        self.root = os.path.abspath(root or default_cache_dir())
        self.max_bytes = default_max_bytes() if max_bytes is None else max_bytes
        self.conversions = 0  # conversions this object ran (the tests count them)
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        # bytes of each entry seen, by (key, inode of its folder): an installed entry is never written again (a new
        # conversion installs a new folder), so eviction stats each folder instead of walking it (800 entries, a
        # full 4 GiB cache: 20 ms -> 3 ms per conversion)
        self._sizes: dict[tuple[str, int], int] = {}

    def entry(self, key: str) -> str:
        return os.path.join(self.root, key)

    @contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        """The key's thread lock, then its file lock (other processes sharing the cache)."""
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            locks = os.path.join(self.root, LOCKS)
            os.makedirs(locks, exist_ok=True)
            fd = os.open(os.path.join(locks, key), os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # releases the flock

    def get(self, adapter_path: str) -> Converted:
        """The LoRA conversion of the adapter at ``adapter_path``, converted now if the cache lacks it."""
        found = locate(adapter_path)
        key = content_key(found)
        target = self.entry(key)
        with self._locked(key):
            if _complete(target):
                _touch(target)
                return Converted(target, key, False)
            if os.path.lexists(target):  # not ours to trust (an entry emptied by hand): convert again
                _remove(target)
            with one_torch_thread():
                export_lora(adapter_path, target)
            self.conversions += 1
        self.evict(keep=key)
        return Converted(target, key, True)

    def entries(self) -> list[tuple[float, int, str]]:
        """``(last used, bytes, key)`` of every entry, least recently used first."""
        out: list[tuple[float, int, str]] = []
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return out
        sizes: dict[tuple[str, int], int] = {}
        for name in names:
            if name.startswith("."):
                continue
            path = os.path.join(self.root, name)
            try:
                st = os.stat(path)
            except OSError:
                continue
            if not stat.S_ISDIR(st.st_mode):
                continue
            seen = (name, st.st_ino)
            size = self._sizes.get(seen)
            sizes[seen] = folder_bytes(path) if size is None else size
            out.append((st.st_mtime, sizes[seen], name))
        self._sizes = sizes  # the entries there now
        out.sort()
        return out

    def evict(self, keep: Optional[str] = None) -> list[str]:
        """Remove least recently used entries until the cache holds at most ``max_bytes``; returns their keys."""
        entries = self.entries()
        total = sum(size for _, size, _ in entries)
        removed = []
        for _, size, key in entries:
            if total <= self.max_bytes:
                break
            if key == keep:
                continue
            with self._locked(key):
                _remove(self.entry(key))
            total -= size
            removed.append(key)
        return removed


_threads_lock = threading.Lock()
_threads_users = 0
_threads_before = 0


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """torch on one thread while a conversion runs (restored after the last concurrent one). A conversion is
    hundreds of small softmaxes and gathers, which gain nothing from threads; on a busy machine torch's OpenMP
    threads spin against the server's: measured on the shared 2-core test machine (load 6), one SmolLM2 adapter
    of 210 modules converted in 0.4-6 s on torch's 2 threads and 0.12-0.3 s on one."""
    import torch

    global _threads_users, _threads_before
    with _threads_lock:
        if _threads_users == 0:
            _threads_before = torch.get_num_threads()
            torch.set_num_threads(1)
        _threads_users += 1
    try:
        yield
    finally:
        with _threads_lock:
            _threads_users -= 1
            if _threads_users == 0:
                torch.set_num_threads(_threads_before)


def _complete(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, CONFIG_NAME)) and os.path.isfile(os.path.join(folder, WEIGHTS_NAME))


def _touch(folder: str) -> None:
    now = time.time()
    try:
        os.utime(folder, (now, now))
    except OSError:
        pass


def _remove(folder: str) -> None:
    """Move ``folder`` aside in one rename (readers see it whole or gone), then delete it."""
    parent, name = os.path.split(folder)
    aside = tempfile.mkdtemp(prefix=f".{name}{atomic.OLD_MARK}{os.getpid()}-", dir=parent)
    try:
        os.rename(folder, os.path.join(aside, name))
    except FileNotFoundError:
        pass
    shutil.rmtree(aside, ignore_errors=True)
