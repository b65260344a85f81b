"""The imagery source interface: a grid and a year in, the GUM export layout out.

Every source (the synthetic world, Earth Engine, a folder of GeoTIFF exports) answers the same
question: *for this target grid and this year, what does the GUM export look like?* The grid is an
odc-geo :class:`~odc.geo.geobox.GeoBox` (CRS, affine transform, shape), the one grid type used
across gum-ray. The answer is an :class:`Imagery`: a float32 ``(bands, height, width)`` array in
the band order of :mod:`gum_ray.bands` (11 bands, or 14 with the built-up products) with NaN where a
value is missing, a validity mask per modality, and a provenance record.
"""

from __future__ import annotations

import abc
import datetime as _dt
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from odc.geo.geobox import GeoBox

from gum_ray.bands import (
    PRODUCT_BANDS,
    S1_BANDS,
    S2_BANDS,
    TERRAIN_BANDS,
    export_band_names,
)
from gum_ray.errors import InputError

#: First year with Sentinel-2 surface reflectance (COPERNICUS/S2_SR_HARMONIZED) over the globe.
MIN_YEAR = 2017

#: Modalities in stack order, with their GUM band names.
MODALITY_BANDS: dict[str, tuple[str, ...]] = {
    "s2": S2_BANDS,
    "s1": S1_BANDS,
    "terrain": TERRAIN_BANDS,
    "products": PRODUCT_BANDS,
}

#: Where each modality sits in the export stack.
MODALITY_SLICES: dict[str, slice] = {
    "s2": slice(0, 4),
    "s1": slice(4, 8),
    "terrain": slice(8, 11),
    "products": slice(11, 14),
}


def modalities(with_products: bool) -> tuple[str, ...]:
    """The modalities of an export, in stack order."""
    return ("s2", "s1", "terrain", "products") if with_products else ("s2", "s1", "terrain")


def max_year() -> int:
    """The latest year a source can be asked for: the current (UTC) calendar year."""
    return _dt.datetime.now(_dt.timezone.utc).year


def check_year(year: Any, *, source: str = "imagery source") -> int:
    """Validate a mapping year: an integer from 2017 (first Sentinel-2 SR year) to this year."""
    try:
        y = int(year)
    except (TypeError, ValueError):
        raise InputError(f"{source}: year {year!r} is not a year; give a calendar year such as 2021") from None
    if y != year and not (isinstance(year, str) and year.strip().isdigit()):
        raise InputError(f"{source}: year {year!r} is not a whole year; give a calendar year such as 2021")
    if y < MIN_YEAR:
        raise InputError(
            f"{source}: year {y} is before {MIN_YEAR}, the first year of Sentinel-2 surface reflectance "
            f"(COPERNICUS/S2_SR_HARMONIZED) that the GUM recipe needs; choose a year from {MIN_YEAR} "
            f"to {max_year()}"
        )
    if y > max_year():
        raise InputError(
            f"{source}: year {y} is in the future; choose a year from {MIN_YEAR} to {max_year()}"
        )
    return y


def check_geobox(geobox: Any, *, source: str = "imagery source") -> GeoBox:
    """Validate a target grid: an odc-geo GeoBox with a CRS and at least one pixel."""
    if not isinstance(geobox, GeoBox):
        raise InputError(
            f"{source}: the target grid must be an odc.geo.geobox.GeoBox, got {type(geobox).__name__}; "
            "build one with GeoBox.from_bbox(bbox, crs, resolution=...)"
        )
    if geobox.crs is None:
        raise InputError(f"{source}: the target grid has no CRS; give the GeoBox a CRS (e.g. 'EPSG:32632')")
    h, w = geobox.shape
    if h <= 0 or w <= 0:
        raise InputError(
            f"{source}: the area of interest is empty (target grid {w} x {h} px); give a bounding box with "
            "west < east and south < north, at least one pixel wide"
        )
    a = geobox.affine
    if not all(np.isfinite([a.a, a.b, a.c, a.d, a.e, a.f])) or a.a * a.e - a.b * a.d == 0:
        raise InputError(f"{source}: the target grid's transform {tuple(a)[:6]} is degenerate; fix the GeoBox")
    return geobox


