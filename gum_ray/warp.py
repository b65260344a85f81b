"""Warping P(urban) from the UTM grid it was predicted on to the product grid (DESIGN decision 2).

Bilinear on probabilities (never on classes); pixels with no data (NaN) are left out of the
interpolation, and a product pixel whose neighbours are all no data stays no data. Codes (the input
quality's bit flags) are warped by nearest neighbour, 255 = no data.
"""

from __future__ import annotations

import numpy as np
from odc.geo.geobox import GeoBox
from rasterio.warp import Resampling, reproject


def warp_probability(prob: np.ndarray, src: GeoBox, dst: GeoBox) -> np.ndarray:
    """Float P(urban) on ``src`` (NaN = no data) -> float32 on ``dst`` (NaN = no data)."""
    return _reproject(prob, src, dst, np.float32, np.nan, Resampling.bilinear, "probability")


def warp_codes(codes: np.ndarray, src: GeoBox, dst: GeoBox, nodata: int = 255) -> np.ndarray:
    """uint8 codes on ``src`` (``nodata`` = none) -> uint8 on ``dst`` by nearest neighbour."""
    return _reproject(codes, src, dst, np.uint8, nodata, Resampling.nearest, "codes")


def _reproject(data: np.ndarray, src: GeoBox, dst: GeoBox, dtype, nodata, resampling, what: str) -> np.ndarray:
    """``data`` on ``src`` -> ``dtype`` on ``dst`` (``nodata`` where nothing lands), one thread."""
    data = np.ascontiguousarray(data, dtype=dtype)
    if data.shape != tuple(src.shape):
        raise ValueError(f"{what} shape {data.shape} does not match its grid {tuple(src.shape)}")
    out = np.full(tuple(dst.shape), nodata, dtype)
    reproject(
        source=data,
        destination=out,
        src_transform=src.affine,
        src_crs=src.crs.to_wkt(),
        dst_transform=dst.affine,
        dst_crs=dst.crs.to_wkt(),
        src_nodata=nodata,
        dst_nodata=nodata,
        resampling=resampling,
        num_threads=1,
    )
    return out
