"""The product's ``input_quality`` variable: which inputs each pixel was mapped from.

``input_quality`` is a uint8 ``(year, y, x)`` array beside ``probability`` at every level, with the
same shards (one per cell) and inner chunks. Each value is a set of bit flags
(:data:`gum_ray.imagery.QUALITY_BITS`): 1 = Sentinel-2, 2 = Sentinel-1, 4 = terrain; 255 (the
``fill_value``) = nothing fetched or mapped there. It is written by ``gum map`` for every model
family (it describes the imagery, not the model): under GUM 1 a pixel coded 6 (no Sentinel-2) has
no probability; under GUM 2.0 it has one, resting on Sentinel-1 and terrain only.

Overviews: a pixel at level k is the bitwise AND of the valid (not 255) pixels of the 2 x 2 block
below it (an input counts as present only where every pixel under it had it), 255 where none is
valid. Products written before this variable existed do not have it; every reader checks
(:meth:`gum_ray.store.product.ProductStore.has_quality`) and treats it as "not recorded".
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gum_ray.errors import InputError
from gum_ray.imagery import NODATA, QUALITY_BITS

QUALITY = "input_quality"
#: the largest code that is not no data (all three inputs present)
MAX_CODE = sum(QUALITY_BITS.values())


def encode_quality(codes: np.ndarray) -> np.ndarray:
    """Check and return input-quality codes as uint8 (0-7, 255 = no data)."""
    q = np.asarray(codes)
    if q.dtype != np.uint8:
        raise InputError(f"input quality: dtype {q.dtype}; expected uint8 bit flags (255 = no data)")
    bad = (q > MAX_CODE) & (q != NODATA)
    if bad.any():
        raise InputError(
            f"input quality: values {np.unique(q[bad])[:5].tolist()} are neither bit flags 0-{MAX_CODE} "
            f"nor {NODATA} (no data)"
        )
    return q


def and_2x2(data: np.ndarray) -> np.ndarray:
    """Halve the last two axes by the bitwise AND of the valid (non-255) codes of each 2x2 block.

    255 has every bit set, so it drops out of the AND by itself; a block with no valid code stays
    255. An odd trailing row/column is padded with 255.
    """
    *lead, h, w = data.shape
    if h % 2 or w % 2:
        pad = [(0, 0)] * len(lead) + [(0, h % 2), (0, w % 2)]
        data = np.pad(data, pad, constant_values=NODATA)
        h, w = data.shape[-2:]
    blk = data.reshape(*lead, h // 2, 2, w // 2, 2)
    return np.bitwise_and.reduce(np.bitwise_and.reduce(blk, axis=-1), axis=-2).astype(np.uint8)


def quality_attrs(level: int) -> dict[str, Any]:
    """CF attributes of the ``input_quality`` array at ``level``."""
    names = ", ".join(f"{bit} = {'Sentinel-2' if m == 's2' else 'Sentinel-1' if m == 's1' else 'terrain'}"
                      for m, bit in QUALITY_BITS.items())
    return {
        "long_name": "inputs present per pixel (bit flags)",
        "flag_masks": list(QUALITY_BITS.values()),
        "flag_meanings": "sentinel_2 sentinel_1 terrain",
        "_FillValue": NODATA,
        "grid_mapping": "spatial_ref",
        "coordinates": "spatial_ref pixel_area",
        "comment": (
            f"uint8 bit flags: {names}; {NODATA} = not mapped"
            + ("" if level == 0 else f"; overview level {level}: bitwise AND of the valid 2x2 pixels of level {level - 1}")
        ),
    }


__all__ = ["MAX_CODE", "QUALITY", "and_2x2", "encode_quality", "quality_attrs"]
