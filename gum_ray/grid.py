"""The global product grid, its cells, and areas of interest (DESIGN.md decision 1 and 2).

The product grid is EPSG:4326 at 1/12000 degree (the ESA WorldCover grid): 4,320,000 columns from
longitude -180 eastwards and 2,160,000 rows from latitude +90 southwards (north-up), pixel edges on
multiples of 1/12000 degree. A **cell** is a square block of that grid, ``cell_deg`` on a side
(default 0.25 degree = 3000 px), and is exactly one Zarr shard of the product. Cells are indexed by
integer ``(row, col)`` in the global cell lattice: row 0 touches the north pole, col 0 starts at
longitude -180.

Each cell is predicted on a 10 m grid in the UTM zone of its centre, covering the cell plus a halo
(:meth:`Cell.utm_geobox`), then warped to its product GeoBox (:meth:`Cell.product_geobox`).

An :class:`AOI` is a lon/lat geometry built from a bbox (``W S E N``; a box that crosses the
antimeridian must say so) or from a GeoJSON file (a polygon that crosses the antimeridian is split
there). :func:`cells_for_aoi` lists the cells that it touches.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import shapely
from affine import Affine
from odc.geo.geobox import GeoBox
from pyproj import CRS, Transformer
from shapely.geometry import MultiPolygon, Polygon, box, mapping
from shapely.ops import unary_union

from gum_ray.errors import InputError

PIXELS_PER_DEGREE = 12000
PIXEL_DEG = 1.0 / PIXELS_PER_DEGREE
GLOBAL_WIDTH = 360 * PIXELS_PER_DEGREE  # 4,320,000 columns
GLOBAL_HEIGHT = 180 * PIXELS_PER_DEGREE  # 2,160,000 rows
PRODUCT_CRS = CRS.from_epsg(4326)

DEFAULT_CELL_DEG = 0.25
DEFAULT_CHUNK_PX = 1000
DEFAULT_HALO_PX = 128
UTM_RESOLUTION_M = 10.0

# WGS84 ellipsoid, for geodesic pixel areas
_WGS84_A = 6378137.0
_WGS84_F = 1.0 / 298.257223563
_WGS84_B = _WGS84_A * (1.0 - _WGS84_F)
_WGS84_E2 = _WGS84_F * (2.0 - _WGS84_F)
_WGS84_E = math.sqrt(_WGS84_E2)

_SNAP = 1e-6  # pixels: coordinates this close to a pixel edge are on it (float noise)
_CELL_ID = re.compile(r"^r(\d+)c(\d+)$")


# --------------------------------------------------------------------------------------- grid


@dataclass(frozen=True)
class ProductGrid:
    """The global product grid with its cell (shard) and inner chunk sizes.

    ``cell_deg`` must be a whole number of pixels that divides 180 degrees (0.25 -> 3000 px;
    tests use 0.01 -> 120 px); ``chunk_px`` (the Zarr inner chunk) must divide the cell.
    """

    cell_deg: float = DEFAULT_CELL_DEG
    chunk_px: int = DEFAULT_CHUNK_PX

    def __post_init__(self) -> None:
        px = self.cell_deg * PIXELS_PER_DEGREE
        if not (px >= 1 and abs(px - round(px)) < 1e-6 and GLOBAL_HEIGHT % round(px) == 0):
            raise InputError(
                f"cell size {self.cell_deg} degree: must be a whole number of 1/12000-degree pixels "
                f"that divides 180 degrees (e.g. 0.25 = 3000 px, 0.05 = 600 px, 0.01 = 120 px)"
            )
        cell_px = int(round(px))
        if self.chunk_px < 1 or cell_px % self.chunk_px:
            raise InputError(
                f"chunk size {self.chunk_px} px: must divide the cell size ({cell_px} px); "
                f"e.g. {cell_px // 3 if cell_px % 3 == 0 else cell_px} px"
            )

    @property
    def cell_px(self) -> int:
        """Cell side in product pixels (3000 for 0.25 degree)."""
        return int(round(self.cell_deg * PIXELS_PER_DEGREE))

    @property
    def n_rows(self) -> int:
        """Number of cell rows (from the north pole southwards)."""
        return GLOBAL_HEIGHT // self.cell_px

    @property
    def n_cols(self) -> int:
        """Number of cell columns (from longitude -180 eastwards)."""
        return GLOBAL_WIDTH // self.cell_px

    def cell(self, row: int, col: int) -> "Cell":
        """The cell at ``(row, col)``; raises :class:`InputError` outside the lattice."""
        return Cell(row, col, self)

    def cell_at(self, lon: float, lat: float) -> "Cell":
        """The cell holding the point (lon, lat)."""
        iy, ix = pixel_index(lon, lat)
        return Cell(iy // self.cell_px, ix // self.cell_px, self)

    def cell_from_id(self, cell_id: str) -> "Cell":
        """Parse a cell id such as ``r00123c04567``."""
        m = _CELL_ID.match(cell_id)
        if not m:
            raise InputError(f"cell id {cell_id!r}: expected 'r<row>c<col>', e.g. r00123c04567")
        return Cell(int(m.group(1)), int(m.group(2)), self)

    def to_attrs(self) -> dict[str, Any]:
        return {"cell_deg": self.cell_deg, "cell_px": self.cell_px, "chunk_px": self.chunk_px}

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> "ProductGrid":
        return cls(cell_deg=float(attrs["cell_deg"]), chunk_px=int(attrs["chunk_px"]))


DEFAULT_GRID = ProductGrid()


def pixel_index(lon: float, lat: float) -> tuple[int, int]:
    """Global (row, col) of the product pixel that holds (lon, lat); lon 180 wraps to -180."""
    _check_lonlat(lon, lat)
    ix = int(math.floor((lon + 180.0) * PIXELS_PER_DEGREE + _SNAP)) % GLOBAL_WIDTH
    iy = min(int(math.floor((90.0 - lat) * PIXELS_PER_DEGREE + _SNAP)), GLOBAL_HEIGHT - 1)
    return iy, ix


def pixel_center(iy: int, ix: int) -> tuple[float, float]:
    """(lon, lat) of the centre of the global pixel (iy, ix)."""
    return col_lon(ix + 0.5), row_lat(iy + 0.5)


# Coordinates are computed as (integer pixel offset) / 12000 so that they are correctly rounded
# decimals (13.3, not 13.300000000000011); 1/12000 itself is not a binary fraction.


def col_lon(col: float, step: int = 1) -> float:
    """Longitude of the west edge of global column ``col`` at pyramid ``step``."""
    return (col * step - 180 * PIXELS_PER_DEGREE) / PIXELS_PER_DEGREE


def row_lat(row: float, step: int = 1) -> float:
    """Latitude of the north edge of global row ``row`` at pyramid ``step``."""
    return (90 * PIXELS_PER_DEGREE - row * step) / PIXELS_PER_DEGREE


def window_transform(rows: slice, cols: slice, step: int = 1) -> Affine:
    """Affine of a global pixel window at pyramid ``step`` (north-up, EPSG:4326)."""
    res = step / PIXELS_PER_DEGREE
    return Affine(res, 0.0, col_lon(cols.start, step), 0.0, -res, row_lat(rows.start, step))


def x_coords(start: int, stop: int, step: int = 1) -> np.ndarray:
    """Longitudes of pixel centres for global columns [start, stop) at a pyramid step (1, 2, 4...)."""
    i = np.arange(start, stop, dtype=np.float64)
    return ((i + 0.5) * step - 180 * PIXELS_PER_DEGREE) / PIXELS_PER_DEGREE


def y_coords(start: int, stop: int, step: int = 1) -> np.ndarray:
    """Latitudes of pixel centres for global rows [start, stop) at a pyramid step (1, 2, 4...)."""
    i = np.arange(start, stop, dtype=np.float64)
    return (90 * PIXELS_PER_DEGREE - (i + 0.5) * step) / PIXELS_PER_DEGREE


def _authalic_integral(lat_deg: np.ndarray) -> np.ndarray:
    """Area on WGS84 between the equator and ``lat`` per radian of longitude (m^2)."""
    s = np.sin(np.radians(lat_deg))
    es = _WGS84_E * s
    return 0.5 * _WGS84_B**2 * (s / (1.0 - _WGS84_E2 * s * s) + np.arctanh(es) / _WGS84_E)


def pixel_area_rows(start: int, stop: int, step: int = 1) -> np.ndarray:
    """Geodesic area (m^2, WGS84) of one pixel in each global row [start, stop) at a pyramid step.

    Exact for the ellipsoidal quadrangle: ``dlon * (Q(lat_top) - Q(lat_bottom))``, with Q the
    authalic integral. About 85.9 m^2 at the equator for 1/12000 degree.
    """
    i = np.arange(start, stop, dtype=np.float64)
    top = 90.0 - i * step / PIXELS_PER_DEGREE
    bottom = 90.0 - (i + 1) * step / PIXELS_PER_DEGREE
    dlon = math.radians(step / PIXELS_PER_DEGREE)
    return dlon * (_authalic_integral(top) - _authalic_integral(bottom))


# --------------------------------------------------------------------------------------- cells


def utm_crs_for(lon: float, lat: float) -> CRS:
    """The standard 6-degree UTM zone (WGS84, EPSG:326zz north / 327zz south) of a point.

    No Norway/Svalbard exceptions; above 84 N and below 80 S the zone's projection is still
    conformal and accurate over one small cell or patch.
    """
    zone = min(int((lon + 180.0) // 6.0) + 1, 60)
    return CRS.from_epsg((32600 if lat >= 0 else 32700) + zone)


def point_geobox(lon: float, lat: float, size: int = 256, resolution: float = UTM_RESOLUTION_M) -> GeoBox:
    """The ``size`` x ``size`` GeoBox at ``resolution`` m in the point's UTM zone, centred on it.

    Pixel edges lie on multiples of ``resolution`` (the lattice of every gum-ray UTM grid), so the
    centre is within half a pixel of the point in x and in y (a patch, a demo area).
    """
    crs = utm_crs_for(lon, lat)
    x, y = Transformer.from_crs(4326, crs, always_xy=True).transform(lon, lat)
    half = size * resolution / 2.0
    x0 = round((x - half) / resolution) * resolution
    y1 = round((y + half) / resolution) * resolution
    return GeoBox((size, size), Affine(resolution, 0.0, x0, 0.0, -resolution, y1), crs)


def centre_offset_px(geobox: GeoBox, lon: float, lat: float) -> tuple[float, float]:
    """(dx, dy) in pixels from the GeoBox's centre to the point (within +-0.5 for a patch)."""
    x, y = Transformer.from_crs(4326, geobox.crs.to_wkt(), always_xy=True).transform(lon, lat)
    a = geobox.affine
    h, w = geobox.shape
    cx, cy = a.c + a.a * w / 2.0, a.f + a.e * h / 2.0
    return (x - cx) / abs(a.a), (cy - y) / abs(a.e)


