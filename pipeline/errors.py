"""The one exception type the CLI turns into a clean message and a non-zero exit."""


class PipelineError(Exception):
    """A user-facing problem: the message says what is wrong, where, and how to fix it."""
