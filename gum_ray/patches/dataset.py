"""The patches dataset on disk: one Zarr group per point (format: :mod:`gum_ray.patches`).

:class:`PatchDataset` writes and reads entries; :class:`PatchRecord` is one entry read back (its
:class:`~gum_ray.imagery.Imagery` and its labels).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import tempfile
from typing import Any

import numpy as np

from gum_ray.bands import COMPACT_ENCODING_VERSION
from gum_ray.errors import InputError
from gum_ray.grid import geobox_from_dict
from gum_ray.imagery import COMPACT_PARTS, NODATA, Imagery
from gum_ray.patches.points import Point
from gum_ray.store import fs
from gum_ray.version import __version__

PATCHES_FORMAT = "gum-ray-patches"
PATCHES_VERSION = 1
ZARR_NAME = "patches.zarr"
GEOTIFF_DIR = "geotiff"

STATUS_COMPLETE = "complete"
STATUS_NO_IMAGERY = "no_imagery"
DONE_STATUSES = (STATUS_COMPLETE, STATUS_NO_IMAGERY)

LABEL_ARRAYS = ("label", "class")  # what fine-tuning trains on, in order of preference


@dataclasses.dataclass
class PatchRecord:
    """One stored patch: its imagery (with grid and provenance), pseudo-label, the user's labels."""

    key: str
    attrs: dict[str, Any]
    imagery: Imagery
    probability: np.ndarray | None  # uint8 percent, 255 = no data
    cls: np.ndarray | None  # uint8 0/1, 255 = no data
    label: np.ndarray | None  # uint8 0/1, 255 = ignore (the user's own labels)


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