@dataclass(frozen=True)
class Cell:
    """One product cell = one Zarr shard: integer ``(row, col)`` in the global cell lattice."""

    row: int
    col: int
    grid: ProductGrid = field(default=DEFAULT_GRID, compare=True, repr=False)

    def __post_init__(self) -> None:
        if not (0 <= self.row < self.grid.n_rows and 0 <= self.col < self.grid.n_cols):
            raise InputError(
                f"cell ({self.row}, {self.col}) is outside the global lattice of "
                f"{self.grid.n_rows} x {self.grid.n_cols} cells of {self.grid.cell_deg} degree"
            )

    @property
    def id(self) -> str:
        """Stable text id, ``r<row>c<col>`` zero-padded to 5 digits (``r00123c04567``)."""
        return f"r{self.row:05d}c{self.col:05d}"

    @property
    def y_slice(self) -> slice:
        """Global row range of the cell in the level-0 product array."""
        n = self.grid.cell_px
        return slice(self.row * n, (self.row + 1) * n)

    @property
    def x_slice(self) -> slice:
        """Global column range of the cell in the level-0 product array."""
        n = self.grid.cell_px
        return slice(self.col * n, (self.col + 1) * n)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.grid.cell_px, self.grid.cell_px)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(west, south, east, north) in degrees, exact multiples of the pixel size."""
        n = self.grid.cell_px
        return (
            col_lon(self.col * n), row_lat((self.row + 1) * n), col_lon((self.col + 1) * n), row_lat(self.row * n)
        )

    @property
    def center(self) -> tuple[float, float]:
        w, s, e, n = self.bounds
        return (w + e) / 2.0, (s + n) / 2.0

    def product_geobox(self) -> GeoBox:
        """The cell's GeoBox on the product grid (EPSG:4326, 1/12000 degree, north-up)."""
        w, _, _, n = self.bounds
        affine = Affine(PIXEL_DEG, 0.0, w, 0.0, -PIXEL_DEG, n)
        return GeoBox(self.shape, affine, PRODUCT_CRS)

    def utm_crs(self) -> CRS:
        """The UTM zone of the cell's centre (:func:`utm_crs_for`)."""
        return utm_crs_for(*self.center)

    def utm_geobox(
        self, halo_px: int = DEFAULT_HALO_PX, resolution: float = UTM_RESOLUTION_M
    ) -> GeoBox:
        """The 10 m UTM GeoBox that the cell is fetched and predicted on: the cell plus a halo.

        Pixel edges lie on multiples of ``resolution`` metres, so neighbouring cells in one zone
        share a pixel grid.
        """
        if halo_px < 0:
            raise InputError(f"halo {halo_px} px: must be >= 0")
        w, s, e, n = self.bounds
        t = np.linspace(0.0, 1.0, 33)
        lons = np.concatenate([w + (e - w) * t, np.full_like(t, e), e - (e - w) * t, np.full_like(t, w)])
        lats = np.concatenate([np.full_like(t, s), s + (n - s) * t, np.full_like(t, n), n - (n - s) * t])
        crs = self.utm_crs()
        xs, ys = Transformer.from_crs(PRODUCT_CRS, crs, always_xy=True).transform(lons, lats)
        pad = halo_px * resolution
        x0 = math.floor((xs.min() - pad) / resolution) * resolution
        y0 = math.floor((ys.min() - pad) / resolution) * resolution
        x1 = math.ceil((xs.max() + pad) / resolution) * resolution
        y1 = math.ceil((ys.max() + pad) / resolution) * resolution
        width = int(round((x1 - x0) / resolution))
        height = int(round((y1 - y0) / resolution))
        return GeoBox((height, width), Affine(resolution, 0.0, x0, 0.0, -resolution, y1), crs)

    def polygon(self) -> Polygon:
        return box(*self.bounds)


