"""Checkpoints on object storage: fetched once per node into a local cache, verified by sha256.

A checkpoint may be a local file or a ``gs://`` object. A remote one is downloaded into
``~/.cache/gum-ray/checkpoints/<sha256>.<suffix>`` (``GUM_CHECKPOINT_CACHE`` overrides the folder)
and loaded from there:

* the download goes to a temporary file beside the cache entry and is renamed into place only when
  complete, under a file lock, so the processes of one node (model actors, patch tasks) fetch it
  once between them and never read half a file;
* the mapping driver fetches it first (:func:`local_checkpoint` without ``sha256``) and hands the
  sha256 it found to every model actor; an actor then uses the cached file of that sha256 if its
  node has one, else downloads and checks that the object still has that sha256. A checkpoint
  replaced on the store during a run is a clear error, not a silent mix of two models.

Local paths are returned as they are (checked against ``sha256`` when one is given).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

from gum_ray.errors import CheckpointError, CheckpointNotFoundError
from gum_ray.store import fs

ENV_CACHE = "GUM_CHECKPOINT_CACHE"
_SHA = re.compile(r"^[0-9a-f]{64}$")


def cache_dir() -> Path:
    """The node-local folder of fetched checkpoints."""
    env = os.environ.get(ENV_CACHE)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gum-ray" / "checkpoints"


def _suffix(name: str) -> str:
    return ".safetensors" if name.endswith(".safetensors") else ".pth"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _mismatch(name: str, got: str, want: str) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {name}: its sha256 is {got[:16]}..., but this run started with {want[:16]}... "
        "(the file was replaced during the run); run again to use the new checkpoint, or restore "
        "the old one"
    )


def local_checkpoint(name: str | os.PathLike[str], sha256: str | None = None) -> Path:
    """A local file holding checkpoint ``name`` (a path or a ``gs://`` URL), fetched if remote.

    Raises:
        CheckpointNotFoundError: no such object or file.
        CheckpointError: the object's sha256 is not ``sha256`` (when given).
    """
    name = str(name)
    if sha256 is not None and not _SHA.match(sha256):
        raise CheckpointError(f"checkpoint {name}: {sha256!r} is not a sha256 (64 hex digits)")
    if not fs.is_remote(name):
        path = Path(name).expanduser()
        if sha256 is not None and path.is_file():
            got = _sha256_file(path)
            if got != sha256:
                raise _mismatch(name, got, sha256)
        return path
    url = fs.normalize(name)
    root = cache_dir()
    suffix = _suffix(url)
    if sha256 is not None:
        cached = root / f"{sha256}{suffix}"
        if cached.is_file():  # fetched before on this node (renamed in only when complete)
            return cached
    root.mkdir(parents=True, exist_ok=True)
    import fcntl

    lock_name = hashlib.sha256(url.encode()).hexdigest()[:16]
    with open(root / f".{lock_name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if sha256 is not None and (root / f"{sha256}{suffix}").is_file():  # another process did
                return root / f"{sha256}{suffix}"
            return _download(url, root, suffix, sha256)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _download(url: str, root: Path, suffix: str, sha256: str | None) -> Path:
    fd, tmp_name = tempfile.mkstemp(prefix=".fetch-", suffix=".tmp", dir=root)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        filesystem, p = fs.filesystem(url)
        try:
            filesystem.get_file(p, str(tmp))
        except FileNotFoundError:
            raise CheckpointNotFoundError(f"checkpoint {url}: no such object") from None
        except OSError as exc:
            raise CheckpointError(f"checkpoint {url}: cannot be fetched ({str(exc)[:200]})") from None
        if tmp.stat().st_size == 0:
            raise CheckpointError(f"checkpoint {url}: the object is empty")
        got = _sha256_file(tmp)
        if sha256 is not None and got != sha256:
            raise _mismatch(url, got, sha256)
        target = root / f"{got}{suffix}"
        os.replace(tmp, target)  # atomic: a reader sees no file or the whole file
        return target
    finally:
        tmp.unlink(missing_ok=True)
