"""Refuse target regexes whose matching can take exponential time.

PEFT full-matches ``target_modules`` (a string) against every module name. Python's ``re`` backtracks, so a
pattern like ``(.+)+X`` takes time exponential in the name's length on a name it does not match; nothing can
interrupt it. A repeat can only blow up when its body can split one stretch of text in several ways, which
needs an unbounded repeat inside an unbounded repeat with nothing forcing where one iteration ends. So an
unbounded repeat whose body holds another unbounded repeat is accepted only when the body also holds, at its top
level and not optional, a literal character that none of the inner repeats can match (as in
``(layers\\.\\d+\\.)*``: every iteration ends at a ``.`` that ``\\d`` cannot take). Alternatives inside an
unbounded repeat are treated the same way (``(a|aa)*`` can also split text in many ways).
"""

from __future__ import annotations

import re
from typing import Any

try:  # Python >= 3.11
    import re._constants as sre_constants  # type: ignore[import-not-found]
    import re._parser as sre_parse  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - older Pythons
    import sre_constants  # type: ignore[no-redef]
    import sre_parse  # type: ignore[no-redef]

C = sre_constants
REPEATS = {C.MAX_REPEAT, C.MIN_REPEAT} | ({C.POSSESSIVE_REPEAT} if hasattr(C, "POSSESSIVE_REPEAT") else set())
CATEGORY_RE = {
    C.CATEGORY_DIGIT: r"\d",
    C.CATEGORY_NOT_DIGIT: r"\D",
    C.CATEGORY_WORD: r"\w",
    C.CATEGORY_NOT_WORD: r"\W",
    C.CATEGORY_SPACE: r"\s",
    C.CATEGORY_NOT_SPACE: r"\S",
}


def _unbounded(op: Any, av: Any) -> bool:
    return op in REPEATS and (av[1] == C.MAXREPEAT or av[1] > 1)


def _children(op: Any, av: Any) -> list[Any]:
    """Sub-patterns of one parsed item."""
    if op in REPEATS:
        return [av[2]]
    if op == C.SUBPATTERN:
        return [av[-1]]
    if op == C.BRANCH:
        return list(av[1])
    if op in (C.ASSERT, C.ASSERT_NOT):
        return [av[1]]
    if hasattr(C, "ATOMIC_GROUP") and op == C.ATOMIC_GROUP:
        return [av]
    return []


def _class_matches(items: Any, ch: str) -> bool:
    """Whether an ``IN`` set matches ``ch`` (unknown members count as matching)."""
    negate, hit = False, False
    for op, av in items:
        if op == C.NEGATE:
            negate = True
        elif op == C.LITERAL:
            hit |= chr(av) == ch
        elif op == C.RANGE:
            hit |= av[0] <= ord(ch) <= av[1]
        elif op == C.CATEGORY and av in CATEGORY_RE:
            hit |= re.fullmatch(CATEGORY_RE[av], ch) is not None
        else:
            return True
    return hit != negate


def _may_match(pattern: Any, ch: str) -> bool:
    """Whether any single-character atom in ``pattern`` may match ``ch`` (conservative)."""
    for op, av in pattern:
        if op == C.LITERAL:
            if chr(av) == ch:
                return True
        elif op == C.NOT_LITERAL:
            if chr(av) != ch:
                return True
        elif op == C.ANY:
            return True
        elif op == C.IN:
            if _class_matches(av, ch):
                return True
        elif op in (C.AT, C.GROUPREF) or op == getattr(C, "GROUPREF_EXISTS", None):
            if op != C.AT:
                return True
        elif any(_may_match(child, ch) for child in _children(op, av)):
            return True
    return False


def _inner_repeats(pattern: Any) -> list[Any]:
    """Unbounded repeats and alternations anywhere inside ``pattern``."""
    found = []
    for op, av in pattern:
        if _unbounded(op, av) or op == C.BRANCH:
            found.append([(op, av)])
        for child in _children(op, av):
            found.extend(_inner_repeats(child))
    return found


def _delimited(body: Any, inner: list[Any]) -> bool:
    """A mandatory top-level literal of ``body`` that no inner repeat can match."""
    for op, av in body:
        if op == C.SUBPATTERN:
            if _delimited(av[-1], inner):
                return True
        elif op == C.LITERAL and not any(_may_match(p, chr(av)) for p in inner):
            return True
    return False


def _problem(pattern: Any) -> str:
    for op, av in pattern:
        if _unbounded(op, av):
            body = av[2]
            inner = _inner_repeats(body)
            if inner and not _delimited(body, inner):
                return "nests repetitions that can match the same text in exponentially many ways"
        for child in _children(op, av):
            problem = _problem(child)
            if problem:
                return problem
    return ""


# Unbounded repeats that can all take the same character: a name they do not match is tried in every way of
# splitting it among them, about len(name) ** count steps (5 of them over a 200-character name: 9 s, 4: 0.2 s).
MAX_OVERLAPPING_REPEATS = 4
# the characters module names are made of (a repeat that takes any of them counts)
NAME_CHARACTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-"


def _unbounded_bodies(pattern: Any) -> list[Any]:
    """The bodies of every unbounded repeat anywhere in ``pattern``."""
    found = []
    for op, av in pattern:
        if _unbounded(op, av):
            found.append(av[2])
        for child in _children(op, av):
            found.extend(_unbounded_bodies(child))
    return found


def _overlap_problem(pattern: Any) -> str:
    bodies = _unbounded_bodies(pattern)
    if len(bodies) <= MAX_OVERLAPPING_REPEATS:
        return ""
    for ch in NAME_CHARACTERS:
        count = sum(_may_match(body, ch) for body in bodies)
        if count > MAX_OVERLAPPING_REPEATS:
            return (
                f"has {count} unbounded repetitions that can all match {ch!r}: matching it takes time growing as "
                f"the name's length to the power {count} (at most {MAX_OVERLAPPING_REPEATS} allowed)"
            )
    return ""


def regex_problem(pattern: str) -> str:
    """Why ``pattern`` cannot be used as a target regex (not valid, or exponential to match), or ``""``."""
    try:
        re.compile(pattern)
        parsed = sre_parse.parse(pattern)
    except (re.error, RecursionError, OverflowError, ValueError) as exc:
        return f"is not a valid regular expression ({exc})"
    try:
        return _problem(list(parsed)) or _overlap_problem(list(parsed))
    except RecursionError:
        return "is nested too deeply"
