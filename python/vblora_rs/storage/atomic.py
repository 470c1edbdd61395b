"""The one way folders are written: into a temporary sibling, then moved into place in one step.

* :func:`temp_folder` makes ``.NAME.tmp-PID-XXXX`` next to the target (same filesystem, so the move is a
  rename), after removing such folders left by earlier runs whose process is gone (a SIGKILL cannot clean up).
* :func:`install` moves the finished folder to the target: without ``replace``, with ``RENAME_NOREPLACE`` (two
  runs racing for one target: exactly one wins, the other fails); with ``replace``, an existing target is
  swapped with ``RENAME_EXCHANGE`` (at every instant the target is either the old or the new folder) and the
  old one deleted afterwards. Where ``renameat2`` is missing (not Linux, or a filesystem without it), a plain
  rename is used, whose window is reported in :data:`Installed.atomic`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

from ..errors import VBLoRAError

AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
TEMP_MARK = ".tmp-"
OLD_MARK = ".old-"


def _renameat2() -> Optional[ctypes._CFuncPtr]:  # type: ignore[name-defined]
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


RENAMEAT2 = _renameat2()


def rename2(src: str, dst: str, flags: int) -> bool:
    """``renameat2(src, dst, flags)``; False where the call or the flag is not supported, OSError on failure."""
    if RENAMEAT2 is None:
        return False
    if RENAMEAT2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), dst)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


NAME_MAX = 255  # bytes in one path component on Linux filesystems; asked of the filesystem where it can tell
# what a sibling's name adds to NAME: the dot, the mark, a PID (up to 7 digits), "-" and mkdtemp's 8 characters
SIBLING_EXTRA = 1 + max(len(TEMP_MARK), len(OLD_MARK)) + 7 + 1 + 8


def _name_max(parent: str) -> int:
    try:
        return int(os.pathconf(parent, "PC_NAME_MAX"))
    except (OSError, ValueError):
        return NAME_MAX


def _sibling_stem(parent: str, name: str) -> str:
    """``NAME`` as the hidden siblings spell it: cut (on a character boundary) so that a sibling's name fits the
    filesystem's limit even when ``NAME`` itself is as long as allowed."""
    room = _name_max(parent) - SIBLING_EXTRA
    data = os.fsencode(name)
    return name if len(data) <= room else os.fsdecode(data[:room])  # any bytes are a valid name part


def check_name(target: str) -> None:
    """Refuse a target whose name the filesystem cannot hold, naming it (not a hidden temporary)."""
    parent, name = os.path.split(os.path.abspath(target))
    limit = _name_max(parent if os.path.isdir(parent) else os.path.dirname(parent) or "/")
    size = len(os.fsencode(name))
    if size > limit:
        raise VBLoRAError(f"{target}: file name too long ({size} bytes; the filesystem allows {limit})")


def remove_path(path: str) -> None:
    """Remove whatever ``path`` is: a folder tree, a file, or a symlink (dangling or looping) itself."""
    if os.path.islink(path) or not os.path.isdir(path):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    else:
        shutil.rmtree(path, ignore_errors=True)


def clean_stale(target: str) -> list[str]:
    """Remove ``.NAME.tmp-PID-*`` / ``.NAME.old-PID-*`` siblings of ``target`` whose process is gone; returns
    what was removed."""
    parent, name = os.path.split(os.path.abspath(target))
    removed = []
    try:
        entries = os.listdir(parent)
    except OSError:
        return removed
    stem = _sibling_stem(parent, name)
    for entry in entries:
        for mark in (TEMP_MARK, OLD_MARK):
            prefix = f".{stem}{mark}"
            if not entry.startswith(prefix):
                continue
            pid_text = entry[len(prefix) :].split("-", 1)[0]
            if pid_text.isdigit() and not _pid_alive(int(pid_text)):
                path = os.path.join(parent, entry)
                remove_path(path)
                removed.append(path)
    return removed


def temp_folder(target: str) -> str:
    """A new empty folder next to ``target``, for building it."""
    check_name(target)
    parent, name = os.path.split(os.path.abspath(target))
    os.makedirs(parent, exist_ok=True)
    clean_stale(target)
    return tempfile.mkdtemp(prefix=f".{_sibling_stem(parent, name)}{TEMP_MARK}{os.getpid()}-", dir=parent)


def usual_mode(path: str, folder: bool = False) -> None:
    """Give ``path`` the mode a plain ``open``/``mkdir`` would (0666 or 0777 less the umask): files written
    through a private temporary (``mkstemp``, the safetensors crate) would otherwise stay 0600/0700."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if folder else 0o666) & ~umask)


def check_target(target: str, replace: bool) -> None:
    """The one rule for an output folder, checked before any work: an existing folder is replaced only with
    ``replace`` (``--force``); a file or a symlink at ``target`` is never replaced, ``--force`` or not (it is
    not an earlier output, and a link's folder would stay behind)."""
    if not os.path.lexists(target):
        return
    if os.path.islink(target) or not os.path.isdir(target):
        raise VBLoRAError(f"{target}: exists and is not a folder; not replacing it")
    if not replace:
        raise _exists(target)


def _exists(target: str) -> VBLoRAError:
    return VBLoRAError(f"{target}: already exists; pass --force to replace it")


@dataclass
class Installed:
    replaced: bool  # an existing target was replaced
    atomic: bool  # in one rename (else: moved aside, then renamed)


@contextmanager
def no_interrupt() -> Iterator[None]:
    """Ctrl-C waits until the block is done (main thread only; elsewhere signals do not reach Python)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def install(tmp: str, target: str, replace: bool) -> Installed:
    """Move the finished folder ``tmp`` to ``target``. Without ``replace`` an existing target is an error (also
    when another process creates it meanwhile); with it, the old target is swapped out and deleted. Ctrl-C waits
    for the move and the old folder's removal, so an interrupted command has either installed or left nothing."""
    with no_interrupt():
        return _install(tmp, target, replace)


def _install(tmp: str, target: str, replace: bool) -> Installed:
    target = os.path.abspath(target)
    if not replace:
        try:
            if rename2(tmp, target, RENAME_NOREPLACE):
                return Installed(False, True)
        except FileExistsError:
            raise _exists(target) from None
        if os.path.lexists(target):
            raise _exists(target)
        os.rename(tmp, target)  # fails on a non-empty folder created meanwhile
        return Installed(False, False)
    if not os.path.lexists(target):
        return _install(tmp, target, replace=False)
    if rename2(tmp, target, RENAME_EXCHANGE):
        # tmp now holds the old target: a folder (check_target refused anything else before the work; a file or
        # link put there since, by another process, goes the same way)
        remove_path(tmp)
        return Installed(True, True)
    parent, name = os.path.split(target)
    old = tempfile.mkdtemp(prefix=f".{_sibling_stem(parent, name)}{OLD_MARK}{os.getpid()}-", dir=parent)
    moved = os.path.join(old, "previous")
    os.rename(target, moved)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(moved, target)
        os.rmdir(old)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return Installed(True, False)
