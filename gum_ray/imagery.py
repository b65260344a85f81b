"""The two pixel containers of gum-ray: :class:`Imagery` (model input) and :class:`Prediction` (output).

Every imagery source returns an :class:`Imagery`, the imagery cache stores and returns one, a patch
holds one; the inference engine returns a :class:`Prediction` and the write stage takes one. Each
carries its grid as an odc-geo :class:`~odc.geo.geobox.GeoBox`; a GeoBox becomes a dict only where
it is (de)serialised (:func:`gum_ray.grid.geobox_to_dict`).

Imagery, in the GUM export layout (:mod:`gum_ray.bands`)::

    export        float32 (11 | 14, H, W)   B4 B3 B2 B8 | VV/VH asc, desc (dB) | elevation slope
                                            aspect [| worldcover_built gisa_2019 wsf_2019];
                                            NaN where a value is missing
    masks         modality -> bool (H, W)   True where every band of s2 / s1 / terrain / products
                                            has a value
    geobox        GeoBox                    the grid of the arrays
    provenance    dict (JSON-able)          what made the pixels (source, dates, requests, ...)

Its compact form (:meth:`Imagery.to_compact`, the imagery cache's and the patch dataset's on-disk
parts, :data:`COMPACT_PARTS`) is :func:`gum_ray.bands.encode_compact`: ``s2`` uint16 reflectance
x 10000, ``s1`` int16 dB x 100, ``terrain`` int16 (m, centi-degrees), ``products`` uint8, plus
``s2_mask``, ``s1_mask``, ``terrain_mask`` uint8 (1 = value present).

A prediction::

    probability   float (H, W)              P(urban) in [0, 1]; NaN = no data
    label         uint8 (H, W) or None      the class (0/1) where the engine made it
    geobox        GeoBox or None            the grid (None for a bare array through the engine)
    provenance    dict                      what made it (source dates, timings, ...)
    quality       uint8 (H, W) or None      input quality: which inputs each pixel had
                                            (:func:`input_quality`), whatever the model mapped

Input quality is a uint8 of bit flags per pixel, independent of the model: :data:`QUALITY_S2` (1)
where the pixel has Sentinel-2, :data:`QUALITY_S1` (2) Sentinel-1, :data:`QUALITY_TERRAIN` (4)
terrain (so 7 = everything, 6 = no Sentinel-2, e.g. under persistent cloud); :data:`NODATA` (255)
where nothing was fetched or mapped. Under GUM 1 a pixel without Sentinel-2 has a code but no
probability; under GUM 2.0 it has both.

Stored outputs are uint8: P(urban) in percent 0-100 and classes 0/1, with :data:`NODATA` (255) for
no data (the product's ``_FillValue``, ``gum predict``'s nodata, a patch's unlabelled pixels).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from gum_ray.bands import (
    PRODUCT_BANDS,
    S1_BANDS,
    S2_BANDS,
    TERRAIN_BANDS,
    decode_compact,
    encode_compact,
    export_band_names,
)

if TYPE_CHECKING:  # odc-geo (with dask, shapely and pyproj: 0.27 s) is imported where a grid is made
    from odc.geo.geobox import GeoBox

#: uint8 "no data" of every stored output (probability percent, class, labels to ignore).
NODATA = 255

#: Input-quality bit flags (:func:`input_quality`): which inputs a pixel had.
QUALITY_S2 = 1
QUALITY_S1 = 2
QUALITY_TERRAIN = 4
#: modality -> its input-quality bit
QUALITY_BITS: dict[str, int] = {"s2": QUALITY_S2, "s1": QUALITY_S1, "terrain": QUALITY_TERRAIN}

#: The arrays of the compact form, in storage order (``products`` only with the product bands).
COMPACT_PARTS = ("s2", "s2_mask", "s1", "s1_mask", "terrain", "terrain_mask", "products")

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


def masks_from_export(export: np.ndarray, with_products: bool) -> dict[str, np.ndarray]:
    """Per-modality validity: True where every band of the modality is finite."""
    return {m: np.isfinite(export[MODALITY_SLICES[m]]).all(axis=0) for m in modalities(with_products)}


def input_quality(masks: dict[str, np.ndarray]) -> np.ndarray:
    """Per-pixel input quality (uint8 bit flags of :data:`QUALITY_BITS`) from per-modality masks."""
    shape = np.shape(masks["s2"])
    out = np.zeros(shape, np.uint8)
    for name, bit in QUALITY_BITS.items():
        out |= np.where(np.asarray(masks[name], dtype=bool), np.uint8(bit), np.uint8(0))
    return out


def compact_input_quality(masks: dict[str, Any]) -> Any:
    """:func:`input_quality` from the compact form's mask bytes: ``masks`` maps each modality of
    :data:`QUALITY_BITS` to its ``<modality>_mask`` part, (bands, H, W) uint8 0/1 as
    :func:`gum_ray.bands.encode_compact` writes them, numpy or torch (the result is of the same
    kind, on the same device). A modality's bit is the bitwise AND of its bands' bytes, moved into
    place: equal to ``input_quality`` of each mask's ``all(axis=0)`` for 0/1 bytes, in a third of
    numpy's time on a CPU, and a few kernels on a GPU (no mask goes back to the host)."""
    out = None
    for name, bit in QUALITY_BITS.items():
        m = masks[name]
        r = m[0] & m[1] if len(m) > 1 else m[0] & 1  # a new array either way
        for b in range(2, len(m)):
            r &= m[b]
        if bit > 1:
            r <<= bit.bit_length() - 1
        if out is None:
            out = r
        else:
            out |= r
    return out


