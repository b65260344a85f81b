"""Clouds of the synthetic world: where Sentinel-2 has no clear observation in a year.

A pure function of longitude, latitude and year (rules in ``docs/synthetic_world.md``, "Clouds"),
applied by :func:`gum_ray.sources.synthetic.render` when asked (``clouds=True``, the synthetic
source's ``clouds`` option): the four Sentinel-2 bands are NaN (no data) under a cloud; Sentinel-1
and terrain are untouched (radar sees through clouds).

* **Patches**: a value-noise field f (two octaves on lon/lat lattices of 0.02 and 0.0075 degree,
  weights 0.7 and 0.3, smoothstep interpolation, hashed per year) mapped through its own
  distribution function F to a near-uniform [0, 1]; a pixel is clouded where F(f) < q.
* **Share** q: 10-40 % (a region field on a 0.25-degree lattice, bilinear), so about q of an area
  is clouded; in the **humid tropics** (|lat| < 10 degrees) 50-90 %, and 30 % of the 0.25-degree
  blocks there (aligned with the product's default cells) are **overcast**: clouded everywhere.
* The field is evaluated at the grid's 16-pixel node lattice and interpolated bilinearly, like the
  world's other smooth fields (so a tile of a grid gets the same clouds as the whole grid); the
  overcast blocks are decided per pixel from its longitude and latitude.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from gum_ray.sources.synthetic_world import _u01 as _hashed

CLOUD_STEPS_DEG = (0.02, 0.0075)  # lattices of the two octaves (360 / step is a whole number)
CLOUD_WEIGHTS = (0.7, 0.3)
REGION_STEP_DEG = 0.25  # lattice of the cloud share (and the overcast blocks)
SHARE = (0.10, 0.40)  # clouded share outside the tropics
TROPICS_LAT = 10.0  # |lat| below this: the humid tropics
TROPICS_SHARE = (0.50, 0.90)
TROPICS_OVERCAST = 0.30  # share of the tropics' 0.25-degree blocks under cloud all year
_SALT = 40

#: quantiles (0, 5, ..., 100 %) of f over the globe (measured on 2e6 random points, 2017-2026, ends set to 0 and 1):
#: F(f) = interpolation of these to [0, 1]
_F_QUANTILES = np.array([
    0.0, 0.2323, 0.2834, 0.3206, 0.352, 0.38, 0.406, 0.4307, 0.4543, 0.4772, 0.5001, 0.5229, 0.546,
    0.5696, 0.5941, 0.62, 0.6483, 0.6798, 0.7169, 0.7676, 1.0,
])


def _u01(j: np.ndarray, i: np.ndarray, salt: int, year: int) -> np.ndarray:
    return _hashed(j, i, salt, (year - 1900) & 0xFF)


def _smooth(t: np.ndarray) -> np.ndarray:
    return t * t * (3.0 - 2.0 * t)


def _value_noise(lon: np.ndarray, lat: np.ndarray, step: float, salt: int, year: int, *,
                 smooth: bool = True) -> np.ndarray:
    """Uniform hashed values on a lon/lat lattice of ``step`` degrees, interpolated (wraps at 180)."""
    n = int(round(360.0 / step))
    gx, gy = (np.asarray(lon, np.float64) + 180.0) / step, (np.asarray(lat, np.float64) + 90.0) / step
    i0, j0 = np.floor(gx), np.floor(gy)
    tx, ty = gx - i0, gy - j0
    if smooth:
        tx, ty = _smooth(tx), _smooth(ty)
    i0 = i0.astype(np.int64) % n
    i1 = (i0 + 1) % n
    j0 = j0.astype(np.int64)
    v00, v01 = _u01(j0, i0, salt, year), _u01(j0, i1, salt, year)
    v10, v11 = _u01(j0 + 1, i0, salt, year), _u01(j0 + 1, i1, salt, year)
    top = v00 + tx * (v01 - v00)
    bottom = v10 + tx * (v11 - v10)
    return top + ty * (bottom - top)


def _field(lon: np.ndarray, lat: np.ndarray, year: int) -> np.ndarray:
    """f: the two-octave noise in [0, 1]."""
    out = np.zeros(np.shape(lon))
    for k, (step, w) in enumerate(zip(CLOUD_STEPS_DEG, CLOUD_WEIGHTS)):
        out += w * _value_noise(lon, lat, step, _SALT + k, year)
    return out


def share(lon: Any, lat: Any, year: int) -> np.ndarray:
    """q: the clouded share around (lon, lat) in ``year`` (before the overcast blocks)."""
    lat_a = np.asarray(lat, np.float64)
    r = _value_noise(lon, lat_a, REGION_STEP_DEG, _SALT + 10, year, smooth=False)
    tropics = np.abs(lat_a) < TROPICS_LAT
    lo = np.where(tropics, TROPICS_SHARE[0], SHARE[0])
    hi = np.where(tropics, TROPICS_SHARE[1], SHARE[1])
    return lo + (hi - lo) * r


def overcast(lon: Any, lat: Any, year: int) -> np.ndarray:
    """True in the tropics' 0.25-degree blocks that are clouded all year."""
    lon_a, lat_a = np.asarray(lon, np.float64), np.asarray(lat, np.float64)
    n = int(round(360.0 / REGION_STEP_DEG))
    i = np.floor((lon_a + 180.0) / REGION_STEP_DEG).astype(np.int64) % n
    j = np.floor((lat_a + 90.0) / REGION_STEP_DEG).astype(np.int64)
    return (np.abs(lat_a) < TROPICS_LAT) & (_u01(j, i, _SALT + 20, year) < TROPICS_OVERCAST)


def cloud_margin(lon: Any, lat: Any, year: int) -> np.ndarray:
    """q - F(f): positive under a cloud (the overcast blocks aside), smooth in lon/lat."""
    f = _field(lon, lat, year)
    return share(lon, lat, year) - np.interp(f, _F_QUANTILES, np.linspace(0.0, 1.0, _F_QUANTILES.size))


def cloud_mask(frame: Any, year: int, r0: int, r1: int, passes: Any, any_overcast: bool) -> np.ndarray:
    """Clouded pixels of rows r0:r1 of a synthetic-world frame: bool (r1 - r0, w).

    ``passes`` = ``frame.xpass(cloud_margin(frame.node_lon, frame.node_lat, year))``;
    ``any_overcast``: whether an overcast block may meet the frame (else not tested per pixel).
    """
    cloud = frame.ypass(passes, r0, r1) > 0
    if any_overcast:
        lon, lat = frame.lonlat(r0, r1)
        cloud |= overcast(lon, lat, year)
    return cloud


def frame_may_be_overcast(frame: Any, year: int) -> bool:
    """Whether an overcast block may meet the frame (its nodes and a block's margin)."""
    lat = frame.node_lat
    if float(np.abs(lat).min()) >= TROPICS_LAT + REGION_STEP_DEG:
        return False
    lon_lo, lon_hi = frame.lon_arc()
    lons = np.arange(math.floor(lon_lo / REGION_STEP_DEG) - 1, math.floor(lon_hi / REGION_STEP_DEG) + 2)
    lats = np.arange(math.floor(float(lat.min()) / REGION_STEP_DEG) - 1,
                     math.floor(float(lat.max()) / REGION_STEP_DEG) + 2)
    glon, glat = np.meshgrid((lons + 0.5) * REGION_STEP_DEG, (lats + 0.5) * REGION_STEP_DEG)
    return bool(overcast(((glon + 180.0) % 360.0) - 180.0, glat, year).any())


__all__ = ["cloud_margin", "cloud_mask", "frame_may_be_overcast", "overcast", "share"]
