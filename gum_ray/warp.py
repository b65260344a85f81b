"""Warping P(urban) from the UTM grid it was predicted on to the product grid (DESIGN decision 2).

Bilinear on probabilities (never on classes); pixels with no data (NaN) are left out of the
interpolation, and a product pixel whose neighbours are all no data stays no data.
"""

from __future__ import annotations

import numpy as np
from odc.geo.geobox import GeoBox
from rasterio.warp import Resampling, reproject


def warp_probability(prob: np.ndarray, src: GeoBox, dst: GeoBox) -> np.ndarray:
    """Float P(urban) on ``src`` (NaN = no data) -> float32 on ``dst`` (NaN = no data)."""
    prob = np.ascontiguousarray(prob, dtype=np.float32)
    if prob.shape != tuple(src.shape):
        raise ValueError(f"probability shape {prob.shape} does not match its grid {tuple(src.shape)}")
    out = np.full(tuple(dst.shape), np.nan, np.float32)
    reproject(
        source=prob,
        destination=out,
        src_transform=src.affine,
        src_crs=src.crs.to_wkt(),
        dst_transform=dst.affine,
        dst_crs=dst.crs.to_wkt(),
        src_nodata=np.nan,
        dst_nodata=np.nan,
        resampling=Resampling.bilinear,
        num_threads=1,
    )
    return out
