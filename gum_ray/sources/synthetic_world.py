"""The synthetic world: a deterministic planet with a known urban ground truth.

Everything here is a pure function of longitude, latitude and year (the rules are in
``docs/synthetic_world.md``): towns on a hashed lattice that grow from year to year, roads between
neighbouring towns, lakes, a synthetic ocean, vegetation and smooth terrain. Any grid samples it at
its pixel centres, so the same place looks the same in a UTM grid and in a lat/lon grid, and a tile
of a grid gets bit-for-bit the pixels of the whole grid there.

Values are quantised exactly to the precision of the compact integer encodings (Sentinel-2 to 1e-4
reflectance, Sentinel-1 to 0.01 dB, elevation to 1 m, slope and aspect to 0.01 degree), the same
float32 arithmetic the decoder uses, so an encode/decode round trip (the Earth Engine emulator's)
is exact.

This module holds the world's rules and its rasteriser (lattices, fields, features, painting);
:mod:`gum_ray.sources.synthetic` is its public face (``render``, the source, the ground truth).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import pyproj
from odc.geo.geobox import GeoBox

from gum_ray.bands import S1_SCALE, S2_SCALE, SLOPE_ASPECT_SCALE
from gum_ray.errors import InputError

# ----------------------------------------------------------------------------------------------
# Constants of the world (documented in docs/synthetic_world.md)
# ----------------------------------------------------------------------------------------------

EARTH_RADIUS_M = 6_371_008.8
M_PER_DEG = EARTH_RADIUS_M * math.pi / 180.0  # metres per degree of latitude (sphere)
BASE_YEAR = 2017

CLASS_VEGETATION = 0
CLASS_TOWN = 1
CLASS_ROAD = 2
CLASS_LAKE = 3
CLASS_OCEAN = 4
CLASS_NAMES = {0: "vegetation", 1: "town", 2: "road", 3: "lake", 4: "ocean"}

TOWN_STEP_DEG = 0.03  # town lattice: rows of 0.03 deg latitude, cells ~0.03 deg wide on the ground
TOWN_PROBABILITY = 0.7
TOWN_RADIUS_M = (250.0, 800.0)
TOWN_GROWTH = (0.02, 0.06)  # fractional radius growth per year
TOWN_BIRTH = (1995, 2034)  # birth years; towns born after 2017 are "new towns"
ROAD_PROBABILITY = 0.7
ROAD_HALF_WIDTH_M = 10.0
LAKE_STEP_DEG = 0.09
LAKE_PROBABILITY = 0.3
LAKE_RADIUS_M = (150.0, 650.0)
OCEAN_WEST_LON = -60.0
OCEAN_EAST_LON = -20.0
NOISE_CELLS_PER_DEG = 12000  # texture noise is constant on 1/12000-degree lon/lat cells
NODE_SPACING_PX = 16  # smooth fields are exact at nodes 16 px apart and bilinear in between

# Products in the 14-band layout: fixed reference years (ESA WorldCover 2020, GISA 2019, WSF 2019).
WORLDCOVER_YEAR = 2020
GISA_YEAR = 2019
WSF_YEAR = 2019

#: A documented demo location: a town established before 2017 (radius 710 m in 2017), 3 km east of
#: lon 8.55, lat 47.37 (the synthetic world has its own towns). The 0.05 x 0.05 degree box around it
#: holds town, road and vegetation pixels.
DEMO_LONLAT = (8.5823, 47.3818)
DEMO_BBOX = (8.5573, 47.3568, 8.6073, 47.4068)
#: A box in the synthetic ocean: no land, nothing to map.
OCEAN_BBOX = (-40.05, 10.0, -40.0, 10.05)

WORLD_VERSION = 1  #: bump when the same grid and year give other imagery (cached imagery is then not reused)

_SEED = 0x5EED_6A09_E667_F3BC

# Class signatures: S2 reflectance (B4, B3, B2, B8), S1 dB (VV, VH ascending; descending = asc + offset).
# Vegetation varies with a smooth "vigour" field v in [0, 1]: value = base + v_slope * v.
_S2_BASE = np.array(
    [  # B4     B3     B2     B8
        [0.060, 0.080, 0.050, 0.220],  # vegetation (v = 0)
        [0.150, 0.130, 0.110, 0.180],  # town: bright, NDVI ~ 0.09
        [0.110, 0.100, 0.095, 0.125],  # road (asphalt and verges)
        [0.020, 0.035, 0.045, 0.012],  # lake
        [0.018, 0.030, 0.042, 0.010],  # ocean
    ],
    dtype=np.float32,
)
_S2_VSLOPE = np.array([-0.030, -0.020, -0.015, 0.180], dtype=np.float32)  # vegetation only
_S2_NOISE = np.array([0.012, 0.012, 0.008, 0.006, 0.004], dtype=np.float32)  # +- amplitude per class
_S1_BASE = np.array(
    [  # VV      VH
        [-12.0, -18.5],  # vegetation (v = 0)
        [-5.0, -11.0],  # town: double bounce, bright
        [-7.0, -14.0],  # road
        [-22.0, -28.0],  # lake
        [-24.0, -29.0],  # ocean
    ],
    dtype=np.float32,
)
_S1_VSLOPE = np.array([1.5, 2.5], dtype=np.float32)
_S1_NOISE = np.array([0.8, 1.0, 0.8, 0.6, 0.6], dtype=np.float32)
_S1_DESC_OFFSET = np.array([-0.4, 0.6, 0.2, -0.5, -0.5], dtype=np.float32)  # per class, dB

# Terrain: elevation = 600 m + sum of plane waves on the sphere (direction, wavelength, amplitude).
_TERRAIN_WAVES = ((40_000.0, 300.0), (13_000.0, 150.0), (4_100.0, 60.0), (1_700.0, 20.0))
_TERRAIN_BASE_M = 600.0
_VIGOUR_WAVES = ((5_200.0, 0.5), (1_900.0, 0.35), (700.0, 0.15))

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_P1 = np.uint64(0x9E3779B97F4A7C15)
_P2 = np.uint64(0xC2B2AE3D27D4EB4F)
_P3 = np.uint64(0x165667B19E3779F9)
_P4 = np.uint64(0x27D4EB2F165667C5)


# ----------------------------------------------------------------------------------------------
# Hashing and small geometry helpers
# ----------------------------------------------------------------------------------------------


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on a uint64 array (returns a new array)."""
    x = x ^ (x >> np.uint64(30))
    x *= _M1
    x ^= x >> np.uint64(27)
    x *= _M2
    x ^= x >> np.uint64(31)
    return x


