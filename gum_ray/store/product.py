"""The global product store: a sharded Zarr v3 GeoZarr of P(urban) (DESIGN.md decisions 1 and 11).

Layout (``<root>`` is a local folder or ``gs://bucket/prefix``)::

    <root>/zarr.json                    group: CF + GeoZarr attributes, ``gum_product`` settings,
                                        consolidated metadata of every array below
    <root>/probability                  uint8 (year, y, x), 0-100 %, 255 = no data; one shard per
                                        cell (1, cell_px, cell_px), inner chunks (1, chunk_px, chunk_px)
    <root>/input_quality                uint8 (year, y, x) bit flags 1 = S2, 2 = S1, 4 = terrain,
                                        255 = not mapped; same shards (:mod:`.quality`; absent in
                                        products written before it existed)
    <root>/year                         int32 (year)     calendar year of each index
    <root>/y, <root>/x                  float64 pixel-centre latitude (descending) / longitude
    <root>/pixel_area                   float64 (y)      geodesic area of one pixel in m^2 (WGS84)
    <root>/spatial_ref                  CF grid mapping: crs_wkt, GeoTransform
    <root>/overviews/<k>/...            the same variables at 2^k times the pixel size (2x2 means)
    <root>/_manifest/...                commit markers (:mod:`gum_ray.store.manifest`)

Rules that keep concurrent writers safe (zarr-python loses data on partial or concurrent writes
into one shard):

* one task writes one whole cell (= one shard per year) in one call: :meth:`ProductStore.write_cell`;
* metadata changes (:meth:`ProductStore.create`, :meth:`ProductStore.add_year`) are made once by the
  driver **before** workers write; they rewrite the consolidated metadata;
* overview shards cover 2^k x 2^k cells and are built after the cells below them are committed,
  one task per overview shard (:meth:`ProductStore.build_overviews`).

Probabilities below a floor (default 2 %) are stored as 0, which is what makes the product compress;
shards that are all no data are never written.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import logging
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from gum_ray.version import __version__
from gum_ray.errors import GumError, InputError
from gum_ray.grid import (
    AOI,
    DEFAULT_GRID,
    GLOBAL_HEIGHT,
    GLOBAL_WIDTH,
    PIXEL_DEG,
    PRODUCT_CRS,
    Cell,
    ProductGrid,
    aoi_windows,
    cells_for_aoi,
    pixel_area_rows,
    window_transform,
    x_coords,
    y_coords,
)
from gum_ray.imagery import NODATA
from gum_ray.store import fs
from gum_ray.store.quality import QUALITY, and_2x2, encode_quality, quality_attrs

log = logging.getLogger(__name__)

FORMAT_NAME = "gum-ray-product"
FORMAT_VERSION = 1
PROBABILITY = "probability"
URBAN_THRESHOLD = 50  # percent: a pixel is urban when P(urban) >= 50 %
DEFAULT_PROB_FLOOR = 2  # percent: below this a probability is stored as 0
DEFAULT_OVERVIEW_LEVELS = 6  # 2^6 = 64 px = about 600 m at the equator
MAX_OVERVIEW_LEVELS = 7  # 2160000 rows / 2^7 is still a whole number
OVERVIEWS = "overviews"
COORD_CHUNK = 120_000  # coordinate inner chunk (10 degrees at level 0), one shard per array
MIN_DASK_CHUNK_PX = 3000  # open_product: dask chunks of whole shards, at least this many px
DEFAULT_PRODUCT_PATH = "gum-data/product.zarr"

_MULTISCALES_CONVENTION = {
    "uuid": "d35379db-88df-4056-af3a-620245f8e347",
    "name": "multiscales",
    "schema_url": "https://raw.githubusercontent.com/zarr-conventions/multiscales/refs/tags/v0.1/schema.json",
    "spec_url": "https://github.com/zarr-conventions/multiscales/blob/v0.1/README.md",
    "description": "Multiscale layout of zarr datasets",
}


@dataclass(frozen=True)
class ProductSettings:
    """Settings fixed when a product is created (recorded in its ``gum_product`` attribute)."""

    grid: ProductGrid = DEFAULT_GRID
    prob_floor: int = DEFAULT_PROB_FLOOR
    overview_levels: int = DEFAULT_OVERVIEW_LEVELS
    zstd_level: int = 3

    def __post_init__(self) -> None:
        if not 0 <= self.prob_floor <= 100:
            raise InputError(f"probability floor {self.prob_floor} %: must be within 0..100")
        if not 0 <= self.overview_levels <= MAX_OVERVIEW_LEVELS:
            raise InputError(
                f"overview levels {self.overview_levels}: must be within 0..{MAX_OVERVIEW_LEVELS}"
            )

    def to_attrs(self) -> dict[str, Any]:
        return {
            **self.grid.to_attrs(),
            "prob_floor": self.prob_floor,
            "overview_levels": self.overview_levels,
            "zstd_level": self.zstd_level,
        }

    @classmethod
    def from_attrs(cls, a: dict[str, Any]) -> "ProductSettings":
        return cls(
            grid=ProductGrid.from_attrs(a),
            prob_floor=int(a["prob_floor"]),
            overview_levels=int(a["overview_levels"]),
            zstd_level=int(a.get("zstd_level", 3)),
        )


@dataclass(frozen=True)
class CellWriteResult:
    """What :meth:`ProductStore.write_cell` wrote: pixel counts and the shard object's key."""

    year: int
    cell_id: str
    shard_key: str
    valid_px: int
    nodata_px: int
    urban_px: int
    empty: bool  # all no data: nothing stored
    seconds: float = 0.0

    def counts(self) -> dict[str, int]:
        return {"valid_px": self.valid_px, "nodata_px": self.nodata_px, "urban_px": self.urban_px}


