"""The Earth Engine wire encodings: compact integers per modality, cast on the server.

Each modality is cast on the server to compact integers (reflectance x 10000 as uint16, dB x 100 as
int16, elevation in m as int16, slope in centi-degrees as int16, aspect in centi-degrees as uint16,
products as uint8), missing values carried by a sentinel (65535, -32768, 255), so a pixel costs 22
bytes (11 bands) instead of 44. :data:`ENCODINGS` lists them per encoding (``compact``, and
``float32``, the baseline for benchmarks); :func:`encode_numpy` and :func:`decode_numpy` are the two
ends (the emulator encodes, the client decodes). An ``ee.Image`` carries its modality, year and
encoding as properties named by the ``MARKER_*`` constants.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gum_ray.bands import S1_SCALE, S2_SCALE, SLOPE_ASPECT_SCALE
from gum_ray.errors import InputError
from gum_ray.imagery import MODALITY_BANDS
from gum_ray.sources.earthengine.errors import _CorruptResponse

MARKER_MODALITY = "gum_modality"
MARKER_YEAR = "gum_year"
MARKER_ENCODING = "gum_encoding"
MARKER_COUNTS = "gum_image_counts"


@dataclass(frozen=True)
class BandCode:
    """How one GUM band travels: ``stored = clamp(round(value * scale) [mod modulo], lo, hi)``,
    ``nodata`` where the value is missing; decoded as ``float32(stored) / scale``."""

    name: str
    dtype: str
    scale: float
    nodata: float
    lo: float
    hi: float
    modulo: int | None = None

    @property
    def itemsize(self) -> int:
        return np.dtype(self.dtype).itemsize


ENCODINGS: dict[str, dict[str, tuple[BandCode, ...]]] = {
    # the default: compact integers (DESIGN.md decision 5)
    "compact": {
        "s2": tuple(BandCode(b, "uint16", S2_SCALE, 65535, 0, 65534) for b in MODALITY_BANDS["s2"]),
        "s1": tuple(BandCode(b, "int16", S1_SCALE, -32768, -32767, 32767) for b in MODALITY_BANDS["s1"]),
        "terrain": (
            BandCode("elevation", "int16", 1.0, -32768, -32767, 32767),
            BandCode("slope", "int16", SLOPE_ASPECT_SCALE, -32768, 0, 9000),
            # 0 <= aspect < 360 deg is 0..35999 centi-degrees: more than int16 holds, so uint16
            BandCode("aspect", "uint16", SLOPE_ASPECT_SCALE, 65535, 0, 35999, modulo=36000),
        ),
        "products": tuple(BandCode(b, "uint8", 1.0, 255, 0, 1) for b in MODALITY_BANDS["products"]),
    },
    # the float32 baseline (for benchmarks): the export as Earth Engine computes it, -9999 = missing
    "float32": {
        m: tuple(BandCode(b, "float32", 1.0, -9999.0, -3.0e38, 3.0e38) for b in bands)
        for m, bands in MODALITY_BANDS.items()
    },
}


def band_codes(modality: str, encoding: str = "compact") -> tuple[BandCode, ...]:
    try:
        return ENCODINGS[encoding][modality]
    except KeyError:
        raise InputError(
            f"unknown encoding {encoding!r} or modality {modality!r}; encodings: {sorted(ENCODINGS)}, "
            f"modalities: {sorted(MODALITY_BANDS)}"
        ) from None


def request_bytes_per_pixel(codes: tuple[BandCode, ...]) -> int:
    """Bytes per pixel as Earth Engine counts a request: each band's bytes plus its mask byte."""
    return sum(c.itemsize + 1 for c in codes)


def wire_bytes_per_pixel(codes: tuple[BandCode, ...]) -> int:
    """Bytes per pixel in the NPY response body."""
    return sum(c.itemsize for c in codes)


def encode_numpy(values: np.ndarray, codes: tuple[BandCode, ...]) -> np.ndarray:
    """float32 (n, h, w) GUM values (NaN = missing) -> structured (h, w) array of the wire encoding.

    The emulator answers with this; Earth Engine computes the same on its side of the wire.
    """
    dtype = np.dtype([(c.name, c.dtype) for c in codes])
    out = np.empty(values.shape[1:], dtype)
    for k, c in enumerate(codes):
        v = values[k].astype(np.float64)
        missing = ~np.isfinite(v)
        if np.dtype(c.dtype).kind == "f":
            q = v
        else:
            q = np.rint(v * c.scale)
            if c.modulo:
                q = np.mod(q, c.modulo)
            q = np.clip(q, c.lo, c.hi)
        q[missing] = c.nodata
        out[c.name] = q.astype(c.dtype)
    return out


def decode_numpy(arr: np.ndarray, codes: tuple[BandCode, ...]) -> np.ndarray:
    """Structured (h, w) array of the wire encoding -> float32 (n, h, w), NaN where missing.

    Same arithmetic as :func:`gum_ray.bands.decode_compact`: ``float32(stored) / scale``.
    """
    names = arr.dtype.names or ()
    missing = [c.name for c in codes if c.name not in names]
    if missing:
        raise _CorruptResponse(f"response lacks bands {missing}")
    out = np.empty((len(codes),) + arr.shape, np.float32)
    for k, c in enumerate(codes):
        raw = arr[c.name]
        x = raw.astype(np.float32)
        if c.scale != 1.0:
            x /= np.float32(c.scale)
        x[raw == raw.dtype.type(c.nodata)] = np.nan
        out[k] = x
    return out