def geobox_to_dict(gbox: GeoBox) -> dict[str, Any]:
    """JSON-able form of a GeoBox: CRS WKT, affine (a, b, c, d, e, f) and shape (height, width)."""
    a = gbox.affine
    return {
        "crs_wkt": gbox.crs.to_wkt(),
        "transform": [a.a, a.b, a.c, a.d, a.e, a.f],
        "shape": [int(gbox.shape.y), int(gbox.shape.x)],
    }


def geobox_from_dict(d: dict[str, Any]) -> GeoBox:
    """Inverse of :func:`geobox_to_dict`."""
    return GeoBox(tuple(d["shape"]), Affine(*d["transform"]), d["crs_wkt"])


# --------------------------------------------------------------------------------------- AOI


def _check_lonlat(lon: float, lat: float, source: str = "point") -> None:
    if not (math.isfinite(lon) and math.isfinite(lat)):
        raise InputError(f"{source}: coordinates must be finite numbers, got ({lon}, {lat})")
    if not -90.0 <= lat <= 90.0:
        raise InputError(f"{source}: latitude {lat} is beyond +-90 degrees; latitudes run from -90 to 90")
    if not -180.0 <= lon <= 180.0:
        raise InputError(
            f"{source}: longitude {lon} is outside -180..180; write longitudes in -180..180 "
            f"(a box across the antimeridian is W > E with the antimeridian flag)"
        )


