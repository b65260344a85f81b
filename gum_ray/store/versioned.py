"""Compare-and-swap objects: a small object that changes only by conditional writes (DESIGN.md 14).

An object here has a *generation* that every write advances; a write names the generation it
replaces and is refused if the object has moved on since (generation 0: only if there is none).
So of two writers that read the same generation, exactly one succeeds; there is no blind overwrite
and no delete. Reads also return the store's own time (of the write, and now), so callers judge
ages on the store's clock, never on a client's.

* ``gs://``: one object; a write is an upload with ``ifGenerationMatch=<generation>`` (the object
  generation GCS keeps; 412 = refused). A read takes the object's metadata (generation, ``updated``)
  and the body pinned to that generation; the store's "now" is the ``Date`` of the response.
* local (and mounted) folders: the object ``<path>`` is a folder ``<path>.d`` of numbered versions,
  ``<generation>.json``, each created whole with ``os.link`` (which fails if the name exists): the
  newest version is the object. A writer that replaces generation *g* creates *g+1* and then checks
  that no newer version exists (a version older than the newest may have been pruned, so creating
  it can succeed for a writer that read long ago: that write is refused and removed). The newest
  version is never removed; the winner prunes versions older than the one it replaced. The time of
  a write is its file's mtime, "now" the mtime of a probe file: both the filesystem's clock.

A transport retry can make a write that did land look refused (GCS answers 412 to the retried
upload); a refused write whose body is found in place is therefore reported as done. Callers make
each body unique (a nonce), so equal bytes mean this very write.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import email.utils
import json
import os
import re
import tempfile
import uuid
from pathlib import Path

from gum_ray.store import fs

_VERSION = re.compile(r"^(\d{12,})\.json$")
_KEEP_OLD = 1  # versions kept below the newest (a reader that just listed may still open one)


@dataclasses.dataclass(frozen=True)
class Version:
    """One generation of an object as the store reports it."""

    data: bytes
    generation: int
    updated: float  # the store's time of this write (seconds since the epoch)
    now: float  # the store's time when it was read (same clock)

    @property
    def age(self) -> float:
        """Seconds since this generation was written, on the store's clock (never negative)."""
        return max(0.0, self.now - self.updated)


def read(path: str) -> Version | None:
    """The object's newest generation, or None if it does not exist."""
    path = fs.normalize(path)
    for _ in range(20):  # a version superseded (and pruned) between listing and reading: read again
        try:
            return _read_gcs(path) if fs.is_remote(path) else _read_local(path)
        except _Superseded:
            continue
    raise OSError(f"{path}: changed on every read (20 tries); is something rewriting it in a loop?")


def write(path: str, data: bytes, if_generation: int) -> Version | None:
    """Write ``data`` if the object is at ``if_generation`` (0: does not exist); None if refused.

    Returns the new generation as the store reports it (its time of writing included).
    """
    path = fs.normalize(path)
    done = _write_gcs(path, data, if_generation) if fs.is_remote(path) else _write_local(path, data, if_generation)
    if done is not None:
        return done
    now = read(path)
    if now is not None and now.data == data:  # our own write, answered as refused after a retry
        return now
    return None


class _Superseded(Exception):
    pass


# ------------------------------------------------------------------------------------ GCS


def _http_date(headers) -> float:
    date = headers.get("Date") or headers.get("date")
    if not date:
        raise OSError("the object store sent no Date header: cannot tell its time")
    return email.utils.parsedate_to_datetime(date).timestamp()


def _rfc3339(value: str) -> float:
    return _dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def _read_gcs(path: str) -> Version | None:
    gfs, p = fs.filesystem(path)
    bucket, key, _ = gfs.split_path(p)
    try:
        headers, body = gfs.call("GET", "b/{}/o/{}", bucket, key)
    except FileNotFoundError:
        return None
    meta = json.loads(body)
    generation = int(meta["generation"])
    try:
        _, data = gfs.call("GET", "b/{}/o/{}", bucket, key, alt="media", generation=str(generation))
    except FileNotFoundError:  # replaced since (an old generation is gone): read the new one
        raise _Superseded() from None
    # "now" is the Date of the metadata response: whole seconds, so an age reads up to 1 s short
    return Version(data=bytes(data), generation=generation, updated=_rfc3339(meta["updated"]),
                   now=_http_date(headers))


def _write_gcs(path: str, data: bytes, if_generation: int) -> Version | None:
    from urllib.parse import quote

    gfs, p = fs.filesystem(path)
    bucket, key, _ = gfs.split_path(p)
    meta = json.dumps({"name": key, "contentType": "application/json"})
    body = (f"--==0==\nContent-Type: application/json; charset=UTF-8\n\n{meta}\n--==0==\n"
            "Content-Type: application/json\n\n").encode() + data + b"\n--==0==--"
    try:
        out = gfs.call(
            "POST", f"{gfs._location}/upload/storage/v1/b/{quote(bucket)}/o",
            uploadType="multipart", ifGenerationMatch=str(int(if_generation)),
            headers={"Content-Type": 'multipart/related; boundary="==0=="'}, data=body, json_out=True,
        )
    except FileExistsError:  # 412 Precondition Failed
        return None
    updated = _rfc3339(out["updated"])
    return Version(data=data, generation=int(out["generation"]), updated=updated, now=updated)


# ------------------------------------------------------------------------------------ local


def _local_dir(path: str) -> Path:
    return Path(path + ".d")


def _versions(folder: Path) -> list[int]:
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    return sorted(int(m.group(1)) for m in map(_VERSION.match, names) if m)


def _name(generation: int) -> str:
    return f"{generation:012d}.json"


def _local_now(folder: Path) -> float:
    folder.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".now-", dir=folder)
    try:
        os.write(fd, b"t")
        return os.fstat(fd).st_mtime
    finally:
        os.close(fd)
        os.unlink(probe)


def _read_local(path: str) -> Version | None:
    folder = _local_dir(path)
    versions = _versions(folder)
    if not versions:
        return None
    newest = versions[-1]
    try:
        with open(folder / _name(newest), "rb") as f:
            data = f.read()
            updated = os.fstat(f.fileno()).st_mtime
    except FileNotFoundError:
        raise _Superseded() from None
    return Version(data=data, generation=newest, updated=updated, now=_local_now(folder))


def _write_local(path: str, data: bytes, if_generation: int) -> Version | None:
    folder = _local_dir(path)
    folder.mkdir(parents=True, exist_ok=True)
    if if_generation == 0 and _versions(folder):
        return None
    new = int(if_generation) + 1
    target = folder / _name(new)
    tmp = folder / f".{uuid.uuid4().hex}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
        updated = os.fstat(f.fileno()).st_mtime
    try:
        os.link(tmp, target)
    except FileExistsError:
        return None
    finally:
        os.unlink(tmp)
    if _versions(folder)[-1] != new:
        # a newer version exists: ours filled a pruned gap (its writer read long ago) or was
        # replaced at once; either way it is not the object, and the newest version stays
        try:
            os.unlink(target)
        except FileNotFoundError:
            pass
        return None
    for old in _versions(folder):
        if old < new - _KEEP_OLD:
            try:
                os.unlink(folder / _name(old))
            except FileNotFoundError:
                pass
    return Version(data=data, generation=new, updated=updated, now=_local_now(folder))
