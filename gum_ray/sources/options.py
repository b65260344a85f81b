"""Checks on source options that decide where credentials go (DESIGN.md decision 15).

The Earth Engine client sends the user's OAuth bearer token to whatever ``url`` it is given, so a
``--source-option url=...`` is accepted only where the token is safe: Google's Earth Engine API
over HTTPS (a host under ``googleapis.com``), or a server on this machine's loopback (the emulator,
``http`` allowed) at ``127.0.0.0/8``, ``::1`` or ``localhost``. Anything else (``http://`` to a
remote host, another domain, user-info tricks such as ``https://earthengine.googleapis.com@evil``)
is one :class:`~gum_ray.errors.InputError` before any request is made.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from gum_ray.errors import InputError

GOOGLE_API_DOMAIN = "googleapis.com"


def is_loopback_host(host: str) -> bool:
    """127.0.0.0/8, ::1 or ``localhost``."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_earthengine_url(url: object, option: str = "url") -> str:
    """``url`` without a trailing slash if the bearer token may go there, else an InputError."""
    if not isinstance(url, str) or not url.strip():
        raise InputError(f"--source-option {option}=: give the Earth Engine API root, e.g. "
                         "https://earthengine-highvolume.googleapis.com")
    text = url.strip()
    try:
        parts = urlsplit(text)
        host = parts.hostname or ""
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        raise InputError(f"--source-option {option}={text[:120]}: not a valid URL") from None
    why = None
    if parts.scheme not in ("https", "http"):
        why = f"the scheme is {parts.scheme or 'missing'!r}"
    elif parts.username is not None or parts.password is not None or "@" in parts.netloc:
        why = "it carries user information (user@host)"
    elif not host:
        why = "it has no host"
    elif is_loopback_host(host):
        return text.rstrip("/")
    elif parts.scheme != "https":
        why = "it is plain http to a host that is not this machine's loopback"
    elif not (host.lower() == GOOGLE_API_DOMAIN or host.lower().endswith("." + GOOGLE_API_DOMAIN)):
        why = f"{host} is not a Google API host (*.{GOOGLE_API_DOMAIN})"
    if why:
        raise InputError(
            f"--source-option {option}={text[:120]}: refused because {why}; the Earth Engine client "
            "sends your credentials there. Use https://earthengine-highvolume.googleapis.com (the "
            "default) or an emulator on loopback (http://127.0.0.1:PORT)"
        )
    return text.rstrip("/")