@dataclass
class Imagery:
    """Imagery for one grid and one year, in the GUM export layout (see the module docstring).

    Attributes:
        export: float32 ``(11 | 14, H, W)``, bands in :data:`gum_ray.bands.EXPORT_BANDS` order
            (plus the three products), NaN where missing.
        masks: modality name (``s2``, ``s1``, ``terrain``, ``products``) -> bool ``(H, W)``, True
            where every band of that modality has a value.
        provenance: what produced the data (source, collections, dates, image counts where known,
            request statistics); JSON-serialisable.
        geobox: the grid the arrays are on.
        with_products: whether the three built-up product bands are present.

    Raises:
        ValueError: the export's shape, dtype or masks do not fit the grid and the layout.
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
        cls, export: np.ndarray, geobox: GeoBox, provenance: dict[str, Any] | None = None, *,
        with_products: bool | None = None,
    ) -> "Imagery":
        """Wrap an export array, deriving the per-modality masks from its NaNs.

        ``with_products`` defaults to what the band count says (14 bands = with products).
        """
        export = np.asarray(export, dtype=np.float32)
        if with_products is None:
            with_products = export.shape[0] == len(export_band_names(True))
        return cls(export, masks_from_export(export, with_products), dict(provenance or {}), geobox, with_products)

    @classmethod
    def from_compact(
        cls, parts: dict[str, np.ndarray], geobox: GeoBox, provenance: dict[str, Any] | None = None
    ) -> "Imagery":
        """Imagery from its compact parts (:data:`COMPACT_PARTS`); inverse of :meth:`to_compact`."""
        return cls.from_export(decode_compact(parts), geobox, provenance, with_products="products" in parts)

    def to_compact(self) -> dict[str, np.ndarray]:
        """The compact integer parts (:func:`gum_ray.bands.encode_compact`) of the export."""
        return encode_compact(self.export)

    def to_xarray(self) -> Any:
        """An :class:`xarray.Dataset` with the export (``band``, y, x) and one mask per modality.

        Coordinates and the CRS (``spatial_ref``) come from odc-geo, so ``.odc.geobox`` gives the
        grid back.
        """
        import xarray as xr
        from odc.geo.xr import xr_coords

        coords = xr_coords(self.geobox, crs_coord_name="spatial_ref")
        dims = tuple(self.geobox.dimensions)
        data = {"export": (("band",) + dims, self.export)}
        data.update({f"{m}_mask": (dims, self.masks[m]) for m in modalities(self.with_products)})
        ds = xr.Dataset(data, coords={"band": list(self._names), **coords})
        for name in ds.data_vars:
            ds[name].encoding["grid_mapping"] = "spatial_ref"
        ds.attrs["provenance"] = json.dumps(self.provenance, default=str, sort_keys=True)
        return ds

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
        """True where the pixel has Sentinel-2 data (what GUM 1 needs to map a pixel)."""
        return self.masks["s2"]

    def input_quality(self) -> np.ndarray:
        """Which of Sentinel-2 / Sentinel-1 / terrain each pixel has (:func:`input_quality`)."""
        return input_quality(self.masks)


def probability_to_uint8(prob: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """P(urban) float -> uint8 percent 0-100, :data:`NODATA` where ``valid`` is False or prob is NaN."""
    out = np.rint(np.nan_to_num(prob, nan=0.0) * 100.0).clip(0, 100).astype(np.uint8)
    bad = ~np.isfinite(prob)
    if valid is not None:
        bad |= ~valid
    out[bad] = NODATA
    return out


@dataclass
class Prediction:
    """The network's answer on a grid (see the module docstring).

    Attributes:
        probability: P(urban) (H, W), float32 (or float16 between mapping stages); NaN = no data.
        label: the class (H, W) uint8 0/1 where the engine made one, else None.
        geobox: the grid, or None for an array predicted without one.
        provenance: what made it (source dates, timings, crops run); JSON-able.
        quality: the input quality (H, W) uint8 bit flags (:func:`input_quality`, 255 = nothing
            fetched there), or None where the imagery's masks were not known (a bare array).
    """

    probability: np.ndarray
    label: np.ndarray | None = None
    geobox: GeoBox | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    quality: np.ndarray | None = None

    @property
    def valid(self) -> np.ndarray:
        """True where there is a prediction (the probability is a number)."""
        return np.isfinite(self.probability)

    def masked(self, valid: np.ndarray) -> "Prediction":
        """This prediction with no data (NaN probability) where ``valid`` is False."""
        prob = np.array(self.probability, copy=True)
        prob[~valid] = np.nan
        return Prediction(prob, self.label, self.geobox, dict(self.provenance), self.quality)

    def percent(self) -> np.ndarray:
        """P(urban) as uint8 percent 0-100, :data:`NODATA` where there is no prediction."""
        return probability_to_uint8(self.probability)

    def classes(self) -> np.ndarray:
        """The class as uint8 0/1, :data:`NODATA` where there is no prediction."""
        if self.label is None:
            raise ValueError("this prediction carries probabilities only (no class)")
        out = self.label.astype(np.uint8, copy=True)
        out[~self.valid] = NODATA
        return out


__all__ = [
    "COMPACT_PARTS",
    "MODALITY_BANDS",
    "MODALITY_SLICES",
    "NODATA",
    "QUALITY_BITS",
    "QUALITY_S1",
    "QUALITY_S2",
    "QUALITY_TERRAIN",
    "Imagery",
    "Prediction",
    "compact_input_quality",
    "input_quality",
    "masks_from_export",
    "modalities",
    "probability_to_uint8",
]
