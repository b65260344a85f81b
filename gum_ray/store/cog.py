"""COG export of any AOI of the product (DESIGN.md decision 11).

GDAL before 3.13 cannot read sharded Zarr v3, so GIS users get Cloud Optimized GeoTIFFs: uint8
P(urban) percent, 512 x 512 blocks, ZSTD, nodata 255, internal overviews (average), EPSG:4326 on
the product's own pixel grid (no resampling). The raster is assembled block by block into a
temporary tiled GeoTIFF (bounded memory), turned into a COG by rio-cogeo, and moved into place
under its final name only when complete. A product with the ``input_quality`` variable also gets
a sibling COG of it (``name_quality.tif``, :func:`quality_path`): a separate file, so that each has
the overview resampling its values need (average for P(urban), nearest for bit flags) and tools
that read band 1 of the P(urban) COG keep working. An AOI across the antimeridian gives one raster that runs
east across 180 (longitudes beyond 180 in its transform). With a GeoJSON AOI, pixels whose centre
is outside the polygon are no data.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gum_ray.version import __version__
from gum_ray.errors import InputError
from gum_ray.grid import AOI, PRODUCT_CRS, aoi_windows, window_transform
from gum_ray.store import fs
from gum_ray.store.cog_file import BLOCK, write_cog
from gum_ray.store.product import NODATA, PROBABILITY, ProductStore

log = logging.getLogger(__name__)

STRIP_ROWS = 4096  # rows read from the product at a time while assembling


@dataclass(frozen=True)
class CogResult:
    path: str
    width: int
    height: int
    transform: tuple[float, ...]
    level: int
    valid_px: int
    quality_path: str | None = None  # the input-quality COG, where the product has that variable


def _aoi_is_box(aoi: AOI) -> bool:
    return all(p.equals(p.envelope) for p in aoi.parts)


def _shifted_geometry(aoi: AOI) -> list[Any]:
    """AOI parts in the output raster's longitudes (west-of-180 parts moved east by 360)."""
    import shapely.affinity

    if not aoi.crosses_antimeridian:
        return list(aoi.parts)
    w = aoi.bounds[0]
    return [shapely.affinity.translate(p, xoff=360.0) if p.bounds[2] < w else p for p in aoi.parts]


def quality_path(out: str) -> str:
    """The input-quality COG beside a P(urban) COG: ``name.tif`` -> ``name_quality.tif``."""
    stem, dot, ext = out.rpartition(".")
    return f"{stem}_quality.{ext}"


def export_cog(
    product: str | ProductStore,
    out: str | os.PathLike[str],
    *,
    year: int,
    aoi: AOI,
    level: int = 0,
    overwrite: bool = True,
    quality: bool = True,
    quality_out: str | None = None,
) -> CogResult:
    """Write the product's ``year`` over ``aoi`` at pyramid ``level`` as a COG at ``out``.

    When the product has the ``input_quality`` variable (and ``quality`` is True), its values over
    the same window go into a sibling COG at ``quality_out`` (default :func:`quality_path`,
    ``name_quality.tif``: uint8 bit flags 1 = Sentinel-2, 2 = Sentinel-1, 4 = terrain, 255 = not
    mapped, nearest overviews), written before the P(urban) COG.
    ``out`` may be a local path or gs:// URL. Raises :class:`InputError` for a year not in the
    product, a path that is not a product, or an existing ``out`` without ``overwrite``.
    """
    from gum_ray.store.quality import QUALITY

    p = product if isinstance(product, ProductStore) else ProductStore.open(product)
    p._check_level(level)
    p.year_index(year)  # a clear error before any work
    out = str(out)
    if not out.lower().endswith((".tif", ".tiff")):
        raise InputError(f"output {out}: a COG export is a GeoTIFF; name it .tif")
    if not overwrite and fs.exists(out):
        raise InputError(f"output {out} exists; remove it or allow overwriting")
    step = 2**level
    windows = aoi_windows(aoi, step)
    height = windows[0][0].stop - windows[0][0].start
    width = sum(c.stop - c.start for _, c in windows)
    transform = window_transform(*windows[0], step)
    if height * width > 2**34:
        raise InputError(
            f"export of {width} x {height} px is too large for one GeoTIFF; use a smaller area or "
            f"a coarser overview (level)", param="level"
        )
    mask_geoms = None if _aoi_is_box(aoi) else _shifted_geometry(aoi)
    meta = {"gum_product": p.root, "gum_year": str(year), "gum_level": str(level),
            "software": f"gum-ray {__version__}"}
    q_out = (quality_out or quality_path(out)) if quality and p.has_quality else None
    if q_out is not None:
        _write_variable(p, QUALITY, q_out, year, level, windows, transform, mask_geoms,
                        {**meta, "gum_variable": QUALITY})
    valid_px = _write_variable(p, PROBABILITY, out, year, level, windows, transform, mask_geoms, meta)
    return CogResult(
        path=out, width=width, height=height, transform=tuple(transform)[:6], level=level, valid_px=valid_px,
        quality_path=q_out,
    )


