"""The GeoTIFF source: GUM exports that a user already has, read onto any grid.

A folder (or one file) of GeoTIFFs in the GUM export layout: 11 bands (B4 B3 B2 B8, S1 VV/VH
ascending and descending in dB, elevation slope aspect) or 14 (plus the three built-up products),
as the authors' Earth Engine scripts export them. For a requested grid and year, the files of that
year that overlap the grid are read and, where their grid differs, reprojected with rasterio/GDAL:
bilinear for the continuous bands, nearest for the 0/1 product bands. Pixels no file covers are NaN.

Years come from the file's tags (``year``, ``date``, ...) or its name (``..._2021-05-27_...``,
``..._20170613T...``); files without a detectable year serve any year.
"""

from __future__ import annotations

import glob
import logging
import math
import os
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import rasterio
import rasterio.warp
import rasterio.windows
from odc.geo.geobox import GeoBox
from rasterio.crs import CRS as RioCRS
from rasterio.enums import Resampling

from gum_ray.bands import EXPORT_BANDS, EXPORT_BANDS_WITH_PRODUCTS, with_products_for_band_count
from gum_ray.errors import InputError, NotFoundError
from gum_ray.imagery import Imagery, masks_from_export
from gum_ray.tiling import CROP
from gum_ray.input_checks import UnitsCheck
from gum_ray.sources.base import ImagerySource, SourceOptions

log = logging.getLogger(__name__)

MAX_READ_RATIO = 16  # a read may hold at most 16x the pixels of the grid it fills (2.5 m pixels)
_UNITS: dict[str, UnitsCheck] = {}  # one plausibility check (and warning) per file and process

_YEAR_RX = re.compile(r"(?<!\d)(20\d{2})(?:[-_]?(?:0[1-9]|1[0-2])(?:[-_]?(?:0[1-9]|[12]\d|3[01]))?)?(?!\d)")
_YEAR_TAGS = ("year", "date", "start_date", "acquisition_date", "system:time_start", "tifftag_datetime", "time")


@dataclass(frozen=True)
class IndexedExport:
    """One GUM export GeoTIFF as the source's index knows it (its pixels are read on demand)."""

    path: str
    bands: int
    crs: str
    bounds: tuple[float, float, float, float]
    year: int | None

    @property
    def with_products(self) -> bool:
        return self.bands == len(EXPORT_BANDS_WITH_PRODUCTS)


def year_of(path: str, tags: dict[str, str]) -> int | None:
    """The year a GUM export is for: from a year/date tag, else from the file name; None if neither."""
    lowered = {k.lower(): v for k, v in tags.items()}
    for key in _YEAR_TAGS:
        v = lowered.get(key)
        if v:
            m = _YEAR_RX.search(str(v))
            if m:
                return int(m.group(1))
    m = _YEAR_RX.search(os.path.basename(path))
    return int(m.group(1)) if m else None


def _index_file(path: str) -> IndexedExport:
    try:
        with rasterio.open(path) as ds:
            with_products_for_band_count(ds.count, source=path)  # 11 or 14 bands, else InputError
            if ds.crs is None:
                raise InputError(f"{path}: has no CRS; a GUM export is georeferenced (re-export it)")
            return IndexedExport(path, ds.count, ds.crs.to_wkt(), tuple(ds.bounds), year_of(path, ds.tags()))
    except rasterio.errors.RasterioIOError as exc:
        raise InputError(f"{path}: cannot be read as a GeoTIFF ({exc}); check the file") from None


@dataclass(frozen=True)
class GeoTiffOptions(SourceOptions):
    """The GeoTIFF source's options (see :class:`GeoTiffSource`)."""

    path: str = ""
    year_policy: str = "match"
    zero_is_nodata: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", os.fspath(self.path))
        if not self.path:
            raise InputError("GeoTIFF source: give path, a folder of GUM exports or one export file", param="path")
        if self.year_policy not in ("match", "any"):
            raise InputError(f"year_policy must be 'match' or 'any', got {self.year_policy!r}", param="year_policy")