# ------------------------------------------------------------------------------------ encoding


def encode_probability(probability: np.ndarray, floor: int = DEFAULT_PROB_FLOOR) -> np.ndarray:
    """P(urban) -> stored uint8: percent 0-100, 255 no data, probabilities below ``floor`` % set to 0.

    Accepts float arrays in [0, 1] with NaN for no data (values within 0.001 outside [0, 1], e.g.
    from bilinear warping, are clipped), or uint8 percent with 255 for no data.
    """
    p = np.asarray(probability)
    if p.dtype == np.uint8:
        bad = (p > 100) & (p != NODATA)
        if bad.any():
            raise InputError(
                f"probability (uint8): values {np.unique(p[bad])[:5].tolist()} are neither 0-100 % nor "
                f"255 (no data)"
            )
        out = p.copy()
    elif np.issubdtype(p.dtype, np.floating):
        x = np.multiply(p, np.float32(100.0), dtype=np.float32)  # percent; NaN stays NaN
        lo, hi = np.fmin.reduce(x, axis=None), np.fmax.reduce(x, axis=None)  # NaN-ignoring
        if not np.isnan(lo) and (lo < -0.1 or hi > 100.1):
            raise InputError(
                f"probability (float): values run {lo / 100:g}..{hi / 100:g}; a float probability must "
                f"lie in [0, 1] (NaN = no data); pass percent as uint8"
            )
        nodata = np.isnan(x)
        x[nodata] = 0.0
        np.clip(x, 0.0, 100.0, out=x)
        if floor > 0:
            x[x < floor] = 0.0  # the floor applies before rounding
        x += 0.5
        out = x.astype(np.uint8)  # truncation of x + 0.5 = rounding half up
        out[nodata] = NODATA
        return out
    else:
        raise InputError(f"probability: dtype {p.dtype} is not float (0-1) or uint8 (percent)")
    if floor > 0:
        out[out < floor] = 0
    return out


