"""Plausibility of GeoTIFF pixel values against the band contract (DESIGN.md "Band contract").

The network takes Sentinel-2 as reflectance 0-1 and Sentinel-1 as backscatter in dB (about -25..0).
Files left in Sentinel-2 digital numbers (0-10000) are clipped to 1 everywhere, and Sentinel-1 in
linear power (0-1, positive) becomes 0 dB everywhere: the prediction is garbage without an error.
:class:`UnitsCheck` looks at the values as blocks are read and warns once per file, one line
through the logging the CLI prints (``WARNING ...``), saying what to do.
"""

from __future__ import annotations

import logging

import numpy as np

from gum_ray import bands

log = logging.getLogger(__name__)

S2_MAX_REFLECTANCE = 1.5  # a median above this is not reflectance (bright clouds peak near 1.5)
SAMPLE_STEP = 4  # every 4th row and column is enough to judge units


class UnitsCheck:
    """Warns (once per file and modality) when S2 looks like digital numbers or S1 like linear power."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.warned: set[str] = set()

    def observe(self, export: np.ndarray) -> None:
        """Look at a block of a GUM export (bands, rows, cols) as read, NaN kept."""
        if len(self.warned) == 2 or export.ndim != 3 or export.shape[0] < 8:
            return
        sample = export[:, ::SAMPLE_STEP, ::SAMPLE_STEP]
        if "s2" not in self.warned:
            s2 = sample[bands.S2_SLICE]
            s2 = s2[np.isfinite(s2)]
            if s2.size and float(np.median(s2)) > S2_MAX_REFLECTANCE:
                self.warned.add("s2")
                log.warning(
                    "%s: Sentinel-2 values look like digital numbers (median %.0f, reflectance is "
                    "0-1), so the model sees them clipped to 1; divide B4 B3 B2 B8 by 10000 first",
                    self.source, float(np.median(s2)),
                )
        if "s1" not in self.warned:
            s1 = sample[bands.S1_SLICE]
            s1 = s1[np.isfinite(s1) & (s1 != 0)]  # 0 is Earth Engine's empty-pass fallback
            if s1.size and float(np.median(s1)) > 0:
                self.warned.add("s1")
                log.warning(
                    "%s: Sentinel-1 values look like linear power, not dB (median %.3g > 0; dB is "
                    "about -25..0), so the model sees them as 0 dB; convert with 10 * log10(x) first",
                    self.source, float(np.median(s1)),
                )