class GeoTiffSource(ImagerySource):
    """Imagery from a folder of existing GUM exports (or one export file).

    Options (:class:`GeoTiffOptions`):
        path: a folder of GeoTIFFs (``*.tif``/``*.tiff``, searched recursively) or one GeoTIFF.
        with_products: return the 14-band layout; files with 11 bands give NaN product bands.
        year_policy: ``match`` (files whose year is the one asked, plus files without a year) or
            ``any`` (every file, whatever its year).
        zero_is_nodata: treat pixels whose bands are all exactly 0 as missing (the black borders
            Earth Engine exports come back with).
    """

    name = "geotiff"
    Options = GeoTiffOptions

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if args and not isinstance(args[0], GeoTiffOptions):  # GeoTiffSource("exports/", ...)
            kwargs["path"], args = args[0], args[1:]
        super().__init__(*args, **kwargs)
        self.path = self.options.path
        self.year_policy = self.options.year_policy
        self.zero_is_nodata = self.options.zero_is_nodata
        if not os.path.exists(self.path):
            raise NotFoundError(
                f"GeoTIFF source: {self.path!r} does not exist; give a folder of GUM exports or one export file"
            )
        self._index: list[IndexedExport] | None = None

    def cache_identity(self) -> dict[str, Any]:
        return {"path": self.path, "year_policy": self.year_policy}

    def describe(self) -> dict[str, Any]:
        return {"source": self.name, "path": self.path, "with_products": self.with_products,
                "year_policy": self.year_policy}

    # -- index ------------------------------------------------------------------------------------
    @property
    def files(self) -> list[IndexedExport]:
        """The GUM exports found (11/14-band GeoTIFFs); other rasters in a folder are skipped."""
        if self._index is None:
            self._index = self._scan()
        return self._index

    def _scan(self) -> list[IndexedExport]:
        if os.path.isfile(self.path):
            return [_index_file(self.path)]
        paths = sorted(
            p for ext in ("tif", "tiff", "TIF", "TIFF")
            for p in glob.glob(os.path.join(self.path, "**", f"*.{ext}"), recursive=True)
        )
        found, skipped = [], []
        for p in dict.fromkeys(paths):
            try:
                found.append(_index_file(p))
            except InputError as exc:
                skipped.append(str(exc))
        for s in skipped:
            log.info("GeoTIFF source: skipping %s", s)
        if not found:
            why = f" ({len(skipped)} other rasters skipped: {skipped[0]})" if skipped else ""
            raise InputError(
                f"GeoTIFF source: no GUM export (11- or 14-band GeoTIFF) in {self.path!r}{why}; "
                "export with the GUM recipe or point to the folder holding the exports"
            )
        return found

    def years(self) -> list[int]:
        return sorted({f.year for f in self.files if f.year is not None})

    def _files_for_year(self, year: int) -> list[IndexedExport]:
        if self.year_policy == "any":
            return list(self.files)
        chosen = [f for f in self.files if f.year == year] + [f for f in self.files if f.year is None]
        if not chosen:
            raise InputError(
                f"GeoTIFF source: no export for {year} in {self.path!r} (exports found for "
                f"{', '.join(map(str, self.years()))}); ask for one of those years, or use year_policy='any'"
            )
        return chosen

    # -- reading ----------------------------------------------------------------------------------
    def _fetch(self, geobox: GeoBox, year: int) -> Imagery:
        names = EXPORT_BANDS_WITH_PRODUCTS if self.with_products else EXPORT_BANDS
        h, w = (int(v) for v in geobox.shape)
        export = np.full((len(names), h, w), np.nan, np.float32)
        dst_crs = RioCRS.from_wkt(geobox.crs.to_wkt())
        used = []
        for f in self._files_for_year(year):
            n = min(len(names), f.bands)
            if self._read_into(f, geobox, dst_crs, export[:n]):
                used.append({"file": os.path.basename(f.path), "year": f.year, "bands": f.bands})
        provenance = {
            "source": self.name,
            "path": self.path,
            "year": year,
            "files": used,
            "resampling": {"continuous": "bilinear", "products": "nearest"},
        }
        masks = masks_from_export(export, self.with_products)
        return Imagery(export, masks, provenance, geobox, self.with_products)

    def _read_into(self, f: IndexedExport, geobox: GeoBox, dst_crs: RioCRS, out: np.ndarray) -> bool:
        """Fill the NaN pixels of ``out`` (n, H, W) from file ``f``; True if it overlapped."""
        n = out.shape[0]
        with rasterio.open(f.path) as ds:
            left, bottom, right, top = geobox.boundingbox
            try:
                bounds = rasterio.warp.transform_bounds(dst_crs, ds.crs, left, bottom, right, top, densify_pts=21)
            except Exception:  # noqa: BLE001 - grids outside the file CRS's domain do not overlap
                return False
            win = rasterio.windows.from_bounds(*bounds, transform=ds.transform)
            pad = 2
            c0, r0 = math.floor(win.col_off) - pad, math.floor(win.row_off) - pad
            c1 = math.ceil(win.col_off + win.width) + pad
            r1 = math.ceil(win.row_off + win.height) + pad
            win = rasterio.windows.Window(c0, r0, c1 - c0, r1 - r0)
            full = rasterio.windows.Window(0, 0, ds.width, ds.height)
            try:
                win = win.intersection(full)
            except rasterio.errors.WindowError:
                return False
            if win.width <= 0 or win.height <= 0:
                return False
            h, w = (int(v) for v in geobox.shape)
            if win.width * win.height > MAX_READ_RATIO * max(h * w, CROP * CROP):
                # a header whose pixels are far finer than the grid would make this read unbounded
                raise InputError(
                    f"{f.path}: covering this {w} x {h} px cell would read {int(win.width)} x "
                    f"{int(win.height)} px of the file (its pixels are much finer than the 10 m grid); "
                    "GUM exports are 10 m: re-export at 10 m scale"
                )
            src = ds.read(list(range(1, n + 1)), window=win, out_dtype=np.float32)
            if ds.nodata is not None and not np.isnan(ds.nodata):
                src[src == np.float32(ds.nodata)] = np.nan
            if self.zero_is_nodata:
                src[:, (src == 0).all(axis=0)] = np.nan
            _UNITS.setdefault(f.path, UnitsCheck(f.path)).observe(src)
            src_transform = ds.window_transform(win)
            src_crs = ds.crs
        tmp = np.full(out.shape, np.nan, np.float32)
        if _aligned(src_crs, src_transform, dst_crs, geobox):
            _copy_aligned(src, src_transform, geobox, tmp)
        else:
            groups = [(slice(0, min(n, 11)), Resampling.bilinear)]
            if n > 11:
                groups.append((slice(11, n), Resampling.nearest))
            for sl, resampling in groups:
                rasterio.warp.reproject(
                    source=src[sl], destination=tmp[sl],
                    src_transform=src_transform, src_crs=src_crs, src_nodata=np.nan,
                    dst_transform=geobox.affine, dst_crs=dst_crs, dst_nodata=np.nan,
                    resampling=resampling, init_dest_nodata=True, num_threads=1,
                )
        hole = np.isnan(out)
        out[hole] = tmp[hole]
        return bool(np.isfinite(tmp).any())


