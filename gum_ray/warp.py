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


def warp_codes(codes: np.ndarray, src: GeoBox, dst: GeoBox, nodata: int = 255) -> np.ndarray:
    """uint8 codes on ``src`` (``nodata`` = none) -> uint8 on ``dst`` by nearest neighbour."""
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    if codes.shape != tuple(src.shape):
        raise ValueError(f"codes shape {codes.shape} does not match its grid {tuple(src.shape)}")
    out = np.full(tuple(dst.shape), nodata, np.uint8)
    reproject(
        source=codes,
        destination=out,
        src_transform=src.affine,
        src_crs=src.crs.to_wkt(),
        dst_transform=dst.affine,
        dst_crs=dst.crs.to_wkt(),
        src_nodata=nodata,
        dst_nodata=nodata,
        resampling=Resampling.nearest,
        num_threads=1,
    )
    return out