@dataclass(frozen=True)
class AOI:
    """An area of interest in lon/lat (EPSG:4326), split at the antimeridian into parts.

    ``geometry`` lies within -180..180 (a MultiPolygon when the area crosses the antimeridian);
    ``crosses_antimeridian`` says whether it does; ``source`` names where it came from, for messages.
    """

    geometry: Polygon | MultiPolygon
    crosses_antimeridian: bool = False
    source: str = "AOI"

    @property
    def parts(self) -> list[Polygon]:
        g = self.geometry
        return list(g.geoms) if isinstance(g, MultiPolygon) else [g]

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(W, S, E, N); W > E when the area crosses the antimeridian."""
        sides = aoi_sides(self)
        if len(sides) == 1:
            return sides[0]
        (w, s0, _, n0), (_, s1, e, n1) = sides
        return w, min(s0, s1), e, max(n0, n1)

    def area_km2(self) -> float:
        """Area on WGS84 (km^2), edges followed as drawn in lon/lat (densified to 0.01 degree)."""
        from pyproj import Geod

        geod = Geod(ellps="WGS84")
        return sum(abs(geod.geometry_area_perimeter(shapely.segmentize(p, 0.01))[0]) for p in self.parts) / 1e6

    def to_geojson(self) -> dict[str, Any]:
        return mapping(self.geometry)

    @classmethod
    def from_bbox(
        cls,
        west: float,
        south: float,
        east: float,
        north: float,
        *,
        crosses_antimeridian: bool = False,
        source: str = "bbox",
    ) -> "AOI":
        """An AOI from ``W S E N`` degrees.

        ``W > E`` is only accepted with ``crosses_antimeridian=True`` (it usually is a typo);
        with the flag the box runs east from W across 180 to E.
        """
        vals = (west, south, east, north)
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in vals):
            raise InputError(f"{source} {vals}: W S E N must be finite numbers in degrees")
        for lon, lat in ((west, south), (east, north)):
            _check_lonlat(lon, lat, source=f"{source} {_fmt_bbox(vals)}")
        if south >= north:
            raise InputError(
                f"{source} {_fmt_bbox(vals)}: south ({south}) must be less than north ({north}); "
                f"the order is W S E N"
            )
        if west == east:
            raise InputError(f"{source} {_fmt_bbox(vals)}: west equals east, the box has no width")
        if west > east and not crosses_antimeridian:
            raise InputError(
                f"{source} {_fmt_bbox(vals)}: west ({west}) is east of east ({east}). The order is "
                f"W S E N; if the box really crosses the antimeridian (180 degrees), say so with "
                f"--antimeridian"
            )
        if west < east and crosses_antimeridian:
            raise InputError(
                f"{source} {_fmt_bbox(vals)}: the antimeridian flag was given but W < E, so the "
                f"box does not cross 180 degrees; drop the flag, or give W > E"
            )
        if west > east:
            geom = MultiPolygon([box(west, south, 180.0, north), box(-180.0, south, east, north)])
            return cls(geom, True, source)
        return cls(box(west, south, east, north), False, source)

    @classmethod
    def from_geojson(cls, obj: str | Path | dict[str, Any], *, source: str | None = None) -> "AOI":
        """An AOI from a GeoJSON file path, a GeoJSON text, or a parsed GeoJSON object.

        Accepts a FeatureCollection, Feature, Polygon or MultiPolygon in lon/lat (a ``crs`` member
        is honoured or refused; see :mod:`gum_ray.aoi`, which checks every member). Polygons that
        cross the antimeridian (a ring jumping by more than 180 degrees, or longitudes beyond
        180) are split there.
        """
        from gum_ray.aoi import load_geojson, polygons_from_geojson

        data, src = load_geojson(obj, source)  # every malformed input is one InputError
        polys: list[Polygon] = []
        crosses = False
        for p in polygons_from_geojson(data, src):
            parts, c = _split_antimeridian(p, src)
            crosses |= c
            polys.extend(parts)
        merged = unary_union(polys)
        merged = shapely.make_valid(merged) if not merged.is_valid else merged
        merged = _only_polygons(merged)
        if merged.is_empty or merged.area == 0:
            raise InputError(f"{src}: the AOI has no area; give a Polygon or MultiPolygon")
        # RFC 7946 wants areas across 180 split into a MultiPolygon: parts on both edges = crossing
        crosses = crosses or _touches_both_edges(merged)
        return cls(merged, crosses, src)


def _fmt_bbox(v: Sequence[float]) -> str:
    return "(" + " ".join(f"{x:g}" for x in v) + ")"


def _parts(g: Polygon | MultiPolygon) -> list[Polygon]:
    return list(g.geoms) if isinstance(g, MultiPolygon) else [g]


def _only_polygons(g: Any) -> Polygon | MultiPolygon:
    if isinstance(g, (Polygon, MultiPolygon)):
        return g
    polys = [p for p in getattr(g, "geoms", []) if isinstance(p, (Polygon, MultiPolygon))]
    out: list[Polygon] = []
    for p in polys:
        out.extend(_parts(p))
    return MultiPolygon(out) if out else Polygon()


def _unwrap(ring: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Make a ring's longitudes continuous (no jump > 180 degrees between neighbours)."""
    out = [ring[0]]
    shift = 0.0
    for (lon0, _), (lon1, lat1) in zip(ring, ring[1:]):
        d = lon1 - lon0
        if d > 180.0:
            shift -= 360.0
        elif d < -180.0:
            shift += 360.0
        out.append((lon1 + shift, lat1))
    return out