def _aligned(src_crs: RioCRS, src_transform: Any, dst_crs: RioCRS, geobox: GeoBox) -> bool:
    """Same CRS, same pixel size, whole-pixel offset: a plain copy, no resampling."""
    a, b = src_transform, geobox.affine
    if a.b != 0 or a.d != 0 or b.b != 0 or b.d != 0 or a.a != b.a or a.e != b.e:
        return False
    if src_crs != dst_crs:
        return False
    dx, dy = (b.c - a.c) / a.a, (b.f - a.f) / a.e
    return abs(dx - round(dx)) < 1e-6 and abs(dy - round(dy)) < 1e-6


def _copy_aligned(src: np.ndarray, src_transform: Any, geobox: GeoBox, out: np.ndarray) -> None:
    a, b = src_transform, geobox.affine
    c0, r0 = round((b.c - a.c) / a.a), round((b.f - a.f) / a.e)  # dst origin in src pixels
    h, w = out.shape[1:]
    sr0, sc0 = max(r0, 0), max(c0, 0)
    sr1, sc1 = min(r0 + h, src.shape[1]), min(c0 + w, src.shape[2])
    if sr1 <= sr0 or sc1 <= sc0:
        return
    out[:, sr0 - r0 : sr1 - r0, sc0 - c0 : sc1 - c0] = src[:, sr0:sr1, sc0:sc1]
