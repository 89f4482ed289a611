"""The one exception type the CLI turns into a clean message and a non-zero exit."""


import os

DEBUG_ENV = "REPSURGERY_DEBUG"  # set (or `repsurgery --debug`): full tracebacks instead of one line


class PipelineError(Exception):
    """A user-facing problem: the message says what is wrong, where, and how to fix it."""


def debugging() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")
