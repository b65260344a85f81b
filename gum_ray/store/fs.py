"""Storage paths through fsspec: a local folder or ``gs://bucket/prefix`` (DESIGN.md decision 9).

Every store in gum-ray (product, manifest, imagery cache) takes a root path that is either a local
path (or ``file://``) or a ``gs://`` URL. Google Cloud Storage goes through gcsfs; when the standard
``STORAGE_EMULATOR_HOST`` environment variable names an emulator (fake-gcs-server in the tests),
gcsfs talks to it with anonymous credentials.

``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT`` is set to ``false`` before gcsfs is imported: with the
experimental zonal-bucket support on, gcsfs's first call can hang for minutes.
"""

from __future__ import annotations

import os

os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import posixpath  # noqa: E402
import tempfile  # noqa: E402
import uuid  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import fsspec  # noqa: E402
from fsspec.implementations.local import LocalFileSystem  # noqa: E402

from gum_ray.errors import InputError  # noqa: E402
from gum_ray.urls import REMOTE_PROTOCOLS, gcs_storage_options, is_remote  # noqa: E402,F401


def normalize(path: str | os.PathLike[str]) -> str:
    """A canonical root: ``gs://bucket/prefix`` without a trailing slash, or an absolute local path."""
    p = str(path)
    if "://" in p:
        proto, rest = p.split("://", 1)
        if proto == "file":
            return str(Path(rest).absolute())
        if proto not in REMOTE_PROTOCOLS:
            raise InputError(
                f"store path {p}: protocol {proto!r} is not supported; use a local folder or gs://bucket/path"
            )
        rest = rest.strip("/")
        if not rest:
            raise InputError(f"store path {p}: give a bucket, e.g. gs://my-bucket/gum/product.zarr")
        return f"gs://{rest}"
    return str(Path(p).expanduser().absolute())


def join(root: str, *parts: str) -> str:
    """Join path parts with '/' (URLs) or the OS separator (local)."""
    if is_remote(root):
        return posixpath.join(root.rstrip("/"), *parts)
    return str(Path(root, *parts))


def filesystem(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The (synchronous) filesystem for ``path`` and the path in that filesystem's terms.

    Directory listings are not cached: a listing must see markers written by other processes.
    """
    path = normalize(path)
    if is_remote(path):
        import gcsfs

        fs = gcsfs.GCSFileSystem(use_listings_cache=False, **gcs_storage_options())
        return fs, path.split("://", 1)[1]
    return LocalFileSystem(), path


def zarr_store(path: str, *, read_only: bool = False) -> Any:
    """A zarr v3 store for ``path``: ``LocalStore`` for local folders, ``FsspecStore`` for gs://."""
    from zarr.storage import FsspecStore, LocalStore

    path = normalize(path)
    if is_remote(path):
        return FsspecStore.from_url(path, storage_options=gcs_storage_options(), read_only=read_only)
    if not read_only:
        Path(path).mkdir(parents=True, exist_ok=True)
    return LocalStore(path, read_only=read_only)


def exists(path: str) -> bool:
    fs, p = filesystem(path)
    return bool(fs.exists(p))


def read_bytes(path: str) -> bytes:
    fs, p = filesystem(path)
    return fs.cat_file(p)


def write_bytes(path: str, data: bytes) -> None:
    """Write (overwrite) a whole object; locally through a temporary file and an atomic rename."""
    fs, p = filesystem(path)
    if is_remote(path):
        fs.pipe_file(p, data)
        return
    target = Path(p)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, target)


def create_only(path: str, data: bytes) -> bool:
    """Write ``data`` to ``path`` only if nothing is there; True if written, False if it existed.

    Atomic on both backends: on GCS a conditional upload (``ifGenerationMatch=0``); locally a
    complete temporary file hard-linked to the final name (``link`` fails if the name exists), so
    a reader never sees a half-written object.
    """
    fs, p = filesystem(path)
    if is_remote(path):
        try:
            fs.pipe_file(p, data, mode="create")
        except FileExistsError:
            return False
        return True
    target = Path(p)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, target)
        except FileExistsError:
            return False
        return True
    finally:
        os.unlink(tmp)


def list_names(path: str) -> list[str]:
    """Names (not paths) directly under the folder/prefix ``path``; [] if there is none."""
    fs, p = filesystem(path)
    try:
        entries = fs.ls(p, detail=False)
    except FileNotFoundError:
        return []
    names = [posixpath.basename(str(e).rstrip("/")) for e in entries]
    return sorted(n for n in names if n and not n.startswith("."))


def find(path: str) -> list[str]:
    """All object paths (relative to ``path``) below it, recursively; [] if there is none."""
    fs, p = filesystem(path)
    try:
        found = fs.find(p)
    except FileNotFoundError:
        return []
    base = p.rstrip("/") + "/"
    return sorted(str(f)[len(base):] if str(f).startswith(base) else str(f) for f in found)


def du(path: str) -> tuple[int, int]:
    """(number of objects, total bytes) below ``path``."""
    fs, p = filesystem(path)
    try:
        sizes = fs.find(p, detail=True)
    except FileNotFoundError:
        return 0, 0
    return len(sizes), int(sum(int(v.get("size") or 0) for v in sizes.values()))


def put_file(local: str | Path, target: str) -> None:
    """Copy a finished local file to ``target`` (local: atomic rename into place; gs://: upload)."""
    target = normalize(target)
    if is_remote(target):
        fs, p = filesystem(target)
        fs.put_file(str(local), p)
        return
    dest = Path(target)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(local, dest)
    except OSError:  # another filesystem: copy beside the target, then rename
        import shutil

        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")
        shutil.copyfile(local, tmp)
        os.replace(tmp, dest)


def remove(path: str, recursive: bool = False) -> None:
    """Remove ``path`` (and everything under it if ``recursive``); missing paths are fine."""
    fs, p = filesystem(path)
    try:
        fs.rm(p, recursive=recursive)
    except FileNotFoundError:
        pass