def mean_2x2(data: np.ndarray) -> np.ndarray:
    """Halve the last two axes by the mean of valid (non-255) values in each 2x2 block.

    An odd trailing row/column is padded with no data; a block with no valid value is no data.
    Rounded half up to whole percent.
    """
    *lead, h, w = data.shape
    if h % 2 or w % 2:
        pad = [(0, 0)] * len(lead) + [(0, h % 2), (0, w % 2)]
        data = np.pad(data, pad, constant_values=NODATA)
        h, w = data.shape[-2:]
    blk = data.reshape(*lead, h // 2, 2, w // 2, 2)
    valid = blk != NODATA
    s = np.where(valid, blk, 0).astype(np.uint16).sum(axis=(-3, -1))
    n = valid.sum(axis=(-3, -1), dtype=np.uint16)
    out = np.full(s.shape, NODATA, dtype=np.uint8)
    ok = n > 0
    out[ok] = ((2 * s[ok] + n[ok]) // (2 * n[ok])).astype(np.uint8)
    return out


# ------------------------------------------------------------------------------------ store


def _coord_chunk(n: int) -> int:
    """The largest divisor of ``n`` not above :data:`COORD_CHUNK` (inner chunks must tile a shard)."""
    for c in range(min(COORD_CHUNK, n), 0, -1):
        if n % c == 0:
            return c
    return n


def _level_group(level: int) -> str:
    return "" if level == 0 else f"{OVERVIEWS}/{level}"


class _Quiet:
    """Silence zarr's warnings about consolidated metadata and our non-zarr ``_manifest`` folder."""

    def __enter__(self) -> None:
        self._cw = warnings.catch_warnings()
        self._cw.__enter__()
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        warnings.filterwarnings("ignore", message=".*not recognized as a component of a Zarr hierarchy.*")

    def __exit__(self, *exc: object) -> None:
        self._cw.__exit__(*exc)


def _not_a_product(root: str, why: str) -> GumError:
    return InputError(
        f"{root} is not a gum product ({why}). Give the product folder or gs:// path written by "
        f"gum-ray (its zarr.json carries a 'gum_product' attribute), or create one with a run first."
    )


class ProductStore:
    """A gum-ray global product. Use :meth:`create`, :meth:`open` or :meth:`open_or_create`."""

    def __init__(self, root: str, settings: ProductSettings, group: Any, attrs: dict[str, Any]):
        self.root = root
        self.settings = settings
        self._group = group
        self._attrs = attrs
        self._years: list[int] | None = None
        self._arrays: dict[tuple[int, str], Any] = {}
        self._has_quality: bool | None = None

    # ---- construction

    @classmethod
    def create(
        cls,
        root: str,
        *,
        settings: ProductSettings = ProductSettings(),
        years: Iterable[int] = (),
        title: str = "gum-ray urban probability",
    ) -> "ProductStore":
        """Create an empty global product at ``root`` (which must not hold one already).

        Writes the group, all arrays (level 0 and overviews) and their coordinates, then the
        consolidated metadata. Run once, by the driver.
        """
        import zarr
        from zarr.codecs import BloscCodec, ZstdCodec

        root = fs.normalize(root)
        if fs.exists(fs.join(root, "zarr.json")):
            raise InputError(f"{root} already holds a Zarr store; open it instead of creating it again")
        if not fs.is_remote(root) and [n for n in fs.list_names(root) if n != "_manifest"]:  # the lease is there
            raise InputError(f"{root} exists and is not empty; give a new folder for the product")
        grid = settings.grid
        now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        root_attrs = _root_attrs(settings, title, now)
        store = fs.zarr_store(root)
        with _Quiet():
            # not mode "w": that empties the folder, and the run's lease lies in _manifest/
            g = zarr.open_group(store, mode="a", zarr_format=3, attributes=root_attrs)
            for level in range(settings.overview_levels + 1):
                lg = g if level == 0 else g.require_group(_level_group(level))
                step = 2**level
                h, w = GLOBAL_HEIGHT // step, GLOBAL_WIDTH // step
                if level:
                    lg.attrs.update({"gum_overview_level": level, "pixel_deg": PIXEL_DEG * step})
                lg.create_array(
                    PROBABILITY,
                    shape=(0, h, w),
                    shards=(1, grid.cell_px, grid.cell_px),
                    chunks=(1, grid.chunk_px, grid.chunk_px),
                    dtype="uint8",
                    fill_value=NODATA,
                    compressors=[ZstdCodec(level=settings.zstd_level)],
                    dimension_names=["year", "y", "x"],
                    attributes=_probability_attrs(settings, level),
                )
                lg.create_array(
                    QUALITY, shape=(0, h, w), shards=(1, grid.cell_px, grid.cell_px),
                    chunks=(1, grid.chunk_px, grid.chunk_px), dtype="uint8", fill_value=NODATA,
                    compressors=[ZstdCodec(level=settings.zstd_level)], dimension_names=["year", "y", "x"],
                    attributes=quality_attrs(level),
                )
                lg.create_array(
                    "year", shape=(0,), chunks=(1024,), dtype="int32", fill_value=0,
                    dimension_names=["year"],
                    attributes={"long_name": "calendar year of the imagery", "axis": "T"},
                )
                # 1-D variables: one object each (a shard of inner chunks of about 10 degrees);
                # the pixel area is float32 (7 digits; it compresses 17x better than float64)
                for name, n, values, dtype, attrs in (
                    ("y", h, lambda: y_coords(0, h, step), "float64", _Y_ATTRS),
                    ("x", w, lambda: x_coords(0, w, step), "float64", _X_ATTRS),
                    ("pixel_area", h, lambda: pixel_area_rows(0, h, step), "float32", _AREA_ATTRS),
                ):
                    itemsize = np.dtype(dtype).itemsize
                    arr = lg.create_array(
                        name, shape=(n,), shards=(n,), chunks=(_coord_chunk(n),), dtype=dtype,
                        fill_value=np.nan, dimension_names=["x" if name == "x" else "y"],
                        compressors=[BloscCodec(cname="zstd", clevel=5, shuffle="shuffle", typesize=itemsize)],
                        attributes=attrs,
                    )
                    arr[:] = values().astype(dtype)
                sr = lg.create_array(
                    "spatial_ref", shape=(), dtype="int32", fill_value=0, dimension_names=[],
                    attributes=_spatial_ref_attrs(step),
                )
                sr[...] = 0
        product = cls(root, settings, None, root_attrs)
        for y in years:
            product._add_year_no_consolidate(int(y))
        product.consolidate()
        return product

    @classmethod
    def open(cls, root: str, *, writable: bool = False) -> "ProductStore":
        """Open an existing product; :class:`InputError` if ``root`` is not a gum product."""
        import zarr

        root = fs.normalize(root)
        if not fs.exists(fs.join(root, "zarr.json")):
            if not fs.exists(root):
                raise InputError(
                    f"no product at {root}: the path does not exist. Check the path (local folder or "
                    f"gs://bucket/prefix), or run gum-ray first to create the product"
                )
            raise _not_a_product(root, "no zarr.json")
        store = fs.zarr_store(root, read_only=not writable)
        try:
            with _Quiet():
                g = zarr.open_group(store, mode="r+" if writable else "r")
        except Exception as exc:  # noqa: BLE001 - any failure here means "not our product"
            raise _not_a_product(root, f"not a readable Zarr v3 group: {exc}") from None
        attrs = dict(g.attrs)
        meta = attrs.get("gum_product")
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
            raise _not_a_product(root, "its zarr.json has no 'gum_product' attribute")
        if int(meta.get("format_version", 0)) > FORMAT_VERSION:
            raise InputError(
                f"{root}: product format version {meta.get('format_version')} is newer than this "
                f"gum-ray ({__version__}) reads ({FORMAT_VERSION}); upgrade gum-ray"
            )
        return cls(root, ProductSettings.from_attrs(meta), g, attrs)

    @classmethod
    def open_or_create(
        cls, root: str, *, settings: ProductSettings = ProductSettings(), years: Iterable[int] = ()
    ) -> "ProductStore":
        """Open the product at ``root`` (checking its grid matches ``settings``) or create it.

        Years in ``years`` that the product lacks are added (driver only, before workers write).
        """
        root = fs.normalize(root)
        if fs.exists(fs.join(root, "zarr.json")):
            p = cls.open(root, writable=True)
            if p.settings.grid != settings.grid:
                raise InputError(
                    f"{root}: the product was created with {p.settings.grid.cell_deg} degree cells and "
                    f"{p.settings.grid.chunk_px} px chunks, not {settings.grid.cell_deg} / "
                    f"{settings.grid.chunk_px}; use its settings or a new product path"
                )
            for y in years:
                p.add_year(int(y))
            return p
        return cls.create(root, settings=settings, years=years)

    # ---- metadata

    @property
    def grid(self) -> ProductGrid:
        return self.settings.grid

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self._attrs)

    def _open_group(self, writable: bool = True) -> Any:
        import zarr

        store = fs.zarr_store(self.root, read_only=not writable)
        with _Quiet():
            return zarr.open_group(store, mode="r+" if writable else "r")

    def _array(self, level: int, name: str = PROBABILITY, writable: bool = False) -> Any:
        key = (level, name, writable)
        if key not in self._arrays:
            if self._group is None or (writable and self._group.read_only):
                self._group = self._open_group(writable=writable)
            with _Quiet():
                self._arrays[key] = self._group[f"{_level_group(level)}/{name}".lstrip("/")]
        return self._arrays[key]

    @property
    def has_quality(self) -> bool:
        """Whether the product has the ``input_quality`` variable (products before it do not)."""
        if self._has_quality is None:
            try:
                self._array(0, QUALITY)
                self._has_quality = True
            except Exception:  # noqa: BLE001 - zarr raises KeyError / its own NodeNotFound
                self._has_quality = False
        return bool(self._has_quality)

    def refresh(self) -> None:
        """Forget cached metadata (after another process added a year)."""
        self._group = None
        self._arrays.clear()
        self._years = None
        self._has_quality = None

    @property
    def years(self) -> list[int]:
        """Years in the product, in index order (the order they were added)."""
        if self._years is None:
            arr = self._array(0, "year")
            self._years = [int(v) for v in arr[:]] if arr.shape[0] else []
        return list(self._years)

    def year_index(self, year: int) -> int:
        """Index of ``year`` along the year axis; :class:`InputError` listing the years there."""
        year = int(year)
        if year not in self.years:
            self.refresh()
        years = self.years
        if year not in years:
            there = ", ".join(map(str, years)) or "none yet"
            raise InputError(f"year {year} is not in the product {self.root} (years there: {there})")
        return years.index(year)

    def add_year(self, year: int) -> int:
        """Append ``year`` to every level (no-op if present); returns its index.

        Resizes the arrays and rewrites consolidated metadata: do it once, from the driver, before
        workers write that year (concurrent resizes from two processes are not safe).
        """
        idx = self._add_year_no_consolidate(int(year))
        self.consolidate()
        return idx

    def _add_year_no_consolidate(self, year: int) -> int:
        if not 1900 <= year <= 2200:
            raise InputError(f"year {year}: expected a calendar year such as 2020")
        self.refresh()
        years = self.years
        if year in years:
            return years.index(year)
        n = len(years)
        for level in range(self.settings.overview_levels + 1):
            for name in (PROBABILITY, QUALITY) if self.has_quality else (PROBABILITY,):
                arr = self._array(level, name, writable=True)
                arr.resize((n + 1,) + arr.shape[1:])
            ya = self._array(level, "year", writable=True)
            ya.resize((n + 1,))
            ya[n] = year
        self.refresh()
        return n

    def consolidate(self) -> None:
        """Rewrite the consolidated metadata (driver only)."""
        import zarr

        with _Quiet():
            zarr.consolidate_metadata(fs.zarr_store(self.root))
        self.refresh()

    # ---- cells

    def _check_cell(self, cell: Cell) -> None:
        if cell.grid != self.grid:
            raise InputError(
                f"cell {cell.id} is on a {cell.grid.cell_deg} degree grid but the product uses "
                f"{self.grid.cell_deg} degree cells"
            )

    def shard_key(self, year: int, cell: Cell, level: int = 0) -> str:
        """Object key (relative to the root) of the cell's shard for ``year``."""
        self._check_cell(cell)
        prefix = f"{_level_group(level)}/{PROBABILITY}".lstrip("/")
        return f"{prefix}/c/{self.year_index(year)}/{cell.row}/{cell.col}"

    def shard_sha256(self, year: int, cell: Cell) -> str | None:
        """SHA-256 of the stored shard object, None when the cell is empty (no object)."""
        path = fs.join(self.root, *self.shard_key(year, cell).split("/"))
        try:
            return hashlib.sha256(fs.read_bytes(path)).hexdigest()
        except FileNotFoundError:
            return None

    def write_cell(self, year: int, cell: Cell, probability: np.ndarray,
                   quality: np.ndarray | None = None) -> CellWriteResult:
        """Write one whole cell (one shard) for ``year`` in one call; idempotent.

        ``probability`` is on the cell's product GeoBox (``cell.shape``): float 0-1 with NaN for no
        data, or uint8 percent with 255. The same input always gives the same stored bytes; a cell
        with no valid pixel stores nothing (and removes a shard written before). ``quality``, the
        input-quality codes on the same grid (uint8, 255 = not mapped), goes into its own shard of
        ``input_quality`` when given and the product has that variable (an older product does not:
        it is skipped there).
        """
        import time

        t0 = time.perf_counter()
        self._check_cell(cell)
        data = encode_probability(probability, self.settings.prob_floor)
        if data.shape != cell.shape:
            raise InputError(
                f"probability for cell {cell.id} has shape {data.shape}; the cell is {cell.shape} "
                f"(its product GeoBox)"
            )
        yi = self.year_index(year)
        arr = self._array(0, PROBABILITY, writable=True)
        if arr.shape[0] <= yi:  # metadata cached before the driver added the year
            self.refresh()
            arr = self._array(0, PROBABILITY, writable=True)
        arr[yi : yi + 1, cell.y_slice, cell.x_slice] = data[None]
        if quality is not None and self.has_quality:
            q = encode_quality(quality)
            if q.shape != cell.shape:
                raise InputError(f"input quality for cell {cell.id} has shape {q.shape}; the cell is {cell.shape}")
            self._array(0, QUALITY, writable=True)[yi : yi + 1, cell.y_slice, cell.x_slice] = q[None]
        valid = data != NODATA
        nvalid = int(valid.sum())
        return CellWriteResult(
            year=int(year),
            cell_id=cell.id,
            shard_key=f"{PROBABILITY}/c/{yi}/{cell.row}/{cell.col}",
            valid_px=nvalid,
            nodata_px=int(data.size - nvalid),
            urban_px=int(((data >= URBAN_THRESHOLD) & valid).sum()),
            empty=nvalid == 0,
            seconds=time.perf_counter() - t0,
        )

    def read_cell(self, year: int, cell: Cell) -> np.ndarray:
        """The stored uint8 cell (255 where no data)."""
        self._check_cell(cell)
        yi = self.year_index(year)
        return np.asarray(self._array(0)[yi, cell.y_slice, cell.x_slice])

    def read_window(
        self, year: int | Sequence[int] | None, rows: slice, cols: slice, level: int = 0,
        variable: str = PROBABILITY,
    ) -> np.ndarray:
        """Stored uint8 values of ``variable`` in a global pixel window at ``level``.

        ``year`` one year -> (h, w); a list or None (all years) -> (n_years, h, w).
        """
        self._check_level(level)
        arr = self._array(level, variable)
        if year is None or not isinstance(year, (int, np.integer)):
            idx = [self.year_index(y) for y in (self.years if year is None else year)]
            if not idx:
                return np.full((0, rows.stop - rows.start, cols.stop - cols.start), NODATA, np.uint8)
            if idx == list(range(idx[0], idx[-1] + 1)):
                return np.asarray(arr[idx[0] : idx[-1] + 1, rows, cols])
            return np.stack([np.asarray(arr[i, rows, cols]) for i in idx])
        return np.asarray(arr[self.year_index(int(year)), rows, cols])

    def pixel_area(self, rows: slice, level: int = 0) -> np.ndarray:
        """Pixel area (m^2) for global rows at ``level`` (computed; equal to the stored variable)."""
        return pixel_area_rows(rows.start, rows.stop, 2**level)

    def _check_level(self, level: int) -> None:
        if not 0 <= level <= self.settings.overview_levels:
            raise InputError(
                f"overview level {level}: this product has levels 0..{self.settings.overview_levels}"
            )

    def read_aoi(self, year: int, aoi: AOI, level: int = 0) -> tuple[np.ndarray, Any]:
        """Stored uint8 values over an AOI's bounds at ``level`` and the Affine of the result.

        A window that crosses the antimeridian is returned as one raster running east across 180
        (longitudes beyond 180 in the transform).
        """
        self._check_level(level)
        step = 2**level
        windows = aoi_windows(aoi, step)
        parts = [self.read_window(year, r, c, level) for r, c in windows]
        data = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
        return data, window_transform(*windows[0], step)

    # ---- overviews

    def overview_shards(self, cells: Iterable[Cell], level: int) -> list[tuple[int, int]]:
        """The (row, col) shards at overview ``level`` that hold any of ``cells``."""
        self._check_level(level)
        return sorted({(c.row >> level, c.col >> level) for c in cells})

    def build_overview_shard(self, level: int, row: int, col: int, years: Sequence[int] | None = None) -> bool:
        """Rebuild one overview shard (all years, or ``years``) from the level below; True if any data.

        A shard at level k covers 2^k x 2^k cells: build level k - 1 first for all of them.
        """
        if level < 1:
            raise InputError("overview levels start at 1 (level 0 is the product itself)")
        self._check_level(level)
        n = self.grid.cell_px
        names = (PROBABILITY, QUALITY) if self.has_quality else (PROBABILITY,)
        src, dst = self._array(level - 1), self._array(level, writable=True)
        year_idx = [self.year_index(y) for y in (self.years if years is None else years)]
        if not year_idx:
            return False
        r0, c0 = row * n, col * n
        r1, c1 = min(r0 + n, dst.shape[1]), min(c0 + n, dst.shape[2])
        rows = slice(2 * r0, min(2 * r1, src.shape[1]))
        cols = slice(2 * c0, min(2 * c1, src.shape[2]))
        any_data = False
        for name in names:
            src, dst = self._array(level - 1, name), self._array(level, name, writable=True)
            reduce = mean_2x2 if name == PROBABILITY else and_2x2
            for yi in year_idx:
                out = reduce(np.asarray(src[yi, rows, cols]))[: r1 - r0, : c1 - c0]
                dst[yi : yi + 1, r0:r1, c0:c1] = out[None]
                any_data |= name == PROBABILITY and bool((out != NODATA).any())
        return any_data

    def build_overviews(
        self,
        region: AOI | Iterable[Cell],
        *,
        years: Sequence[int] | None = None,
        levels: int | None = None,
        max_workers: int = 2,
        check: Callable[[], None] | None = None,
    ) -> int:
        """Build the pyramid (2x2 means, level by level) over the cells of ``region``.

        Run after the region's cells are written; returns the number of overview shards built.
        Each overview shard is written whole by one thread, so it is safe to run beside workers
        that write other cells, but not beside another overview build of the same region.
        ``check`` is called before each shard is built (the run's lease: it raises to stop).
        """
        cells = cells_for_aoi(region, self.grid) if isinstance(region, AOI) else list(region)
        for c in cells:
            self._check_cell(c)
        top = self.settings.overview_levels if levels is None else min(levels, self.settings.overview_levels)
        total = 0
        for level in range(1, top + 1):
            shards = self.overview_shards(cells, level)
            with ThreadPoolExecutor(max_workers=max(1, max_workers)) as pool:
                list(pool.map(lambda rc: self._checked_overview_shard(check, level, rc, years), shards))
            total += len(shards)
        return total

    def _checked_overview_shard(self, check, level, rc, years) -> bool:
        if check is not None:
            check()
        return self.build_overview_shard(level, rc[0], rc[1], years)


# ------------------------------------------------------------------------------------ attrs

_Y_ATTRS = {
    "standard_name": "latitude", "long_name": "latitude of pixel centre", "units": "degrees_north",
    "axis": "Y",
}
_X_ATTRS = {
    "standard_name": "longitude", "long_name": "longitude of pixel centre", "units": "degrees_east",
    "axis": "X",
}
_AREA_ATTRS = {
    "long_name": "area of one pixel in this row (geodesic, WGS84 ellipsoid)",
    "units": "m2",
    "standard_name": "cell_area",
}


def _geotransform(step: int) -> list[float]:
    res = PIXEL_DEG * step
    return [-180.0, res, 0.0, 90.0, 0.0, -res]


def _spatial_ref_attrs(step: int) -> dict[str, Any]:
    cf = PRODUCT_CRS.to_cf()
    cf["spatial_ref"] = cf["crs_wkt"]
    cf["GeoTransform"] = " ".join(repr(v) for v in _geotransform(step))
    return cf


def _probability_attrs(settings: ProductSettings, level: int) -> dict[str, Any]:
    return {
        "long_name": "probability of urban land cover (GlobalUrbanMapper)",
        "units": "percent",
        "valid_range": [0, 100],
        "_FillValue": NODATA,
        "grid_mapping": "spatial_ref",
        "coordinates": "spatial_ref pixel_area",
        "gum_prob_floor_percent": settings.prob_floor,
        "gum_urban_threshold_percent": URBAN_THRESHOLD,
        "comment": (
            f"uint8 percent; {NODATA} = no data; values below {settings.prob_floor} % stored as 0"
            + ("" if level == 0 else f"; overview level {level}: mean of 2x2 valid pixels of level {level - 1}")
        ),
    }


def _root_attrs(settings: ProductSettings, title: str, now: str) -> dict[str, Any]:
    layout: list[dict[str, Any]] = [{"asset": ".", "transform": {"scale": [1.0, 1.0], "translation": [0.0, 0.0]}}]
    for level in range(1, settings.overview_levels + 1):
        layout.append(
            {
                "asset": _level_group(level),
                "derived_from": _level_group(level - 1) or ".",
                "transform": {"scale": [2.0**level, 2.0**level], "translation": [0.0, 0.0]},
                "resampling_method": "average",
            }
        )
    return {
        "Conventions": "CF-1.10",
        "title": title,
        "institution": "produced with gum-ray",
        "source": "GlobalUrbanMapper (GUM) network, Sentinel-2 + Sentinel-1 + terrain at 10 m, gum-ray",
        "references": "Zhou & Weng, Building up a data engine for global urban mapping, RSE 311 (2024) 114242",
        "history": f"{now} created by gum-ray {__version__}",
        "gum_product": {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "software_version": __version__,
            "created": now,
            "urban_threshold_percent": URBAN_THRESHOLD,
            "nodata": NODATA,
            **settings.to_attrs(),
        },
        "proj:code": "EPSG:4326",
        "spatial:dimensions": ["y", "x"],
        "spatial:transform": [PIXEL_DEG, 0.0, -180.0, 0.0, -PIXEL_DEG, 90.0],
        "spatial:shape": [GLOBAL_HEIGHT, GLOBAL_WIDTH],
        "spatial:registration": "pixel",
        "zarr_conventions": [_MULTISCALES_CONVENTION],
        "multiscales": {"layout": layout, "resampling_method": "average"},
    }


# ------------------------------------------------------------------------------------ xarray


def open_product(
    path: str,
    *,
    level: int = 0,
    chunks: dict[str, int] | str | None = "shard",
    mask_and_scale: bool = True,
) -> Any:
    """Open a gum-ray product as a lazily loaded (dask) xarray Dataset.

    ``level`` 0 is full resolution, 1.. the overviews. Coordinates ``x`` (longitude) and ``y``
    (latitude, descending) are pixel centres; ``spatial_ref`` carries the CRS, so ``ds.rio.crs`` is
    EPSG:4326. With ``mask_and_scale`` (the default) ``probability`` is float with NaN for no data;
    pass False to keep the stored uint8 (255 = no data). ``chunks="shard"`` makes one dask chunk
    per stored shard (or per block of shards at least :data:`MIN_DASK_CHUNK_PX` on a side, so a
    product with tiny test cells does not make a billion-chunk graph). Raises :class:`GumError` if ``path`` is not a gum product.
    """
    import xarray as xr

    product = ProductStore.open(path)
    product._check_level(level)
    n = product.grid.cell_px * max(1, -(-MIN_DASK_CHUNK_PX // product.grid.cell_px))
    if chunks == "shard":
        chunks = {"year": 1, "y": n, "x": n}
    import rioxarray  # noqa: F401 - registers the .rio accessor

    store = fs.zarr_store(product.root, read_only=True)
    with _Quiet():
        warnings.filterwarnings("ignore", message=".*specified chunks separate the stored chunks.*")
        ds = xr.open_zarr(
            store,
            group=_level_group(level) or None,
            chunks=chunks,
            consolidated=True,
            mask_and_scale=mask_and_scale,
            decode_coords="all",
        )
    # the per-row pixel area is small (4 bytes a row): hold it in memory, one read
    area = ds["pixel_area"]
    values = np.asarray(product._array(level, "pixel_area")[:])
    ds = ds.assign_coords(pixel_area=(area.dims, values, area.attrs))
    ds.attrs.update({k: v for k, v in product.attrs.items() if k not in ds.attrs})
    return ds