def _split_antimeridian(rings: list[list[tuple[float, float]]], src: str) -> tuple[list[Polygon], bool]:
    """One polygon (rings) -> parts within -180..180, and whether it crossed the antimeridian."""
    un = [_unwrap(r) for r in rings]
    shell = un[0]
    # holes follow the shell's side of the world
    shell_mid = np.mean([p[0] for p in shell])
    holes = []
    for h in un[1:]:
        off = round((shell_mid - np.mean([p[0] for p in h])) / 360.0) * 360.0
        holes.append([(x + off, y) for x, y in h])
    poly = Polygon(shell, holes)
    if not poly.is_valid:
        poly = _only_polygons(shapely.make_valid(poly))
    minx, _, maxx, _ = poly.bounds
    if maxx - minx >= 360.0:
        raise InputError(f"{src}: a polygon spans 360 degrees of longitude or more; split it")
    parts: list[Polygon] = []
    crosses = False
    for k in range(-2, 3):
        window = box(-180.0 + 360.0 * k, -90.0, 180.0 + 360.0 * k, 90.0)
        piece = poly.intersection(window)
        if piece.is_empty or piece.area == 0:
            continue
        if k != 0:
            crosses = True
            piece = shapely.affinity.translate(piece, xoff=-360.0 * k)
        parts.extend(p for p in _parts(_only_polygons(piece)) if p.area > 0)
    if crosses and len(parts) == 1:
        crosses = False  # wholly beyond 180: shifted, not split
    return parts, crosses


