"""User-facing errors.

Every failure a user can cause (a bad file, a bad parameter, a bad checkpoint) is raised as a
:class:`GumError` whose message names the bad input and says what to do. The CLI prints the
message on one line and exits with a non-zero code, never a traceback.

The errors are also builtins, so a library user can catch them without knowing gum-ray's classes:
an :class:`InputError` (and a :class:`CheckpointError`) is a :class:`ValueError`, a
:class:`NotFoundError` is a :class:`FileNotFoundError` too.

Library messages name the *parameter* (``stride``, ``with_products``); an error that is about one
parameter says which in ``param``, and the CLI turns that name into its flag (``--stride``,
``--products``) before it prints the message (:func:`gum_ray.cli.flagify`).
"""

from __future__ import annotations


class GumError(Exception):
    """An error the user can fix; its message names the input and what to do.

    Args:
        message: the one-line message.
        param: the library parameter (or parameters) the error is about (the CLI names their
            flags instead).
    """

    exit_code = 2

    def __init__(self, message: str = "", *, param: str | tuple[str, ...] | None = None) -> None:
        super().__init__(message)
        self.param = param


class InputError(GumError, ValueError):
    """A bad input file or argument."""


class CheckpointError(GumError, ValueError):
    """A checkpoint that cannot be used with the chosen model."""


class NotFoundError(InputError, FileNotFoundError):
    """An input file or folder that does not exist."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint file that does not exist."""


_NOT_FOUND: dict[type, type] = {InputError: NotFoundError, CheckpointError: CheckpointNotFoundError}


def require_file(path, *, label: str, expect: str, error: "type[GumError] | None" = None):
    """``path`` as a Path if it is a non-empty regular file, else a one-line error naming it.

    ``label`` prefixes the message (e.g. ``checkpoint scene.pth``); ``expect`` names what belongs
    there (e.g. ``a GeoTIFF file``). A missing file raises the not-found variant of ``error``
    (also a :class:`FileNotFoundError`).
    """
    from pathlib import Path

    error = error or InputError
    path = Path(path)
    if not path.exists():
        raise _NOT_FOUND.get(error, error)(f"{label}: no such file")
    if path.is_dir():
        raise error(f"{label}: is a folder, expected {expect}")
    if path.stat().st_size == 0:
        raise error(f"{label}: the file is empty")
    return path
