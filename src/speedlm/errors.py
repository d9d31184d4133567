"""User-facing errors.

`SpeedlmError` is raised for anything a user can fix (bad config, unknown preset, missing
checkpoint, empty data). The CLI turns it into one line on stderr and exit code 2; internal
invariants use `assert` and keep their tracebacks.
"""


class SpeedlmError(ValueError):
    """A problem with the user's input; the message says what to do next."""