def parse_aoi(
    bbox: Sequence[float] | None = None,
    geojson: str | Path | dict[str, Any] | None = None,
    *,
    antimeridian: bool = False,
) -> AOI:
    """An AOI from exactly one of ``bbox`` (W S E N) or ``geojson`` (file path or object)."""
    if (bbox is None) == (geojson is None):
        raise InputError("give an area of interest: either --bbox W S E N or --aoi FILE.geojson, not both")
    if bbox is not None:
        if len(bbox) != 4:
            raise InputError(f"--bbox needs 4 numbers W S E N, got {len(bbox)}")
        return AOI.from_bbox(*map(float, bbox), crosses_antimeridian=antimeridian)
    if antimeridian:
        raise InputError("--antimeridian applies to --bbox; a GeoJSON AOI is split at 180 degrees by itself")
    return AOI.from_geojson(geojson)  # type: ignore[arg-type]


def _edge_range(lo_px: float, hi_px: float, size_px: int, n: int) -> range:
    """Indices of blocks of ``size_px`` overlapping the pixel interval (lo, hi), edges excluded."""
    i0 = int(math.floor(lo_px / size_px + _SNAP / size_px))
    i1 = int(math.ceil(hi_px / size_px - _SNAP / size_px))
    return range(max(i0, 0), min(i1, n))


