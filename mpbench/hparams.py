"""Declared settings of plugins (regularizer hyperparameters, evaluation settings): a default, a help line and a
check the planner runs on the resolved value before anything trains."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from mpbench.errors import UsageError, did_you_mean

Check = Callable[[Any], "str | None"]   # None when the value is valid, else what it must be ("a number in [0, 1)")


@dataclass(frozen=True)
class Hparam:
    """A setting: its default, a help line, and an optional value check (see the factories below)."""

    default: Any
    help: str = ""
    check: Check | None = None


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def between(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> Check:
    """A finite number in [lo, hi] (brackets open as asked)."""
    text = f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"

    def check(v: Any) -> str | None:
        if not _is_number(v):
            return text
        low_ok = v > lo if lo_open else v >= lo
        high_ok = v < hi if hi_open else v <= hi
        return None if low_ok and high_ok else text

    return check


def at_least(lo: float, *, integer: bool = False, strict: bool = False) -> Check:
    """A finite number (an integer if asked) >= lo (> lo if strict)."""
    text = f"{'an integer' if integer else 'a number'} {'>' if strict else '>='} {lo:g}"

    def check(v: Any) -> str | None:
        if not _is_number(v) or (integer and not float(v).is_integer()):
            return text
        return None if (v > lo if strict else v >= lo) else text

    return check


def one_of(*choices: Any) -> Check:
    text = "one of " + ", ".join(map(str, choices))
    return lambda v: None if v in choices else text


def boolean(v: Any) -> str | None:
    return None if isinstance(v, bool) else "true or false"


def optional(inner: Check) -> Check:
    """``inner``, or null."""
    return lambda v: None if v is None else (None if inner(v) is None else f"{inner(v)}, or null")


def int_list(lo: int, hi: int) -> Check:
    text = f"a non-empty list of integers in [{lo}, {hi}]"

    def check(v: Any) -> str | None:
        ok = isinstance(v, (list, tuple)) and v and all(isinstance(i, int) and lo <= i <= hi for i in v)
        return None if ok else text

    return check


def resolve(prefix: str, declared: Mapping[str, Hparam], given: Mapping[str, Any] | None,
            noun: str = "setting") -> dict[str, Any]:
    """Defaults updated with ``given``; an unknown name or a value its check refuses is a one-line usage error.

    ``prefix`` names the section in messages (``reg.dropblock``), ``noun`` what its keys are (``hparam``)."""
    out = {k: v.default for k, v in declared.items()}
    for k, v in (given or {}).items():
        if k not in declared:
            raise UsageError(f"unknown {noun} {prefix}.{k}: {did_you_mean(k, declared)}")
        out[k] = v
    for k, v in out.items():
        check = declared[k].check
        problem = check(v) if check is not None else None
        if problem is not None:
            raise UsageError(f"{prefix}.{k}={v!r} is not valid: it must be {problem}; fix {prefix}.{k}")
    return out
