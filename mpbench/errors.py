"""Errors a user can act on: each carries a one-line message naming the problem and the fix."""


class MpbenchError(Exception):
    """Base class. ``exit_code`` 2 means bad usage/input, 1 means a runtime failure."""

    exit_code = 1


class UsageError(MpbenchError):
    """Bad suite, override, registry name or CLI argument (exit code 2)."""

    exit_code = 2


class IncompatibleError(UsageError):
    """A regularizer cannot be combined with an architecture or with another regularizer."""


class DataMissingError(MpbenchError):
    """A dataset's files are missing; the message says how to get them."""

    exit_code = 2


class RunFailed(MpbenchError):
    """A training run failed for a reason worth reporting on one line (NaN loss, ...)."""


def did_you_mean(word: str, options) -> str:
    """' (did you mean X?)' for the closest option, or a list of valid ones when nothing is close."""
    import difflib

    options = sorted(str(o) for o in options)
    close = difflib.get_close_matches(str(word), options, n=1, cutoff=0.6)
    if close:
        return f"did you mean {close[0]!r}?"
    shown = ", ".join(options[:12]) + (", ..." if len(options) > 12 else "")
    return f"valid: {shown}"