def _cell_ranges(bounds: Sequence[float], grid: ProductGrid) -> tuple[range, range]:
    """Cell rows and columns whose extent a (W, S, E, N) box reaches."""
    w, s, e, n = bounds
    px = grid.cell_px
    rows = _edge_range((90.0 - n) * PIXELS_PER_DEGREE, (90.0 - s) * PIXELS_PER_DEGREE, px, grid.n_rows)
    cols = _edge_range((w + 180.0) * PIXELS_PER_DEGREE, (e + 180.0) * PIXELS_PER_DEGREE, px, grid.n_cols)
    return rows, cols


def cells_for_aoi(aoi: AOI | Sequence[float], grid: ProductGrid = DEFAULT_GRID) -> list[Cell]:
    """The cells whose interior intersects the AOI, sorted by (row, col).

    ``aoi`` is an :class:`AOI` or a plain ``(W, S, E, N)`` bbox with W < E.
    """
    if not isinstance(aoi, AOI):
        aoi = AOI.from_bbox(*aoi)
    n = grid.cell_px
    found: dict[tuple[int, int], Cell] = {}
    for part in aoi.parts:
        rows, cols = _cell_ranges(part.bounds, grid)
        if not rows or not cols:
            continue
        rr, cc = np.meshgrid(np.array(rows), np.array(cols), indexing="ij")
        rr, cc = rr.ravel(), cc.ravel()
        boxes = shapely.box(col_lon(cc * n), row_lat((rr + 1) * n), col_lon((cc + 1) * n), row_lat(rr * n))
        shapely.prepare(part)
        hit = shapely.intersects(part, boxes) & ~shapely.touches(part, boxes)
        for r, c in zip(rr[hit], cc[hit]):
            found[(int(r), int(c))] = Cell(int(r), int(c), grid)
    return [found[k] for k in sorted(found)]


def aoi_windows(aoi: AOI, step: int = 1) -> list[tuple[slice, slice]]:
    """Global pixel windows (rows, cols) at pyramid ``step`` covering the AOI's bounds.

    Snapped outwards to whole pixels; two windows (east of 180 first, then west) when the AOI
    crosses the antimeridian.
    """
    out = []
    ppd = PIXELS_PER_DEGREE / step
    height, width = GLOBAL_HEIGHT // step, GLOBAL_WIDTH // step
    for w, s, e, n in aoi_sides(aoi):
        y0 = max(int(math.floor((90.0 - n) * ppd + _SNAP)), 0)
        y1 = min(int(math.ceil((90.0 - s) * ppd - _SNAP)), height)
        x0 = max(int(math.floor((w + 180.0) * ppd + _SNAP)), 0)
        x1 = min(int(math.ceil((e + 180.0) * ppd - _SNAP)), width)
        out.append((slice(y0, max(y1, y0 + 1)), slice(x0, max(x1, x0 + 1))))
    return out


def _touches_both_edges(g: Polygon | MultiPolygon) -> bool:
    ps = _parts(g)
    east = any(p.bounds[2] >= 180.0 and p.bounds[0] > -180.0 for p in ps)
    west = any(p.bounds[0] <= -180.0 and p.bounds[2] < 180.0 for p in ps)
    return east and west


