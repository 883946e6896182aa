"""Errors that end a run with one clear message and exit status 2 (see :func:`exit_with`)."""

import sys


class GlmtuneError(Exception):
    """A problem the user can fix: bad flags, bad data, a model or checkpoint that does not fit."""


class ArgumentsError(GlmtuneError):
    """Several argument problems, reported together."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class DataError(GlmtuneError):
    """A data file that cannot be used; the message names the file, the line and the field."""


def exit_with(error: Exception, status: int = 2):
    """One ``error:`` line per line of the message on stderr, then exit (no traceback)."""
    for line in str(error).splitlines() or [type(error).__name__]:
        print(f"error: {line}", file=sys.stderr)
    sys.exit(status)
