"""User-facing errors.

Every failure a user can cause (a bad file, a bad flag, a bad checkpoint) is raised as a
:class:`GumError` whose message names the bad input and says what to do. The CLI prints the
message on one line and exits with a non-zero code, never a traceback.
"""


class GumError(Exception):
    """An error the user can fix; its message names the input and what to do."""

    exit_code = 2


class InputError(GumError):
    """A bad input file or argument."""


class CheckpointError(GumError):
    """A checkpoint that cannot be used with the chosen model."""
