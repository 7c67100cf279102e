"""Errors a user can act on: each carries a one-line message naming the problem and the fix."""


class MpbenchError(Exception):
    """Base class. ``exit_code`` 2 means bad usage/input, 1 means a runtime failure.

    One helper makes every one-line message: :func:`one_line`."""

    exit_code = 1


class UsageError(MpbenchError):
    """Bad suite, override, registry name or CLI argument (exit code 2)."""

    exit_code = 2


class IncompatibleError(UsageError):
    """A regularizer cannot be combined with an architecture or with another regularizer."""


class DataMissingError(MpbenchError):
    """A dataset's files are missing; the message says how to get them."""

    exit_code = 2


class PreflightError(UsageError):
    """Everything wrong with a plan, found before anything trains: one line per problem (exit code 2)."""

    MAX_SHOWN = 10

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        shown = self.problems[: self.MAX_SHOWN]
        more = len(self.problems) - len(shown)
        super().__init__("\n".join(shown + ([f"... and {more} more problems"] if more > 0 else [])))


class RunFailed(MpbenchError):
    """A training run failed for a reason worth reporting on one line (NaN loss, ...)."""


_LOOKALIKE = str.maketrans({"o": "0", "l": "1", "i": "1"})


def _similarity(a: str, b: str) -> tuple[float, float, float]:
    """How alike two names look: case-insensitive, look-alike characters (O/0, l/1/I) equal; ties by exact spelling."""
    from difflib import SequenceMatcher

    def ratio(x: str, y: str) -> float:
        return SequenceMatcher(None, x, y, autojunk=False).ratio()

    return (ratio(a.lower().translate(_LOOKALIKE), b.lower().translate(_LOOKALIKE)),
            ratio(a.lower(), b.lower()), ratio(a, b))


def did_you_mean(word: str, options, n: int = 3, cutoff: float = 0.6, margin: float = 0.15) -> str:
    """"did you mean 'a', 'b' or 'c'?" for up to ``n`` close options, best first; "valid: ..." when none is close.

    An option is close when its similarity is at least ``cutoff`` and within ``margin`` of the best one's (a clear
    winner is offered alone).
    """
    word = str(word)
    options = sorted({str(o) for o in options})
    scored = sorted(((_similarity(word, o), o) for o in options), key=lambda so: (*(-x for x in so[0]), so[1]))
    best = scored[0][0][0] if scored else 0.0
    close = [repr(o) for s, o in scored if s[0] >= max(cutoff, best - margin)][:n]
    if close:
        return "did you mean " + (close[0] if len(close) == 1 else ", ".join(close[:-1]) + " or " + close[-1]) + "?"
    shown = (", ".join(options[:12]) + (", ..." if len(options) > 12 else "")) or "(none)"
    return f"valid: {shown}"


def one_line(text: object, limit: int | None = None) -> str:
    """The first non-empty line of ``text``, whitespace folded, cut to ``limit`` characters (with ``...``)."""
    lines = [" ".join(ln.split()) for ln in str(text).splitlines() if ln.strip()]
    line = lines[0] if lines else ""
    return line if limit is None or len(line) <= limit else line[: limit - 3] + "..."


def describe_error(e: BaseException, limit: int | None = None) -> str:
    """One line for a failure: an mpbench error's own message, else ``Type: first line``."""
    msg = one_line(e, limit)
    return msg if isinstance(e, MpbenchError) else f"{type(e).__name__}: {msg}"
