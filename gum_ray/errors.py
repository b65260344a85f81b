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


def require_file(path, *, label: str, expect: str, error: "type[GumError] | None" = None):
    """``path`` as a Path if it is a non-empty regular file, else a one-line error naming it.

    ``label`` prefixes the message (e.g. ``checkpoint scene.pth``); ``expect`` names what belongs
    there (e.g. ``a GeoTIFF file``).
    """
    from pathlib import Path

    error = error or InputError
    path = Path(path)
    if not path.exists():
        raise error(f"{label}: no such file")
    if path.is_dir():
        raise error(f"{label}: is a folder, expected {expect}")
    if path.stat().st_size == 0:
        raise error(f"{label}: the file is empty")
    return path