def aoi_sides(aoi: AOI) -> list[tuple[float, float, float, float]]:
    """Bounds of the AOI: one box, or two (the side east of -180 that runs up to 180 first, then
    the side from -180) when it crosses the antimeridian."""
    if not aoi.crosses_antimeridian:
        return [tuple(aoi.geometry.bounds)]  # type: ignore[list-item]
    east, west = [], []
    for p in aoi.parts:
        if p.bounds[2] >= 180.0:
            east.append(p)
        elif p.bounds[0] <= -180.0:
            west.append(p)
        else:
            (east if p.centroid.x > 0 else west).append(p)
    return [tuple(unary_union(ps).bounds) for ps in (east, west) if ps]  # type: ignore[misc]


# --------------------------------------------------------------------------------------- CLI


def add_aoi_arguments(parser: Any, *, bbox_help: str = "area of interest in degrees") -> None:
    """Add ``--bbox W S E N`` / ``--aoi FILE`` / ``--antimeridian`` to an argparse parser."""
    g = parser.add_argument_group("area of interest (one of --bbox, --aoi)")
    g.add_argument(
        "--bbox", nargs=4, type=float, metavar=("W", "S", "E", "N"),
        help=f"{bbox_help}: west south east north (EPSG:4326)",
    )
    g.add_argument("--aoi", metavar="GEOJSON", help="a GeoJSON file with a Polygon or MultiPolygon (lon/lat)")
    g.add_argument(
        "--antimeridian", action="store_true",
        help="the --bbox crosses 180 degrees on purpose (then W > E)",
    )


def aoi_from_args(args: Any) -> AOI:
    """The AOI named by ``--bbox`` / ``--aoi`` / ``--antimeridian``."""
    aoi = parse_aoi(
        bbox=getattr(args, "bbox", None), geojson=getattr(args, "aoi", None),
        antimeridian=bool(getattr(args, "antimeridian", False)),
    )
    if aoi.crosses_antimeridian and getattr(args, "aoi", None):
        from gum_ray.aoi import note_antimeridian

        note_antimeridian(aoi)
    return aoi


# ------------------------------------------------------------------------- the AOI cell cap


def count_cells(aoi: AOI, grid: ProductGrid, limit: int) -> int:
    """Cells the AOI touches (as :func:`cells_for_aoi` counts them), stopping once
    more than ``limit`` are found: time and memory stay bounded whatever the AOI."""
    n = grid.cell_px
    found: set[tuple[int, int]] = set()
    for part in aoi.parts:
        rows, cols = _cell_ranges(part.bounds, grid)
        if not rows or not cols:
            continue
        shapely.prepare(part)
        cc_all = np.array(cols)
        step = max(1, min(200_000, max(limit, 1_000)) // len(cols))  # boxes per chunk ~ the limit
        for r0 in range(rows.start, rows.stop, step):
            rr, cc = np.meshgrid(np.arange(r0, min(r0 + step, rows.stop)), cc_all, indexing="ij")
            rr, cc = rr.ravel(), cc.ravel()
            boxes = shapely.box(col_lon(cc * n), row_lat((rr + 1) * n), col_lon((cc + 1) * n), row_lat(rr * n))
            hit = shapely.intersects(part, boxes) & ~shapely.touches(part, boxes)
            found.update(zip(rr[hit].tolist(), cc[hit].tolist()))
            if len(found) > limit:
                return len(found)
    return len(found)


def check_cell_cap(aoi: AOI, grid: ProductGrid, max_cells: int | None) -> None:
    """Refuse an AOI that plans more than ``max_cells`` cells (None or 0: no cap)."""
    if not max_cells:
        return
    n = count_cells(aoi, grid, max_cells)
    if n > max_cells:
        w, s, e, nn = aoi.bounds
        raise InputError(
            f"{aoi.source}: covers more than {max_cells:,} cells of {grid.cell_deg:g} degrees "
            f"(W S E N = {w:g} {s:g} {e:g} {nn:g}, about {aoi.area_km2():,.0f} km²); check for a typo or "
            "swapped/projected coordinates, or raise the cap with max_aoi_cells N (0 = no cap)",
            param="max_aoi_cells",
        )
