"""Which lon/lat boxes can hold land: the planner skips the rest for every real source.

The mask is the ``global-land-mask`` package's (the GLOBE 30 arc-second, about 1 km, land/sea grid;
lakes count as land). Its full grid is 21600 x 43200 booleans (933 MB unpacked, about 15 s to
decompress), far more than a planner needs, so it is reduced once per machine to a **block grid**:
a block of :data:`BLOCK` x :data:`BLOCK` GLOBE pixels (0.05 degree, about 5.5 km) is land when any of
its pixels is, bit-packed (3.2 MB) and cached under ``~/.cache/gum-ray/landmask/`` (``$XDG_CACHE_HOME``
respected; written atomically, so concurrent first users are safe).

A box may hold land when a land block lies within :data:`COAST_MARGIN_DEG` of it. The margin covers
what a 1 km mask misses (piers, small islets and reclaimed land newer than the GLOBE data) and the
cell halo that a prediction reads; a cell skipped by the mask is at least that far out to sea.
"""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path

import numpy as np

#: GLOBE pixels per block side: 6 x 1/120 degree = 0.05 degree.
BLOCK = 6
#: GLOBE pixels per degree.
PX_PER_DEG = 120
#: Blocks per degree.
BLOCKS_PER_DEG = PX_PER_DEG // BLOCK
#: A box may hold land when land lies within this many degrees of it (about 5.5 km at the equator).
COAST_MARGIN_DEG = 0.05
MASK_FORMAT = 1


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gum-ray" / "landmask"


def _package_mask_file() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("global_land_mask")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the global-land-mask package is not installed (pip install global-land-mask)")
    return Path(list(spec.submodule_search_locations)[0]) / "globe_combined_mask_compressed.npz"


def _build_blocks(npz: Path) -> np.ndarray:
    """Land per block (rows north to south from 90 N, columns west to east from 180 W), bool."""
    with np.load(npz) as f:  # not ``import global_land_mask``: that keeps 933 MB loaded
        ocean = f["mask"]  # True = ocean; row 0 at 90 N, column 0 at 180 W, 1/120 degree steps
        lat = f["lat"]
        lon = f["lon"]
    if ocean.shape != (180 * PX_PER_DEG, 360 * PX_PER_DEG) or lat[0] != 90.0 or lon[0] != -180.0:
        raise RuntimeError(f"{npz}: not the GLOBE land mask layout this module reads")
    h, w = ocean.shape[0] // BLOCK, ocean.shape[1] // BLOCK
    land = np.empty((h, w), dtype=bool)
    step = 600  # rows of blocks at a time: bounded temporary memory
    for r in range(0, h, step):
        part = ocean[r * BLOCK:(r + step) * BLOCK]
        land[r:r + step] = ~part.reshape(-1, BLOCK, w, BLOCK).all(axis=(1, 3))
    return land


@functools.lru_cache(maxsize=1)
def land_blocks() -> np.ndarray:
    """The block land grid (3600 x 7200 bool), built once per machine and cached on disk."""
    npz = _package_mask_file()
    stat = npz.stat()
    name = f"globe-blocks{BLOCK}-v{MASK_FORMAT}-{stat.st_size}.npy"
    path = _cache_dir() / name
    shape = (180 * BLOCKS_PER_DEG, 360 * BLOCKS_PER_DEG)
    if path.exists():
        try:
            packed = np.load(path, allow_pickle=False)
            return np.unpackbits(packed, count=shape[0] * shape[1]).astype(bool).reshape(shape)
        except (OSError, ValueError):
            pass  # a damaged cache file is rebuilt
    land = _build_blocks(npz)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, np.packbits(land.ravel()), allow_pickle=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return land


def may_hold_land(bounds: tuple[float, float, float, float], margin_deg: float = COAST_MARGIN_DEG) -> bool:
    """Whether the lon/lat box (west, south, east, north), widened by ``margin_deg``, touches land.

    A box crossing the antimeridian (west > east) is checked on both sides.
    """
    w, s, e, n = (float(v) for v in bounds)
    if w > e:
        return may_hold_land((w, s, 180.0, n), margin_deg) or may_hold_land((-180.0, s, e, n), margin_deg)
    land = land_blocks()
    s, n = max(-90.0, s - margin_deg), min(90.0, n + margin_deg)
    r0 = int(np.floor((90.0 - n) * BLOCKS_PER_DEG))
    r1 = int(np.ceil((90.0 - s) * BLOCKS_PER_DEG))
    w, e = w - margin_deg, e + margin_deg
    c0 = int(np.floor((w + 180.0) * BLOCKS_PER_DEG))
    c1 = int(np.ceil((e + 180.0) * BLOCKS_PER_DEG))
    ncols = land.shape[1]
    rows = land[max(r0, 0):max(r1, r0 + 1)]
    if c1 - c0 >= ncols:
        return bool(rows.any())
    cols = np.arange(c0, max(c1, c0 + 1)) % ncols  # the margin may wrap round the antimeridian
    return bool(rows[:, cols].any())


__all__ = ["BLOCK", "COAST_MARGIN_DEG", "land_blocks", "may_hold_land"]
