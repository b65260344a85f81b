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

import asyncio  # noqa: E402
import posixpath  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import uuid  # noqa: E402
import weakref  # noqa: E402
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


def read_object(path: str) -> bytes:
    """One object, whole, received on the calling thread: :func:`read_bytes`, except that for
    ``gs://`` the HTTPS receive and its decryption run here, on an event loop and HTTP session of
    this thread's own (:class:`_ThreadGCS`), not on fsspec's one IO thread, which every synchronous
    gcsfs call of the process queues on. A model actor's reader threads receive the cache's large
    objects this way, at once. (gcsfs's retries and errors are the same: its own request code runs.)
    """
    path = normalize(path)
    if not is_remote(path):
        return read_bytes(path)
    try:
        asyncio.get_running_loop()
        return read_bytes(path)  # inside a running event loop: this thread cannot run another
    except RuntimeError:
        pass
    held = _ThreadGCS.of_this_thread()
    try:
        return held.loop.run_until_complete(held.fs._cat_file(path.split("://", 1)[1]))
    finally:
        held.close_session_first()


class _ThreadGCS:
    """A thread's own event loop and asynchronous gcsfs filesystem (its own HTTP session), for the
    storage options in force (the emulator's address is part of them); closed with the thread."""

    _local = threading.local()

    def __init__(self, options: dict[str, Any]):
        import gcsfs

        self.loop = asyncio.new_event_loop()
        self.fs = gcsfs.GCSFileSystem(asynchronous=True, loop=self.loop, skip_instance_cache=True,
                                      use_listings_cache=False, **options)
        # an asynchronous gcsfs keeps no loop; given this one, its own clean-up of the session
        # closes it here if it comes first, not on fsspec's IO loop (a "different loop" error)
        self.fs._loop = self.loop
        weakref.finalize(self, _ThreadGCS._close, self.loop, self.fs)
        self._session_closer: weakref.finalize | None = None

    def close_session_first(self) -> None:
        """Once gcsfs has made its session: the same clean-up again, registered after gcsfs's own,
        since at exit finalizers run newest first: the session is closed on its loop, gracefully,
        and gcsfs's then finds it closed."""
        if self._session_closer is None and getattr(self.fs, "_session", None) is not None:
            self._session_closer = weakref.finalize(self, _ThreadGCS._close, self.loop, self.fs)

    @classmethod
    def of_this_thread(cls) -> "_ThreadGCS":
        options = gcs_storage_options()
        key = (os.getpid(), os.environ.get("STORAGE_EMULATOR_HOST", ""), repr(sorted(options.items())))
        held = getattr(cls._local, "held", None)
        if held is None or held[0] != key:
            held = cls._local.held = (key, cls(options))
        return held[1]

    @staticmethod
    def _close(loop: asyncio.AbstractEventLoop, fs: Any) -> None:
        try:
            session = getattr(fs, "_session", None)
            if session is not None and not session.closed and not loop.is_closed() and not loop.is_running():
                loop.run_until_complete(session.close())
        except Exception:  # noqa: BLE001 - closing at thread or interpreter exit: nothing to report
            pass
        finally:
            if not loop.is_running():
                loop.close()


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