class PatchDataset:
    """A patches dataset at ``root`` (local folder or ``gs://``): see the module docstring."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = fs.normalize(os.fspath(root))
        self.zarr_root = fs.join(self.root, ZARR_NAME)
        self.geotiff_dir = fs.join(self.root, GEOTIFF_DIR)

    # -- the dataset as a whole ---------------------------------------------------------------
    def exists(self) -> bool:
        return fs.exists(fs.join(self.zarr_root, "zarr.json"))

    @property
    def attrs(self) -> dict[str, Any]:
        """The dataset's attributes; :class:`InputError` if ``root`` is not a patches dataset."""
        try:
            meta = json.loads(fs.read_bytes(fs.join(self.zarr_root, "zarr.json")))
        except FileNotFoundError:
            raise InputError(
                f"{self.root}: is not a gum-ray patches dataset (no {ZARR_NAME}); make one with "
                "`gum patches --points POINTS.geojson --year Y --out PATCHES`"
            ) from None
        attrs = meta.get("attributes", {})
        if attrs.get("format") != PATCHES_FORMAT:
            raise InputError(f"{self.root}: {ZARR_NAME} is not a gum-ray patches dataset (format {attrs.get('format')!r})")
        return attrs

    def create(self, attrs: dict[str, Any]) -> None:
        """Create the dataset, or check that an existing one was made with the same settings.

        The settings that decide an entry's bytes (year, source, checkpoint, patch geometry) must
        match: mixing them in one dataset would make a rerun skip entries it should redo.
        """
        import zarr

        attrs = _jsonable({"format": PATCHES_FORMAT, "version": PATCHES_VERSION, **attrs})
        if self.exists():
            have = self.attrs
            for k in ("year", "patch_size", "resolution_m", "source", "checkpoint_sha256", "with_products"):
                if k in attrs and have.get(k) != attrs[k]:
                    raise InputError(
                        f"{self.root}: this patches dataset was made with {k} = {have.get(k)!r}, this run "
                        f"asks for {attrs[k]!r}; use a new out folder (or the same settings to resume)",
                        param="out",
                    )
            return
        if not fs.is_remote(self.root) and fs.exists(self.root):
            names = [n for n in fs.list_names(self.root) if n not in (ZARR_NAME, GEOTIFF_DIR)]
            if names:
                raise InputError(
                    f"{self.root}: the folder holds other files ({', '.join(names[:3])}) and is not a "
                    "patches dataset; give a new or empty out folder",
                    param="out",
                )
        g = zarr.open_group(fs.zarr_store(self.zarr_root), mode="w", zarr_format=3)
        g.attrs.update(attrs | {"created_at": _now(), "software_version": __version__})

    def keys(self) -> list[str]:
        """Keys of all entries (done or not), sorted."""
        return [n for n in fs.list_names(self.zarr_root) if n != "zarr.json"]

    def entry_attrs(self, key: str) -> dict[str, Any] | None:
        """The attributes of an entry, or None if there is none."""
        try:
            meta = json.loads(fs.read_bytes(fs.join(self.zarr_root, key, "zarr.json")))
        except FileNotFoundError:
            return None
        return meta.get("attributes", {})

    def status(self, key: str) -> str | None:
        """``complete``, ``no_imagery``, None (absent or unfinished)."""
        attrs = self.entry_attrs(key)
        return attrs.get("status") if attrs else None

    def complete_keys(self) -> list[str]:
        """Keys of entries with imagery and labels (status ``complete``)."""
        return [k for k in self.keys() if self.status(k) == STATUS_COMPLETE]

    # -- entries ------------------------------------------------------------------------------
    def _group(self, key: str, mode: str) -> Any:
        import zarr

        store = fs.zarr_store(fs.join(self.zarr_root, key), read_only=(mode == "r"))
        return zarr.open_group(store, mode=mode, zarr_format=3)

    @staticmethod
    def _put(g: Any, name: str, arr: np.ndarray, dims: list[str]) -> None:
        from zarr.codecs import ZstdCodec

        arr = np.ascontiguousarray(arr)
        z = g.create_array(name, shape=arr.shape, dtype=arr.dtype, chunks=arr.shape, fill_value=0,
                           compressors=[ZstdCodec(level=3)], dimension_names=dims, overwrite=True)
        z[...] = arr

    def write_entry(
        self,
        point: Point,
        imagery: Imagery,
        probability: np.ndarray | None,
        cls: np.ndarray | None,
        attrs: dict[str, Any],
        *,
        geotiff: bool = True,
    ) -> None:
        """Write a complete entry: imagery, probability, class, the GeoTIFF, then the status.

        Without ``probability``/``cls`` (imagery-only patches) those arrays are not written.
        """
        g = self._group(point.key, "w")
        for name, arr in imagery.to_compact().items():
            self._put(g, name, arr, ["band", "y", "x"])
        if probability is not None and cls is not None:
            self._put(g, "probability", probability.astype(np.uint8), ["y", "x"])
            self._put(g, "class", cls.astype(np.uint8), ["y", "x"])
        if geotiff:
            self.write_geotiff(point.key, imagery, probability, cls, attrs)
        g.attrs.update(_jsonable({**attrs, "encoding_version": COMPACT_ENCODING_VERSION,
                                  "status": STATUS_COMPLETE, "written_at": _now()}))

    def write_no_imagery(self, point: Point, attrs: dict[str, Any]) -> None:
        """Record that a point has no (or too little) imagery: done, skipped on reruns."""
        g = self._group(point.key, "w")
        g.attrs.update(_jsonable({**attrs, "status": STATUS_NO_IMAGERY, "written_at": _now()}))

    def read(self, key: str) -> PatchRecord:
        """A complete entry; :class:`InputError` if it is missing or unfinished."""
        attrs = self.entry_attrs(key)
        if not attrs or attrs.get("status") != STATUS_COMPLETE:
            raise InputError(f"{self.root}: patch {key!r} is not complete (status {attrs and attrs.get('status')!r})")
        g = self._group(key, "r")
        names = set(g.array_keys())
        parts = {n: np.asarray(g[n][...]) for n in COMPACT_PARTS if n in names}
        imagery = Imagery.from_compact(parts, geobox_from_dict(attrs["geobox"]), attrs.get("provenance", {}))

        def opt(n: str) -> np.ndarray | None:
            return np.asarray(g[n][...]) if n in names else None

        return PatchRecord(key, attrs, imagery, opt("probability"), opt("class"), opt("label"))

    def label_arrays(self, key: str) -> set[str]:
        """Which of ``label`` / ``class`` / ``probability`` an entry holds."""
        return set(self._group(key, "r").array_keys()) & {"label", "class", "probability"}

    def set_label(self, key: str, label: np.ndarray) -> None:
        """Store the user's own labels for an entry (uint8 0/1, 255 = ignore; the patch's shape).

        Fine-tuning prefers ``label`` over the pseudo-label ``class`` when present.
        """
        attrs = self.entry_attrs(key)
        if not attrs or attrs.get("status") != STATUS_COMPLETE:
            raise InputError(f"{self.root}: patch {key!r} is not complete; labels go on complete patches")
        label = np.asarray(label)
        shape = tuple(attrs["geobox"]["shape"])
        if label.shape != shape:
            raise InputError(f"labels for patch {key!r}: shape {label.shape}, the patch is {shape}")
        vals = set(np.unique(label).tolist()) - {0, 1, NODATA}
        if vals:
            raise InputError(f"labels for patch {key!r}: values {sorted(vals)[:5]}; use 0, 1 and 255 (ignore)")
        self._put(self._group(key, "a"), "label", label.astype(np.uint8), ["y", "x"])

    # -- GeoTIFF ------------------------------------------------------------------------------
    def geotiff_path(self, key: str) -> str:
        return fs.join(self.geotiff_dir, f"{key}.tif")

    def write_geotiff(
        self, key: str, imagery: Imagery, probability: np.ndarray | None,
        cls: np.ndarray | None, attrs: dict[str, Any],
    ) -> str:
        """One float32 GeoTIFF: the GUM export bands, P(urban) percent, class; NaN = no data."""
        import rasterio
        from rasterio.crs import CRS as RioCRS

        export, geobox = imagery.export, imagery.geobox
        names = list(imagery.band_names)
        labels = [] if probability is None or cls is None else [probability, cls]
        if labels:
            names += ["urban_probability_percent", "urban_class"]
        data = np.empty((len(names),) + export.shape[1:], np.float32)
        data[: export.shape[0]] = export
        for i, arr in zip((-2, -1), labels):
            band = arr.astype(np.float32)
            band[arr == NODATA] = np.nan
            data[i] = band
        h, w = export.shape[1:]
        profile = dict(driver="GTiff", width=w, height=h, count=len(names), dtype="float32",
                       crs=RioCRS.from_wkt(geobox.crs.to_wkt()), transform=geobox.affine, nodata=np.nan,
                       tiled=True, blockxsize=256, blockysize=256, compress="deflate", predictor=3)
        target = self.geotiff_path(key)
        with tempfile.TemporaryDirectory(prefix="gum-patch-") as tmp:
            local = os.path.join(tmp, f"{key}.tif")
            with rasterio.open(local, "w", **profile) as dst:
                dst.write(data)
                for i, n in enumerate(names, start=1):
                    dst.set_band_description(i, n)
                dst.update_tags(point_id=str(attrs.get("id")), lon=str(attrs.get("lon")),
                                lat=str(attrs.get("lat")), year=str(attrs.get("year")),
                                checkpoint_sha256=str(attrs.get("checkpoint_sha256")),
                                software=f"gum-ray {__version__}")
            fs.put_file(local, target)
        return target


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
