"""The ``vblora`` command line (also ``python -m vblora_rs``).

Each command lives in its own module of this package and exposes ``register(subparsers)``, which adds its
sub-parser(s) with ``set_defaults(run=<function taking the parsed args>)``. Command modules import torch
only inside their ``run`` functions, so ``vblora --help`` and the torch-free ``vblora merge`` stay light.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Optional

from .. import _native
from ..errors import VBLoRAError

MAX_THREADS = 4096
# Modules of this package, one or more commands each, in the order `vblora --help` lists them.
COMMAND_MODULES = ("merge", "to_lora", "inspect", "pack", "demo")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="vblora", description="VB-LoRA adapters: merge into models, export to LoRA, inspect, convert, demo."
    )
    parser.add_argument("--version", action="version", version=f"vblora {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            continue
        module.register(subparsers)
    return parser


def _is_panic(exc: BaseException) -> bool:
    """A Rust panic surfaced by pyo3 (``PanicException``, a BaseException): a bug, reported in one line."""
    return type(exc).__name__ == "PanicException"


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().replace("\n", " ") or type(exc).__name__
    return text if len(text) <= 2000 else text[:2000] + " ..."


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of the ``vblora`` console script; returns the exit status. Every failure is one line on
    stderr (``vblora COMMAND: error: ...``, status 1); Ctrl-C is status 130, and every writer leaves its
    output whole or absent, so an interrupted command has written nothing."""
    name = "vblora"  # what the messages say until a command is known
    # SIGINTs are counted from the start: building the parser imports the commands (numpy among them), and a
    # Ctrl-C during an import can surface as another exception (below)
    with counting_ctrl_c() as ctrl_c:
        try:
            args = build_parser().parse_args(argv)
            _native.load_numpy_api()  # numpy is imported now; a Ctrl-C while its C API loads is one line too
            name = f"vblora {args.command}"
            status = args.run(args)
        except KeyboardInterrupt:
            return _interrupted(name, ctrl_c)
        except SystemExit:  # argparse's --help, --version and usage errors
            raise
        except BaseException as exc:
            if ctrl_c.count:
                # A Ctrl-C came first: whatever the command then died of is its doing. Python turns one raised in
                # an import into that import's failure (an extension's ImportError, a class body's RuntimeError
                # from __set_name__), so the exception's type cannot tell.
                return _interrupted(name, ctrl_c)
            if isinstance(exc, BrokenPipeError):
                # the reader went away (``vblora inspect ... | head``): not an error of ours; stop writing to it
                _silence_stdout()
                return 0
            if isinstance(exc, (VBLoRAError, OSError, RecursionError, MemoryError, OverflowError)) or (
                _is_panic(exc) or type(exc).__name__ == "SafetensorError"
            ):
                print(f"{name}: error: {_one_line(exc)}", file=sys.stderr)
                return 1
            raise
    return int(status or 0)


class CtrlC:
    """What :func:`counting_ctrl_c` saw: ``count`` SIGINTs so far; ``reported`` once the command has said it was
    interrupted (a Ctrl-C delivered again after that is dropped, so the message stays one line)."""

    def __init__(self) -> None:
        self.count = 0
        self.reported = False


def _interrupted(name: str, ctrl_c: CtrlC) -> int:
    ctrl_c.reported = True
    print(f"{name}: interrupted; nothing was written", file=sys.stderr)
    return 130


@contextmanager
def counting_ctrl_c() -> Iterator[CtrlC]:
    """Inside the block SIGINTs are counted (each still raises KeyboardInterrupt, as Python's own handler does);
    only in the main thread, where handlers can be set, and only over Python's default handler.

    A Ctrl-C can land where Python cannot raise it: in a callback Python calls on its own (a weakref callback of
    importlib's module locks, a ``__del__``: "Exception ignored in ...") or in C code that prints the error and
    goes on or raises another (numpy's ``import_array`` in an extension's init: ``PyErr_Print``, then
    "multiarray failed to import"). Both would print a traceback; here neither prints, and where timers exist
    (not on Windows) the Ctrl-C is raised again 10 ms later, in the command's own code."""
    seen = CtrlC()

    def on_sigint(signum: int, frame: Any) -> None:
        seen.count += 1
        raise KeyboardInterrupt

    def on_redelivery(signum: int, frame: Any) -> None:
        if not seen.reported:
            on_sigint(signum, frame)

    redeliver = hasattr(signal, "setitimer")

    def later(exc: BaseException) -> bool:
        if isinstance(exc, KeyboardInterrupt) and seen.count:
            if redeliver and not seen.reported:
                signal.setitimer(signal.ITIMER_REAL, 0.01)
            return True
        return False

    previous_unraisable, previous_except = sys.unraisablehook, sys.excepthook

    def on_unraisable(info: Any) -> None:
        if not later(info.exc_value):
            previous_unraisable(info)

    def on_printed(kind: Any, exc: BaseException, tb: Any) -> None:
        if not later(exc):
            previous_except(kind, exc, tb)

    main_thread = threading.current_thread() is threading.main_thread()
    if not main_thread or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield seen
        return
    signal.signal(signal.SIGINT, on_sigint)
    previous_alarm = signal.signal(signal.SIGALRM, on_redelivery) if redeliver else None
    sys.unraisablehook, sys.excepthook = on_unraisable, on_printed
    try:
        yield seen
    finally:
        sys.unraisablehook, sys.excepthook = previous_unraisable, previous_except
        if redeliver:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous_alarm)
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush does not raise again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def add_output(parser: argparse.ArgumentParser, help: str) -> None:
    """The one spelling of the output option: ``-o/--output OUT`` (``--out`` is accepted as well)."""
    parser.add_argument("-o", "--output", "--out", dest="out", required=True, metavar="OUT", help=help)


def check_threads(value: int) -> int:
    """``--threads N``: 0 (all cores) to :data:`MAX_THREADS`."""
    if not 0 <= value <= MAX_THREADS:
        raise VBLoRAError(f"--threads must be >= 0 (0: all cores) and at most {MAX_THREADS}, got {value}")
    return value


def console_main() -> None:
    try:
        status = main()
    except KeyboardInterrupt:  # between main's handlers (leaving them): nothing was written either
        print("vblora: interrupted; nothing was written", file=sys.stderr)
        status = 130
    sys.exit(status)