def masks_from_export(export: np.ndarray, with_products: bool) -> dict[str, np.ndarray]:
    """Per-modality validity: True where every band of the modality is finite."""
    return {m: np.isfinite(export[MODALITY_SLICES[m]]).all(axis=0) for m in modalities(with_products)}


@dataclass
class Imagery:
    """Imagery for one grid and one year, in the GUM export layout.

    Attributes:
        export: float32 ``(11 | 14, H, W)``, bands in :data:`gum_ray.bands.EXPORT_BANDS` order
            (plus the three products), NaN where missing.
        masks: modality name (``s2``, ``s1``, ``terrain``, ``products``) -> bool ``(H, W)``, True
            where every band of that modality has a value.
        provenance: what produced the data (source, collections, dates, image counts where known,
            request statistics); JSON-serialisable.
        geobox: the grid the arrays are on.
        with_products: whether the three built-up product bands are present.
    """

    export: np.ndarray
    masks: dict[str, np.ndarray]
    provenance: dict[str, Any]
    geobox: GeoBox
    with_products: bool = False
    _names: tuple[str, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._names = export_band_names(self.with_products)
        shape = (len(self._names),) + tuple(self.geobox.shape)
        if self.export.shape != shape:
            raise ValueError(f"export has shape {self.export.shape}, expected {shape} for this grid")
        if self.export.dtype != np.float32:
            raise ValueError(f"export must be float32, got {self.export.dtype}")
        missing = set(modalities(self.with_products)) - set(self.masks)
        if missing:
            raise ValueError(f"masks missing for modalities {sorted(missing)}")

    @classmethod
    def from_export(
        cls, export: np.ndarray, geobox: GeoBox, provenance: dict[str, Any], *, with_products: bool
    ) -> "Imagery":
        """Wrap an export array, deriving the per-modality masks from its NaNs."""
        export = np.asarray(export, dtype=np.float32)
        return cls(export, masks_from_export(export, with_products), provenance, geobox, with_products)

    @property
    def band_names(self) -> tuple[str, ...]:
        return self._names

    def band(self, name: str) -> np.ndarray:
        """One band by its GUM name (e.g. ``"B8"``, ``"VV_ascending"``, ``"slope"``)."""
        try:
            return self.export[self._names.index(name)]
        except ValueError:
            raise KeyError(f"no band {name!r}; bands are {', '.join(self._names)}") from None

    def modality(self, name: str) -> np.ndarray:
        """The bands of one modality, ``(n, H, W)``."""
        return self.export[MODALITY_SLICES[name]]

    @property
    def valid(self) -> np.ndarray:
        """True where the pixel can be mapped (it has Sentinel-2 data)."""
        return self.masks["s2"]


class ImagerySource(abc.ABC):
    """Where imagery comes from. Subclasses implement :meth:`_fetch`.

    ``fetch`` validates the grid and the year and returns an :class:`Imagery` on exactly that grid.
    Sources are cheap to construct and safe to pickle (Ray ships them to workers); connections are
    opened lazily on the first fetch.
    """

    #: short name used by :func:`gum_ray.sources.get_source` and in provenance records
    name: str = "source"

    def __init__(self, *, with_products: bool = False) -> None:
        if isinstance(with_products, str):
            with_products = with_products.strip().lower() in ("1", "true", "yes", "on", "y")
        self.with_products = bool(with_products)

    def fetch(self, geobox: GeoBox, year: int) -> Imagery:
        """Imagery for ``geobox`` in calendar year ``year`` (GUM export layout, NaN = missing)."""
        geobox = check_geobox(geobox, source=f"{self.name} source")
        year = check_year(year, source=f"{self.name} source")
        imagery = self._fetch(geobox, year)
        if tuple(imagery.geobox.shape) != tuple(geobox.shape):
            raise RuntimeError(f"{self.name} source returned a grid of the wrong shape")
        return imagery

    @abc.abstractmethod
    def _fetch(self, geobox: GeoBox, year: int) -> Imagery:
        """Fetch for a validated grid and year."""

    def describe(self) -> dict[str, Any]:
        """Settings that identify this source (for manifests); never secrets."""
        return {"source": self.name, "with_products": self.with_products}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.describe().items() if k != "source")
        return f"{type(self).__name__}({args})"