def _write_variable(p: ProductStore, variable: str, out: str, year: int, level: int, windows: Any,
                    transform: Any, mask_geoms: Any, metadata: dict[str, str]) -> int:
    """Assemble one product variable over ``windows`` into a COG at ``out``; returns pixels with data."""
    import rasterio
    from affine import Affine
    from rasterio.features import geometry_mask
    from rasterio.windows import Window

    height = windows[0][0].stop - windows[0][0].start
    width = sum(c.stop - c.start for _, c in windows)
    local_out = Path(out) if not fs.is_remote(out) else None
    workdir = local_out.parent if local_out is not None else Path(tempfile.gettempdir())
    workdir.mkdir(parents=True, exist_ok=True)
    tmp_src = tempfile.NamedTemporaryFile(prefix=".gum-export-", suffix=".src.tif", dir=workdir, delete=False)
    tmp_dst = tempfile.NamedTemporaryFile(prefix=".gum-export-", suffix=".cog.tif", dir=workdir, delete=False)
    tmp_src.close()
    tmp_dst.close()
    valid_px = 0
    try:
        src_profile = {
            "driver": "GTiff", "width": width, "height": height, "count": 1, "dtype": "uint8",
            "crs": PRODUCT_CRS.to_wkt(), "transform": transform, "nodata": NODATA, "tiled": True,
            "blockxsize": BLOCK, "blockysize": BLOCK, "compress": "ZSTD", "BIGTIFF": "IF_SAFER",
        }
        with rasterio.open(tmp_src.name, "w", **src_profile) as dst:
            for r in range(0, height, STRIP_ROWS):
                nrows = min(STRIP_ROWS, height - r)
                x_off = 0
                for rows, cols in windows:
                    sub = slice(rows.start + r, rows.start + r + nrows)
                    block = p.read_window(year, sub, cols, level, variable)
                    if mask_geoms is not None:
                        bt = transform @ Affine.translation(x_off, r)
                        outside = geometry_mask(mask_geoms, block.shape, bt, all_touched=False)
                        block = np.where(outside, NODATA, block).astype(np.uint8)
                    valid_px += int((block != NODATA).sum())
                    dst.write(block, 1, window=Window(x_off, r, block.shape[1], nrows))
                    x_off += cols.stop - cols.start
            if variable == PROBABILITY:
                dst.set_band_description(1, f"P(urban) percent, {year}")
                dst.update_tags(1, units="percent", year=str(year), nodata_meaning="no data")
            else:
                dst.set_band_description(1, f"input quality, {year}")
                dst.update_tags(1, year=str(year), nodata_meaning="not mapped",
                                flag_masks="1 2 4", flag_meanings="sentinel_2 sentinel_1 terrain")
        # bit flags cannot be averaged: the quality COG's overviews take the nearest pixel
        write_cog(tmp_src.name, tmp_dst.name, metadata=metadata,
                  overview_resampling="average" if variable == PROBABILITY else "nearest")
        if local_out is not None:
            # NamedTemporaryFile makes 0600 files; an export is for others to read (umask applies)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp_dst.name, 0o666 & ~umask)
            os.replace(tmp_dst.name, local_out)
        else:
            fs.put_file(tmp_dst.name, out)
    finally:
        for name in (tmp_src.name, tmp_dst.name):
            if os.path.exists(name):
                os.unlink(name)
    return valid_px
