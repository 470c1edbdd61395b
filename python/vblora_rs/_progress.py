"""Progress of long commands on stderr: a tqdm bar (after a second) on a terminal, a few plain lines otherwise, so
that piped logs get ``merging: 50% (1.0 of 2.1 GB)`` lines instead of a flood of carriage returns."""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import Any, Optional

# Plain lines: one per quarter of the work, at most one per this many seconds.
PLAIN_STEPS = 4
PLAIN_MIN_SECONDS = 2.0
DELAY_SECONDS = 1.0


def _amount(n: float, unit: str) -> str:
    if unit != "B":
        return f"{n:,.0f}"
    for suffix in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or suffix == "TB":
            return f"{n:.1f} {suffix}" if suffix != "B" else f"{n:.0f} B"
        n /= 1000
    return f"{n}"


class _Plain:
    def __init__(self, total: Optional[int], desc: str, unit: str) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.done = 0
        self.start = self.last = time.monotonic()
        self.next_step = 1
        self.postfix = ""

    def update(self, n: int = 1) -> None:
        self.done += n
        if not self.total:
            return
        now = time.monotonic()
        step = self.done * PLAIN_STEPS // self.total
        if now - self.start >= DELAY_SECONDS and step >= self.next_step and now - self.last >= PLAIN_MIN_SECONDS:
            self.next_step = step + 1
            self.last = now
            print(
                f"{self.desc}: {100 * self.done // self.total}% "
                f"({_amount(self.done, self.unit)} of {_amount(self.total, self.unit)}){self.postfix}",
                file=sys.stderr,
                flush=True,
            )

    def set_postfix(self, **values: Any) -> None:
        """Shown after the figures of the next line (tqdm's ``set_postfix``)."""
        self.postfix = ", " + ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        return None

    def __enter__(self) -> _Plain:
        return self

    def __exit__(self, *exc: Optional[TracebackType]) -> None:
        return None


def bar(total: Optional[int], desc: str, unit: str = "it", enabled: bool = True) -> Any:
    """A context manager with ``update(n)`` and ``set_postfix``: tqdm on a terminal, plain lines when stderr is not
    one."""
    if enabled and sys.stderr.isatty():
        from tqdm import tqdm

        scale = unit == "B"
        return tqdm(total=total, desc=desc, unit=unit, unit_scale=scale, delay=DELAY_SECONDS, leave=False)
    return _Plain(total, desc, unit) if enabled else _Plain(None, desc, unit)