def _u01(j: np.ndarray, i: np.ndarray, salt: int, k: int) -> np.ndarray:
    """A uniform [0, 1) number per lattice cell (j, i) and attribute k: deterministic, seedable."""
    with np.errstate(over="ignore"):
        x = (
            np.asarray(j, np.int64).view(np.uint64) * _P1
            + np.asarray(i, np.int64).view(np.uint64) * _P2
            + np.uint64((salt * 0x100 + k) & 0xFFFFFFFFFFFFFFFF) * _P3
            + np.uint64(_SEED)
        )
        x = _mix64(_mix64(x) + _P4)
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)


def _wrap180(d: np.ndarray | float) -> np.ndarray | float:
    """Wrap a longitude or a longitude difference into [-180, 180)."""
    return (np.asarray(d) + 180.0) % 360.0 - 180.0


def _coast_west(lat: np.ndarray) -> np.ndarray:
    return OCEAN_WEST_LON + 0.08 * np.sin(lat * (2 * np.pi / 0.7)) + 0.03 * np.sin(lat * (2 * np.pi / 0.13))


def _coast_east(lat: np.ndarray) -> np.ndarray:
    return OCEAN_EAST_LON + 0.08 * np.sin(lat * (2 * np.pi / 0.53) + 1.3) + 0.03 * np.sin(
        lat * (2 * np.pi / 0.11) + 0.4
    )


def is_ocean(lon: Any, lat: Any) -> np.ndarray | bool:
    """True in the synthetic ocean: ``coast_west(lat) <= lon < coast_east(lat)``.

    The coasts wiggle by at most 0.11 degree around longitudes -60 and -20, so the band
    -59.8 < lon < -20.2 is open ocean at every latitude (see docs/synthetic_world.md).
    """
    lon_a = _wrap180(np.asarray(lon, dtype=np.float64))
    lat_a = np.asarray(lat, dtype=np.float64)
    out = (lon_a >= _coast_west(lat_a)) & (lon_a < _coast_east(lat_a))
    return bool(out) if out.ndim == 0 else out


def is_land(lon: Any, lat: Any) -> np.ndarray | bool:
    """True outside the synthetic ocean (lakes count as land: they sit inside land areas)."""
    out = np.logical_not(is_ocean(lon, lat))
    return bool(out) if np.ndim(out) == 0 else out


def _local_xy(lon: np.ndarray, lat: np.ndarray, lon0: float, lat0: float) -> tuple[np.ndarray, np.ndarray]:
    """Metres east and north of (lon0, lat0) in the local tangent approximation (cos(lat0) corrected)."""
    k = math.cos(math.radians(lat0)) * M_PER_DEG
    return _wrap180(lon - lon0) * k, (lat - lat0) * M_PER_DEG


