"""``gs://`` URLs at the bottom layer: what counts as remote, gcsfs's options, and small reads.

The stores (:mod:`gum_ray.store.fs`) build on this; input files read before anything runs (an AOI
GeoJSON) use :func:`read_remote` directly. ``STORAGE_EMULATOR_HOST`` (fake-gcs-server in the tests)
makes gcsfs talk to the emulator with anonymous credentials.
"""

from __future__ import annotations

import os

# with gcsfs's experimental zonal-bucket support on, its first call can hang for minutes
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

from typing import Any  # noqa: E402

REMOTE_PROTOCOLS = ("gs", "gcs")


def is_remote(path: str | os.PathLike[str]) -> bool:
    """True for ``gs://`` / ``gcs://`` URLs."""
    return str(path).split("://", 1)[0] in REMOTE_PROTOCOLS and "://" in str(path)


def gcs_storage_options() -> dict[str, Any]:
    """gcsfs options: anonymous against an emulator (``STORAGE_EMULATOR_HOST``), default creds else."""
    if os.environ.get("STORAGE_EMULATOR_HOST", "") not in ("", "default"):
        return {"token": "anon"}
    return {}


def read_remote(url: str, max_bytes: int, what: str) -> bytes:
    """The bytes of the object ``url`` (at most ``max_bytes``), or one clear error.

    Raises:
        NotFoundError: no such object; InputError: too large or unreadable.
    """
    from gum_ray.errors import InputError, NotFoundError

    import gcsfs

    fs = gcsfs.GCSFileSystem(use_listings_cache=False, **gcs_storage_options())
    path = url.split("://", 1)[1].strip("/")
    try:
        size = int(fs.info(path).get("size") or 0)
        if size > max_bytes:
            raise InputError(f"{what} {url}: {size / 2**20:.0f} MiB is more than it needs (limit "
                             f"{max_bytes // 2**20} MiB)")
        return fs.cat_file(path)
    except FileNotFoundError:
        raise NotFoundError(f"{what} {url}: no such object") from None
    except OSError as exc:
        raise InputError(f"{what} {url}: cannot be read ({str(exc)[:200]})") from None
