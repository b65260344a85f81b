"""Earth Engine error classification: split the request, retry it, or give up.

:func:`classify_error` reads an exception (an ``EEException``, an HTTP error, a transport error, a
corrupt body) and answers :data:`SPLIT` (size, memory or time: halve the tile), :data:`RETRY` (429,
quota, 5xx, transport: back off and try again) or :data:`FATAL`.
"""

from __future__ import annotations

class _CorruptResponse(Exception):
    """A response body that is not the expected array (truncated, wrong shape): retried."""


SPLIT = "split"
RETRY = "retry"
FATAL = "fatal"

_SPLIT_WORDS = (
    "total request size",
    "too large",
    "memory limit",
    "memory capacity",
    "timed out",
    "pixel grid dimensions",
    "too many pixels",
)
_RETRY_WORDS = (
    "too many concurrent",
    "too many requests",
    "quota exceeded",
    "rate limit",
    "resource_exhausted",
    "internal error",
    "unavailable",
    "backend error",
    "deadline exceeded",
    "try again",
    "bad gateway",
    "connection reset",
)


def _http_status(exc: BaseException) -> int | None:
    """The HTTP status behind an ``EEException`` (ee raises it while handling the HttpError)."""
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        resp = getattr(e, "resp", None)
        status = getattr(resp, "status", None)
        if status is not None:
            try:
                return int(status)
            except (TypeError, ValueError):
                return None
        e = e.__cause__ or e.__context__
    return None


def classify_error(exc: BaseException) -> str:
    """``split`` (too big, out of memory, timed out), ``retry`` (429, quota, 5xx, transport) or
    ``fatal`` (anything else: a bad recipe, a missing asset, no permission)."""
    if isinstance(exc, (_CorruptResponse, ConnectionError, TimeoutError)):
        return RETRY  # transport: a client-side read timeout is not Earth Engine's "timed out"
    msg = str(exc).lower()
    if any(w in msg for w in _SPLIT_WORDS):
        return SPLIT
    status = _http_status(exc)
    if status is not None and (status == 429 or status >= 500):
        return RETRY
    if any(w in msg for w in _RETRY_WORDS):
        return RETRY
    try:  # transport errors of the HTTP stack
        import google.auth.exceptions as gae
        import requests

        if isinstance(exc, (requests.exceptions.RequestException, gae.TransportError)):
            return RETRY
    except ImportError:  # pragma: no cover
        pass
    if isinstance(exc, OSError):
        return RETRY
    return FATAL


def _reason(exc: BaseException) -> str:
    status = _http_status(exc)
    if status is not None:
        return str(status)
    if isinstance(exc, _CorruptResponse):
        return "corrupt"
    if isinstance(exc, (ConnectionError, TimeoutError, OSError)):
        return "transport"
    return type(exc).__name__