# ----------------------------------------------------------------------------------------------
# Lattices of features
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Lattice:
    """Rows of ``step`` degrees latitude; each row has ``n_j`` cells of equal longitude width."""

    step: float
    salt: int

    def n_cells(self, j: np.ndarray) -> np.ndarray:
        lat_mid = (np.asarray(j, np.float64) + 0.5) * self.step
        n = np.floor(360.0 * np.cos(np.radians(lat_mid)) / self.step)
        return np.maximum(n, 1).astype(np.int64)

    def cells(self, lat_lo: float, lat_hi: float, lon_lo: float, lon_hi: float) -> tuple[np.ndarray, np.ndarray]:
        """All (row, col) cells meeting the box; ``lon_lo`` may be < -180 / ``lon_hi`` > 180."""
        j0 = math.floor(max(lat_lo, -90.0) / self.step)
        j1 = math.floor(min(lat_hi, 90.0 - 1e-9) / self.step)
        js, is_ = [], []
        for j in range(j0, j1 + 1):
            n = int(self.n_cells(np.array([j]))[0])
            w = 360.0 / n
            if lon_hi - lon_lo >= 360.0 - w:
                i = np.arange(n, dtype=np.int64)
            else:
                i0 = math.floor((lon_lo + 180.0) / w)
                i1 = math.floor((lon_hi + 180.0) / w)
                i = np.unique(np.arange(i0, i1 + 1, dtype=np.int64) % n)
            js.append(np.full(i.shape, j, np.int64))
            is_.append(i)
        if not js:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(js), np.concatenate(is_)

    def centre(self, j: np.ndarray, i: np.ndarray, uj: np.ndarray, ui: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Feature centre inside cell (j, i), at fractions 0.2 + 0.6 u of the cell."""
        w = 360.0 / self.n_cells(j)
        lon = -180.0 + (i + 0.2 + 0.6 * ui) * w
        lat = (j + 0.2 + 0.6 * uj) * self.step
        return lon, lat


_TOWNS = _Lattice(TOWN_STEP_DEG, salt=1)
_LAKES = _Lattice(LAKE_STEP_DEG, salt=2)


@dataclass(frozen=True)
class Town:
    """One town of the synthetic world (``radius_m`` is for the year asked; 0 = not built yet)."""

    lon: float
    lat: float
    radius_m: float
    birth_year: int
    lobe_amp: float
    lobe_phase: float


def _town_table(j: np.ndarray, i: np.ndarray, year: int) -> dict[str, np.ndarray]:
    """Attributes of the town candidates in cells (j, i) for ``year`` (radius 0 = no town)."""
    u = [_u01(j, i, _TOWNS.salt, k) for k in range(10)]
    lon, lat = _TOWNS.centre(j, i, u[2], u[1])
    r0 = TOWN_RADIUS_M[0] + (TOWN_RADIUS_M[1] - TOWN_RADIUS_M[0]) * u[3]
    growth = TOWN_GROWTH[0] + (TOWN_GROWTH[1] - TOWN_GROWTH[0]) * u[4]
    birth = TOWN_BIRTH[0] + np.floor(u[5] * (TOWN_BIRTH[1] - TOWN_BIRTH[0] + 1))
    dy = float(year - BASE_YEAR)
    established = r0 * np.maximum(1.0 + growth * dy, 0.5)
    new = np.minimum(r0 * (0.35 + 0.1 * (year - birth)), established)
    radius = np.where(birth <= BASE_YEAR, established, np.where(year >= birth, new, 0.0))
    present = (u[0] < TOWN_PROBABILITY) & np.asarray(is_land(lon, lat))
    radius = np.where(present, radius, 0.0)
    return {
        "j": j,
        "i": i,
        "lon": lon,
        "lat": lat,
        "radius": radius,
        "birth": birth,
        "lobe_amp": 0.25 * u[6],
        "lobe_phase": 2 * np.pi * u[7],
        "road_e": u[8] < ROAD_PROBABILITY,
        "road_n": u[9] < ROAD_PROBABILITY,
    }


def _lake_table(j: np.ndarray, i: np.ndarray) -> dict[str, np.ndarray]:
    u = [_u01(j, i, _LAKES.salt, k) for k in range(6)]
    lon, lat = _LAKES.centre(j, i, u[2], u[1])
    radius = LAKE_RADIUS_M[0] + (LAKE_RADIUS_M[1] - LAKE_RADIUS_M[0]) * u[3]
    radius = np.where(u[0] < LAKE_PROBABILITY, radius, 0.0)
    return {"lon": lon, "lat": lat, "radius": radius, "lobe_amp": 0.3 * u[4], "lobe_phase": 2 * np.pi * u[5]}


def _town_max_radius(year: int) -> float:
    dy = max(year - BASE_YEAR, 0)
    return TOWN_RADIUS_M[1] * (1 + TOWN_GROWTH[1] * dy) * 1.25


def towns_near(lon: float, lat: float, radius_km: float, year: int) -> list[Town]:
    """Towns (radius > 0 in ``year``) whose centre lies within ``radius_km`` of (lon, lat)."""
    dlat = radius_km * 1000.0 / M_PER_DEG
    dlon = dlat / max(math.cos(math.radians(lat)), 1e-6)
    j, i = _TOWNS.cells(lat - dlat, lat + dlat, lon - dlon, lon + dlon)
    t = _town_table(j, i, year)
    ex, ey = _local_xy(t["lon"], t["lat"], lon, lat)
    keep = (t["radius"] > 0) & (np.hypot(ex, ey) <= radius_km * 1000.0)
    return [
        Town(float(t["lon"][k]), float(t["lat"][k]), float(t["radius"][k]), int(t["birth"][k]),
             float(t["lobe_amp"][k]), float(t["lobe_phase"][k]))
        for k in np.flatnonzero(keep)
    ]


# ----------------------------------------------------------------------------------------------
# Grid geometry: snapped pixel centres, a node lattice, lon/lat per pixel
# ----------------------------------------------------------------------------------------------

_tls = threading.local()


def _to_lonlat_transformer(crs_key: str) -> pyproj.Transformer:
    """A per-thread cached transformer to EPSG:4326 (pyproj transformers are not thread-safe)."""
    cache = getattr(_tls, "transformers", None)
    if cache is None:
        cache = _tls.transformers = {}
    t = cache.get(crs_key)
    if t is None:
        t = cache[crs_key] = pyproj.Transformer.from_crs(pyproj.CRS.from_user_input(crs_key), 4326, always_xy=True)
    return t


def _snapped_centres(origin: float, step: float, n: int) -> np.ndarray:
    """Pixel-centre coordinates ``origin + (k + 0.5) step``, computed from integers.

    The grid's phase (its centre offset in pixel units) is snapped to 1e-6 px, so a tile of a grid
    and the whole grid compute bit-identical coordinates for the same pixel.
    """
    t0 = origin / step + 0.5
    base = math.floor(t0)
    phase = round((t0 - base) * 1e6) / 1e6
    if phase >= 1.0:
        base, phase = base + 1, 0.0
    return (np.arange(base, base + n, dtype=np.float64) + phase) * step


class _Frame:
    """Where a grid's pixels are on Earth.

    Smooth fields (lon/lat of projected grids, terrain, vegetation vigour) are evaluated exactly at
    a lattice of nodes every 16 pixels, anchored at multiples of 16 pixel sizes in the grid's CRS,
    and interpolated bilinearly in between: cheap, and identical for a tile and for its whole grid.
    """

    def __init__(self, geobox: GeoBox) -> None:
        a = geobox.affine
        if a.b != 0 or a.d != 0:
            raise InputError(
                "synthetic world: the target grid is rotated or sheared; use an axis-aligned GeoBox "
                "(e.g. GeoBox.from_bbox)"
            )
        self.h, self.w = (int(v) for v in geobox.shape)
        self.xs = _snapped_centres(a.c, a.a, self.w)
        self.ys = _snapped_centres(a.f, a.e, self.h)
        crs = geobox.crs
        self.direct = crs.epsg == 4326
        self.crs_key = f"EPSG:{crs.epsg}" if crs.epsg is not None else crs.to_wkt()
        dx = NODE_SPACING_PX * abs(a.a)
        dy = NODE_SPACING_PX * abs(a.e)
        tx, ty = self.xs / dx, self.ys / dy
        fkx, fky = np.floor(tx), np.floor(ty)
        kx0, ky0 = int(fkx.min()), int(fky.min())
        self.kx = (fkx - kx0).astype(np.intp)
        self.ky = (fky - ky0).astype(np.intp)
        self.fx = tx - fkx
        self.fy = ty - fky
        nc = int(self.kx.max()) + 2
        nr = int(self.ky.max()) + 2
        node_x = (kx0 + np.arange(nc, dtype=np.float64)) * dx
        node_y = (ky0 + np.arange(nr, dtype=np.float64)) * dy
        gx, gy = np.meshgrid(node_x, node_y)
        if self.direct:
            lon, lat = gx, gy
        else:
            lon, lat = _to_lonlat_transformer(self.crs_key).transform(gx, gy)
        self.node_lon = _wrap180(np.asarray(lon, np.float64))
        self.node_lat = np.asarray(lat, np.float64)
        if not np.all(np.isfinite(self.node_lon)) or not np.all(np.isfinite(self.node_lat)):
            raise InputError(
                f"synthetic world: the target grid in {self.crs_key} reaches outside the CRS's valid "
                "area (coordinates do not map to longitude/latitude); use a grid inside its CRS's area"
            )
        self._lon_pass = self.xpass(self.node_lon, wrap=True)
        self._lat_pass = self.xpass(self.node_lat, wrap=False)
        self._spacing: float | None = None
        # pixel index ranges per node cell (rows and columns are monotone in the node index)
        self.col_ranges = self._ranges(self.kx, nc - 1)
        self.row_ranges = self._ranges(self.ky, nr - 1)

    @staticmethod
    def _ranges(k: np.ndarray, n: int) -> np.ndarray:
        """(n, 2) first/last+1 pixel index for each node cell (empty cells: (0, 0))."""
        out = np.zeros((n, 2), np.intp)
        idx = np.arange(k.size)
        lo = np.full(n, k.size, np.intp)
        hi = np.full(n, -1, np.intp)
        np.minimum.at(lo, k, idx)
        np.maximum.at(hi, k, idx)
        ok = hi >= 0
        out[ok, 0] = lo[ok]
        out[ok, 1] = hi[ok] + 1
        return out

    def xpass(self, nodes: np.ndarray, *, wrap: bool = False, dtype: Any = np.float64):
        """First (along x) pass of the bilinear interpolation of a node field.

        Returns ``(u, du)``: ``u[r, j]`` the field on node row r at pixel column j, ``du`` the step
        to the next node row. Both depend only on absolute node values and the pixel column, so a
        tile and its whole grid get identical numbers.
        """
        a = nodes[:, self.kx]
        d = nodes[:, self.kx + 1] - a
        if wrap:
            d = _wrap180(d)
        u = a + self.fx * d
        du = u[1:] - u[:-1]
        if wrap:
            du = _wrap180(du)
        return u.astype(dtype, copy=False), du.astype(dtype, copy=False)

    def ypass(self, passes, r0: int, r1: int, c0: int = 0, c1: int | None = None) -> np.ndarray:
        """Second pass: the field at pixel rows r0:r1, columns c0:c1."""
        u, du = passes
        c1 = self.w if c1 is None else c1
        ky = self.ky[r0:r1]
        out = u[ky, c0:c1]
        out += self.fy[r0:r1, None].astype(u.dtype) * du[ky, c0:c1]
        return out

    def lonlat(self, r0: int = 0, r1: int | None = None, c0: int = 0, c1: int | None = None):
        """Longitude in [-180, 180) and latitude (float64) of pixel centres rows r0:r1, cols c0:c1."""
        r1 = self.h if r1 is None else r1
        c1 = self.w if c1 is None else c1
        if self.direct:
            lon = np.broadcast_to(_wrap180(self.xs[c0:c1])[None, :], (r1 - r0, c1 - c0))
            lat = np.broadcast_to(self.ys[r0:r1, None], (r1 - r0, c1 - c0))
            return lon, lat
        lon = _wrap180(self.ypass(self._lon_pass, r0, r1, c0, c1))
        lat = self.ypass(self._lat_pass, r0, r1, c0, c1)
        return lon, lat

    def lon_arc(self) -> tuple[float, float]:
        """The smallest longitude interval holding all nodes (may extend past +-180)."""
        ref = float(self.node_lon[self.node_lon.shape[0] // 2, self.node_lon.shape[1] // 2])
        d = _wrap180(self.node_lon - ref)
        return ref + float(d.min()), ref + float(d.max())

    def node_spacing_m(self) -> float:
        """Largest ground distance between neighbouring nodes (diagonal), metres."""
        if self._spacing is None:
            self._spacing = self._node_spacing()
        return self._spacing

    def _node_spacing(self) -> float:
        lat = self.node_lat
        k = np.cos(np.radians(lat)) * M_PER_DEG
        ex = np.abs(_wrap180(np.diff(self.node_lon, axis=1))) * k[:, 1:]
        ny = np.abs(np.diff(lat, axis=1)) * M_PER_DEG
        ex2 = np.abs(_wrap180(np.diff(self.node_lon, axis=0))) * k[1:, :]
        ny2 = np.abs(np.diff(lat, axis=0)) * M_PER_DEG
        sx = float(np.hypot(ex, ny).max()) if ex.size else 0.0
        sy = float(np.hypot(ex2, ny2).max()) if ex2.size else 0.0
        return math.hypot(sx, sy) * 1.05 + 1.0


# ----------------------------------------------------------------------------------------------
# Smooth fields on the sphere: terrain and vegetation vigour
# ----------------------------------------------------------------------------------------------


def _wave_table(waves: Iterable[tuple[float, float]], salt: int) -> list[tuple[np.ndarray, float, float]]:
    """Plane waves on the sphere: (3-D wave vector rad/m, phase, amplitude)."""
    out = []
    for k, (wavelength, amp) in enumerate(waves):
        u = [_u01(np.array([salt]), np.array([k]), 7, m)[0] for m in range(3)]
        z = 2 * u[0] - 1
        t = 2 * np.pi * u[1]
        r = math.sqrt(max(0.0, 1 - z * z))
        direction = np.array([r * math.cos(t), r * math.sin(t), z])
        out.append((direction * (2 * np.pi / wavelength), 2 * np.pi * u[2], amp))
    return out


_TERRAIN = _wave_table(_TERRAIN_WAVES, salt=11)
_VIGOUR = _wave_table(_VIGOUR_WAVES, salt=12)


def _unit_vectors(lon: np.ndarray, lat: np.ndarray):
    lo, la = np.radians(lon), np.radians(lat)
    clo, slo, cla, sla = np.cos(lo), np.sin(lo), np.cos(la), np.sin(la)
    p = np.stack([cla * clo, cla * slo, sla]) * EARTH_RADIUS_M
    east = np.stack([-slo, clo, np.zeros_like(lo)])
    north = np.stack([-sla * clo, -sla * slo, cla])
    return p, east, north


def _terrain_nodes(lon: np.ndarray, lat: np.ndarray):
    """Elevation (m) and its gradient (east, north; m/m) at nodes, exactly."""
    p, east, north = _unit_vectors(lon, lat)
    elev = np.full(lon.shape, _TERRAIN_BASE_M)
    ge = np.zeros(lon.shape)
    gn = np.zeros(lon.shape)
    for kvec, phase, amp in _TERRAIN:
        arg = np.tensordot(kvec, p, axes=1) + phase
        elev += amp * np.sin(arg)
        c = amp * np.cos(arg)
        ge += c * np.tensordot(kvec, east, axes=1)
        gn += c * np.tensordot(kvec, north, axes=1)
    return elev, ge, gn


def _vigour_nodes(lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
    p, _, _ = _unit_vectors(lon, lat)
    v = np.zeros(lon.shape)
    for kvec, phase, amp in _VIGOUR:
        v += amp * np.sin(np.tensordot(kvec, p, axes=1) + phase)
    return np.clip(0.5 + 0.5 * v, 0.0, 1.0)


# ----------------------------------------------------------------------------------------------
# The class map: features rasterised in windows found on the node lattice
# ----------------------------------------------------------------------------------------------


@dataclass
class _Features:
    """Discs and segments in lon/lat: A=(lon, lat), B, radius (m); kind: 'town', 'road', 'lake'."""

    lon_a: np.ndarray
    lat_a: np.ndarray
    lon_b: np.ndarray
    lat_b: np.ndarray
    radius: np.ndarray
    lobe_amp: np.ndarray
    lobe_phase: np.ndarray
    lobes: int

    def __len__(self) -> int:
        return int(self.lon_a.size)


def _discs(t: dict[str, np.ndarray], lobes: int, scale: float = 1.0) -> _Features:
    keep = t["radius"] > 0
    lon, lat = t["lon"][keep], t["lat"][keep]
    return _Features(lon, lat, lon, lat, t["radius"][keep] * scale, t["lobe_amp"][keep], t["lobe_phase"][keep], lobes)


def _roads(t: dict[str, np.ndarray], year: int) -> _Features:
    """Roads from each present town to its east and north neighbours that are present too."""
    lon_a, lat_a, lon_b, lat_b = [], [], [], []
    has = t["radius"] > 0
    j, i = t["j"], t["i"]
    n = _TOWNS.n_cells(j)
    # east neighbour: same row, next cell
    ie = (i + 1) % n
    te = _town_table(j, ie, year)
    ok = has & t["road_e"] & (te["radius"] > 0)
    lon_a.append(t["lon"][ok]); lat_a.append(t["lat"][ok]); lon_b.append(te["lon"][ok]); lat_b.append(te["lat"][ok])
    # north neighbour: the cell of the next row that contains this town's longitude
    jn = j + 1
    wn = 360.0 / _TOWNS.n_cells(jn)
    i_n = np.floor((_wrap180(t["lon"]) + 180.0) / wn).astype(np.int64) % _TOWNS.n_cells(jn)
    tn = _town_table(jn, i_n, year)
    ok = has & t["road_n"] & (tn["radius"] > 0)
    lon_a.append(t["lon"][ok]); lat_a.append(t["lat"][ok]); lon_b.append(tn["lon"][ok]); lat_b.append(tn["lat"][ok])
    la, pa, lb, pb = (np.concatenate(v) for v in (lon_a, lat_a, lon_b, lat_b))
    z = np.zeros(la.shape)
    return _Features(la, pa, lb, pb, np.full(la.shape, ROAD_HALF_WIDTH_M), z, z, 0)


def _segment_distance(ex, ey, bx, by):
    """Distance from points (ex, ey) to the segment (0, 0)-(bx, by), all metres."""
    l2 = bx * bx + by * by
    if np.ndim(l2) == 0 and l2 == 0:
        return np.hypot(ex, ey)
    with np.errstate(invalid="ignore", divide="ignore"):
        t = np.where(l2 > 0, (ex * bx + ey * by) / np.where(l2 > 0, l2, 1.0), 0.0)
    t = np.clip(t, 0.0, 1.0)
    return np.hypot(ex - t * bx, ey - t * by)


def _inside(f: _Features, k: int, lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
    """Exact membership of pixels (lon, lat) in feature k."""
    lon0, lat0 = float(f.lon_a[k]), float(f.lat_a[k])
    ex, ey = _local_xy(lon, lat, lon0, lat0)
    if f.lobes == 0:  # segment
        bx, by = _local_xy(np.float64(f.lon_b[k]), np.float64(f.lat_b[k]), lon0, lat0)
        return _segment_distance(ex, ey, float(bx), float(by)) <= float(f.radius[k])
    # a lobed disc: d < R (1 + a sin(lobes * theta + phase)); only the ring R(1 - a) <= d < R(1 + a)
    # needs the angle
    radius, amp, ph = float(f.radius[k]), float(f.lobe_amp[k]), float(f.lobe_phase[k])
    d2 = ex * ex + ey * ey
    r_in, r_out = radius * (1.0 - amp), radius * (1.0 + amp)
    inside = d2 < r_in * r_in
    ring = (d2 < r_out * r_out) & ~inside
    if ring.any():
        x, y = ex[ring], ey[ring]
        d = np.sqrt(d2[ring])
        s, c = y / d, x / d  # d >= R(1 - a) > 0 in the ring
        if f.lobes == 3:
            sn, cs = 3 * s - 4 * s**3, 4 * c**3 - 3 * c
        else:  # 2 lobes
            sn, cs = 2 * s * c, c * c - s * s
        inside[ring] = d < radius * (1.0 + amp * (sn * math.cos(ph) + cs * math.sin(ph)))
    return inside


def _paint(frame: _Frame, f: _Features, target: np.ndarray, value: int, only_where: int | None,
           max_extent: float) -> None:
    """Rasterise features into ``target`` (class codes), writing ``value`` where the feature is and
    the current class equals ``only_where`` (None = anywhere)."""
    if len(f) == 0:
        return
    pad = frame.node_spacing_m()
    nlon, nlat = frame.node_lon, frame.node_lat
    band = 4  # node-cell rows per window
    nr, nc = nlon.shape
    # cheap pre-cull: features whose lon/lat box (grown by their reach) misses the grid's box
    reach_all = f.radius * (1.0 + f.lobe_amp) + pad
    dlat = reach_all / M_PER_DEG
    lat_lo, lat_hi = float(nlat.min()), float(nlat.max())
    lon_lo, lon_hi = frame.lon_arc()
    lon_c, half = 0.5 * (lon_lo + lon_hi), 0.5 * (lon_hi - lon_lo)
    fa = _wrap180(f.lon_a - lon_c)
    fb = fa + _wrap180(f.lon_b - f.lon_a)
    coslat = np.cos(np.radians(np.clip(np.maximum(np.abs(f.lat_a), np.abs(f.lat_b)) + dlat, 0, 89.9)))
    dlon = dlat / coslat
    keep = (
        (np.minimum(f.lat_a, f.lat_b) - dlat <= lat_hi)
        & (np.maximum(f.lat_a, f.lat_b) + dlat >= lat_lo)
        & (np.minimum(fa, fb) - dlon <= half)
        & (np.maximum(fa, fb) + dlon >= -half)
    )
    for k in np.flatnonzero(keep):
        lon0, lat0 = float(f.lon_a[k]), float(f.lat_a[k])
        ex, ey = _local_xy(nlon, nlat, lon0, lat0)
        if f.lobes == 0:
            bx, by = _local_xy(np.float64(f.lon_b[k]), np.float64(f.lat_b[k]), lon0, lat0)
            dist = _segment_distance(ex, ey, float(bx), float(by))
            reach = float(f.radius[k]) + pad
        else:
            dist = np.hypot(ex, ey)
            reach = float(f.radius[k]) * (1.0 + float(f.lobe_amp[k])) + pad
        near = dist <= reach
        if not near.any():
            continue
        cells = near[:-1, :-1] | near[:-1, 1:] | near[1:, :-1] | near[1:, 1:]
        for b0 in range(0, nr - 1, band):
            blk = cells[b0 : b0 + band]
            cols = np.flatnonzero(blk.any(axis=0))
            if cols.size == 0:
                continue
            rows = np.flatnonzero(blk.any(axis=1)) + b0
            rr = frame.row_ranges[rows]
            cr = frame.col_ranges[cols[0] : cols[-1] + 1]
            r0, r1 = int(rr[:, 0][rr[:, 1] > 0].min(initial=frame.h)), int(rr[:, 1].max())
            c_ok = cr[:, 1] > 0
            if r1 <= r0 or not c_ok.any():
                continue
            c0, c1 = int(cr[c_ok, 0].min()), int(cr[c_ok, 1].max())
            lon, lat = frame.lonlat(r0, r1, c0, c1)
            hit = _inside(f, k, lon, lat)
            win = target[r0:r1, c0:c1]
            if only_where is not None:
                hit &= win == only_where
            win[hit] = value


def _candidates(frame: _Frame, lattice: _Lattice, margin_m: float):
    lat_lo = float(frame.node_lat.min()) - margin_m / M_PER_DEG
    lat_hi = float(frame.node_lat.max()) + margin_m / M_PER_DEG
    lon_lo, lon_hi = frame.lon_arc()
    coslat = math.cos(math.radians(min(89.0, max(abs(lat_lo), abs(lat_hi)))))
    dlon = margin_m / (M_PER_DEG * coslat)
    return lattice.cells(lat_lo, lat_hi, lon_lo - dlon, lon_hi + dlon)


def _ocean_map(frame: _Frame, out: np.ndarray, block: int = 512) -> None:
    """Mark ocean pixels (CLASS_OCEAN) in ``out``; cheap when the grid is far from both coasts."""
    lon_lo, lon_hi = frame.lon_arc()
    margin = 0.2 + 1e-3
    lon_c = 0.5 * (lon_lo + lon_hi)
    near_coast = any(
        abs(float(_wrap180(c - lon_c))) <= 0.5 * (lon_hi - lon_lo) + margin
        for c in (OCEAN_WEST_LON, OCEAN_EAST_LON)
    )
    if not near_coast:
        lat_c = float(frame.node_lat.mean())
        if is_ocean(lon_c, lat_c):
            out[...] = CLASS_OCEAN
        return
    for r0 in range(0, frame.h, block):
        r1 = min(frame.h, r0 + block)
        lon, lat = frame.lonlat(r0, r1)
        out[r0:r1][np.asarray(is_ocean(lon, lat))] = CLASS_OCEAN


def _class_map(frame: _Frame, year: int, *, water: np.ndarray | None = None) -> np.ndarray:
    """uint8 class codes for the grid: ocean, lakes, towns (in ``year``), roads, vegetation."""
    if water is None:
        cls = np.zeros((frame.h, frame.w), np.uint8)
        _ocean_map(frame, cls)
        if not (cls == CLASS_OCEAN).all():
            lj, li = _candidates(frame, _LAKES, LAKE_RADIUS_M[1] * 1.35)
            _paint(frame, _discs(_lake_table(lj, li), lobes=2), cls, CLASS_LAKE, CLASS_VEGETATION, 0)
    else:
        cls = water.copy()
    if (cls == CLASS_OCEAN).all():
        return cls
    reach = _town_max_radius(year) + 2.5 * TOWN_STEP_DEG * M_PER_DEG * 1.5
    tj, ti = _candidates(frame, _TOWNS, reach)
    towns = _town_table(tj, ti, year)
    _paint(frame, _discs(towns, lobes=3), cls, CLASS_TOWN, CLASS_VEGETATION, 0)
    _paint(frame, _roads(towns, year), cls, CLASS_ROAD, CLASS_VEGETATION, 0)
    return cls


def _water_only(cls: np.ndarray) -> np.ndarray:
    out = np.where((cls == CLASS_LAKE) | (cls == CLASS_OCEAN), cls, CLASS_VEGETATION).astype(np.uint8)
    return out


# ----------------------------------------------------------------------------------------------
# Rendering the bands
# ----------------------------------------------------------------------------------------------


def _noise(lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
    """Four independent uniform [-0.5, 0.5) noise fields (4, h, w) float32, constant on
    1/12000-degree cells of longitude and latitude."""
    ix = np.floor(lon * NOISE_CELLS_PER_DEG).astype(np.int64).view(np.uint64)
    iy = np.floor(lat * NOISE_CELLS_PER_DEG).astype(np.int64).view(np.uint64)
    with np.errstate(over="ignore"):
        hsh = ix * _P1
        hsh ^= iy * _P2
        hsh += np.uint64(_SEED)
        hsh = _mix64(hsh)
    out = np.empty((4,) + lon.shape, np.float32)
    for k in range(4):
        v = (hsh >> np.uint64(16 * k)) & np.uint64(0xFFFF)
        np.multiply(v.astype(np.float32), np.float32(1.0 / 65536.0), out=out[k])
        out[k] -= np.float32(0.5)
    return out


def _quantise(x: np.ndarray, scale: float) -> None:
    """In place: round to 1/scale and divide back, exactly as the compact decoder computes."""
    s = np.float32(scale)
    x *= s
    np.rint(x, out=x)
    x /= s


def _render_rows(frame, cls, r0, r1, year_fields, want: set[str], out: dict[str, np.ndarray]) -> None:
    c = cls[r0:r1]
    lon, lat = frame.lonlat(r0, r1)
    noise = _noise(np.asarray(lon), np.asarray(lat))
    veg = c == CLASS_VEGETATION
    if "s2" in want or "s1" in want:
        vig = frame.ypass(year_fields["vigour"], r0, r1)
        vig *= veg
    if "s2" in want:
        amp = np.take(_S2_NOISE * 2, c)
        for b in range(4):
            x = np.take(_S2_BASE[:, b], c)
            x += vig * _S2_VSLOPE[b]
            x += amp * noise[0 if b < 3 else 1] * (1.0 if b != 1 else 0.8)
            np.clip(x, 0.001, 0.9, out=x)
            _quantise(x, S2_SCALE)
            out["s2"][b, r0:r1] = x
    if "s1" in want:
        amp = np.take(_S1_NOISE * 2, c)
        off = np.take(_S1_DESC_OFFSET, c)
        for b in range(2):
            base = np.take(_S1_BASE[:, b], c)
            base += vig * _S1_VSLOPE[b]
            asc = base + amp * noise[2] * (1.0 if b == 0 else 0.9)
            desc = base + off + amp * noise[3] * (1.0 if b == 0 else 0.9)
            for x, dst in ((asc, b), (desc, 2 + b)):
                np.clip(x, -30.0, 5.0, out=x)
                _quantise(x, S1_SCALE)
                out["s1"][dst, r0:r1] = x
    if "terrain" in want:
        ocean = c == CLASS_OCEAN
        elev = frame.ypass(year_fields["elev"], r0, r1)
        ge = frame.ypass(year_fields["ge"], r0, r1)
        gn = frame.ypass(year_fields["gn"], r0, r1)
        slope = np.degrees(np.arctan(np.hypot(ge, gn)))
        aspect = np.degrees(np.arctan2(-ge, -gn))
        aspect %= np.float32(360.0)
        np.rint(elev, out=elev)
        _quantise(slope, SLOPE_ASPECT_SCALE)
        aspect *= np.float32(SLOPE_ASPECT_SCALE)
        np.rint(aspect, out=aspect)
        aspect %= np.float32(36000.0)
        aspect /= np.float32(SLOPE_ASPECT_SCALE)
        for x in (elev, slope, aspect):
            x[ocean] = 0.0
        out["terrain"][0, r0:r1] = elev
        out["terrain"][1, r0:r1] = slope
        out["terrain"][2, r0:r1] = aspect
