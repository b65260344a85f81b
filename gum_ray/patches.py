"""Patch annotations: a 256 x 256 patch at 10 m around each point, with the model's pseudo-label.

This is the GUM "patch generation" step (GUM_REFERENCE.md): points in, one square patch per point in
the local UTM grid of the point, the imagery of a year from any source, and the network's
probability and class on it (the pseudo-label that becomes training data).

Layout of a patches dataset ``PATCHES`` (a local folder or ``gs://``)::

    PATCHES/patches.zarr/zarr.json          root group; attrs: format, version, year, source,
                                            checkpoint (sha256), inference settings, patch geometry
    PATCHES/patches.zarr/<key>/             one Zarr v3 group per point (key = the point id, made
                                            path-safe):
        s2 s1 terrain [products]             compact imagery (gum_ray.bands.encode_compact)
        s2_mask s1_mask terrain_mask         uint8 validity (1 = value present)
        probability                          uint8 P(urban) percent 0-100, 255 = no data
        class                                uint8 pseudo-label 0/1, 255 = no data
        label                                optional: the user's own labels (uint8 0/1, 255 = ignore)
        zarr.json attributes                 point (id, lon, lat), year, geobox (CRS WKT, affine,
                                             shape), provenance, statistics, ``status`` (last)
    PATCHES/geotiff/<key>.tif               the same patch as one float32 GeoTIFF for other tools:
                                            the GUM export bands, P(urban) percent, class (NaN =
                                            no data), band descriptions set

An entry is done when its group's ``status`` attribute says so (``complete``, or ``no_imagery``
for a point whose imagery is missing: reported and skipped, and not asked again on a rerun). The
status is written last, after every array and the GeoTIFF, so a killed run leaves no entry that
looks finished. A rerun skips what is done and redoes the rest.

Work runs per point (fetch -> label -> write) in three ways: in this process (``executor="inline"``,
what the tests use), in a local thread pool (``"local"``, the default: fetches overlap, the network
runs one patch at a time), or as Ray tasks (``"ray"``; ``import ray`` happens only then), each
worker keeping the model loaded between points.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import math
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from affine import Affine
from odc.geo.geobox import GeoBox
from pyproj import Transformer

from gum_ray import __version__
from gum_ray.bands import COMPACT_ENCODING_VERSION, decode_compact, encode_compact, export_band_names
from gum_ray.errors import CheckpointError, GumError, InputError
from gum_ray.grid import geobox_from_dict, geobox_to_dict, utm_crs_for
from gum_ray.store import fs

log = logging.getLogger(__name__)

PATCHES_FORMAT = "gum-ray-patches"
PATCHES_VERSION = 1
ZARR_NAME = "patches.zarr"
GEOTIFF_DIR = "geotiff"

PATCH_SIZE = 256
PATCH_RESOLUTION_M = 10.0
#: Latitudes with a UTM zone (and Sentinel-2 land coverage): UTM is defined from 80 S to 84 N.
MIN_LAT, MAX_LAT = -80.0, 84.0
#: Default share of the patch that must have Sentinel-2 data, else the point is skipped.
DEFAULT_MIN_VALID = 0.5

STATUS_COMPLETE = "complete"
STATUS_NO_IMAGERY = "no_imagery"
DONE_STATUSES = (STATUS_COMPLETE, STATUS_NO_IMAGERY)
NODATA = 255

IMAGERY_PARTS = ("s2", "s2_mask", "s1", "s1_mask", "terrain", "terrain_mask", "products")
LABEL_ARRAYS = ("label", "class")  # what fine-tuning trains on, in order of preference

Executor = Literal["inline", "local", "ray"]


# ----------------------------------------------------------------------------------------- points


@dataclasses.dataclass(frozen=True)
class Point:
    """One point of a points file: its id (as given), a path-safe ``key``, and lon/lat degrees."""

    id: str
    key: str
    lon: float
    lat: float
    index: int = 0


_KEY_BAD = re.compile(r"[^A-Za-z0-9._-]+")


def point_key(pid: Any) -> str:
    """A path- and Zarr-safe key for a point id (``[A-Za-z0-9._-]``, not starting with ``.``/``__``)."""
    key = _KEY_BAD.sub("_", str(pid)).strip("_") or "p"
    if key.startswith((".", "__")) or key in ("zarr.json",):
        key = "p" + key
    return key[:120]


def check_point_lonlat(lon: Any, lat: Any, where: str) -> tuple[float, float]:
    """Validate a point's coordinates; ``where`` names the point in the message."""
    try:
        lon_f, lat_f = float(lon), float(lat)
    except (TypeError, ValueError):
        raise InputError(f"{where}: coordinates ({lon!r}, {lat!r}) are not numbers; give [lon, lat] in degrees") from None
    if not (math.isfinite(lon_f) and math.isfinite(lat_f)):
        raise InputError(f"{where}: coordinates ({lon_f}, {lat_f}) must be finite numbers")
    if not -90.0 <= lat_f <= 90.0:
        hint = " - are longitude and latitude swapped? GeoJSON is [lon, lat]" if abs(lon_f) <= 90.0 else ""
        raise InputError(f"{where}: latitude {lat_f} is beyond +-90 degrees{hint}")
    if not -180.0 <= lon_f <= 180.0:
        raise InputError(
            f"{where}: longitude {lon_f} is outside -180..180; give lon/lat degrees (EPSG:4326), "
            "not projected coordinates"
        )
    if not MIN_LAT <= lat_f <= MAX_LAT:
        raise InputError(
            f"{where}: latitude {lat_f} is outside {MIN_LAT:g}..{MAX_LAT:g}, where patches can be made: a "
            "patch is cut in the point's UTM zone, and UTM (like Sentinel-2's land coverage) stops at "
            "80 S and 84 N; remove the point or move it"
        )
    return lon_f, lat_f


def parse_points(obj: Any, source: str = "points") -> list[Point]:
    """Points from a GeoJSON object: a FeatureCollection (or one Feature) of Point features.

    The id of a feature is its ``id``, else ``properties.id``, else its index in the file. Every
    point is validated before any work starts; a bad one is an :class:`InputError` naming it.
    """
    if isinstance(obj, dict) and obj.get("type") == "Feature":
        features = [obj]
    elif isinstance(obj, dict) and obj.get("type") == "FeatureCollection":
        features = obj.get("features")
        if not isinstance(features, list):
            raise InputError(f"{source}: the FeatureCollection has no 'features' list")
    else:
        kind = obj.get("type") if isinstance(obj, dict) else type(obj).__name__
        raise InputError(
            f"{source}: is a GeoJSON {kind!r}; give a FeatureCollection of Point features "
            "(lon/lat degrees), e.g. {\"type\": \"FeatureCollection\", \"features\": [...]}"
        )
    if not features:
        raise InputError(
            f"{source}: has no points (the FeatureCollection is empty); add Point features, one per patch"
        )
    points: list[Point] = []
    by_key: dict[str, str] = {}
    for i, feat in enumerate(features):
        if not isinstance(feat, dict):
            raise InputError(f"{source}: feature {i} is not a GeoJSON Feature object")
        props = feat.get("properties") or {}
        pid = feat.get("id")
        if pid is None and isinstance(props, dict):
            pid = props.get("id")
        pid = str(i) if pid is None else str(pid)
        where = f"{source}: point {pid!r} (feature {i})"
        geom = feat.get("geometry")
        if not isinstance(geom, dict) or geom.get("type") != "Point":
            kind = geom.get("type") if isinstance(geom, dict) else None
            raise InputError(
                f"{where}: geometry is {kind!r}, not a Point; a points file holds one Point per patch "
                "(use the centroid of a polygon)"
            )
        coords = geom.get("coordinates")
        if not isinstance(coords, (list, tuple)) or len(coords) < 2:
            raise InputError(f"{where}: a Point needs coordinates [lon, lat], got {coords!r}")
        lon, lat = check_point_lonlat(coords[0], coords[1], where)
        key = point_key(pid)
        if key in by_key:
            raise InputError(
                f"{source}: point ids {by_key[key]!r} and {pid!r} are the same (as stored: {key!r}); "
                "give every point its own id"
            )
        by_key[key] = pid
        points.append(Point(pid, key, lon, lat, i))
    return points


def read_points(path: str | os.PathLike[str]) -> list[Point]:
    """Read and validate a points GeoJSON file (see :func:`parse_points`)."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"points file {p}: no such file; give a GeoJSON FeatureCollection of Points")
    if p.is_dir():
        raise InputError(f"points file {p}: is a folder; give a .geojson file")
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"points file {p}: not valid GeoJSON ({exc}); give a FeatureCollection of Points") from None
    return parse_points(obj, source=f"points file {p}")


def points_geojson(points: Iterable[tuple[Any, float, float]]) -> dict[str, Any]:
    """A FeatureCollection of Points from ``(id, lon, lat)`` tuples (handy for scripts and tests)."""
    return {
        "type": "FeatureCollection",
        "features": [
            {"type": "Feature", "id": pid, "properties": {"id": pid},
             "geometry": {"type": "Point", "coordinates": [float(lon), float(lat)]}}
            for pid, lon, lat in points
        ],
    }


# ------------------------------------------------------------------------------------ patch grid


utm_crs = utm_crs_for  # a point's UTM zone: the rule gum map uses for cells


def point_geobox(
    lon: float, lat: float, size: int = PATCH_SIZE, resolution: float = PATCH_RESOLUTION_M
) -> GeoBox:
    """The ``size`` x ``size`` GeoBox at ``resolution`` m in the point's UTM zone, centred on it.

    Pixel edges lie on multiples of ``resolution`` (the lattice of every gum-ray UTM grid), so the
    patch centre is within half a pixel of the point in x and in y.
    """
    crs = utm_crs(lon, lat)
    x, y = Transformer.from_crs(4326, crs, always_xy=True).transform(lon, lat)
    half = size * resolution / 2.0
    x0 = round((x - half) / resolution) * resolution
    y1 = round((y + half) / resolution) * resolution
    return GeoBox((size, size), Affine(resolution, 0.0, x0, 0.0, -resolution, y1), crs)


def centre_offset_px(geobox: GeoBox, lon: float, lat: float) -> tuple[float, float]:
    """(dx, dy) in pixels from the GeoBox's centre to the point (within +-0.5 for a patch)."""
    x, y = Transformer.from_crs(4326, geobox.crs.to_wkt(), always_xy=True).transform(lon, lat)
    a = geobox.affine
    h, w = geobox.shape
    cx, cy = a.c + a.a * w / 2.0, a.f + a.e * h / 2.0
    return (x - cx) / abs(a.a), (cy - y) / abs(a.e)


# --------------------------------------------------------------------------------------- dataset


@dataclasses.dataclass
class PatchRecord:
    """One stored patch: imagery, pseudo-label, optional user labels, grid and attributes."""

    key: str
    attrs: dict[str, Any]
    parts: dict[str, np.ndarray]
    probability: np.ndarray | None  # uint8 percent, 255 = no data
    cls: np.ndarray | None  # uint8 0/1, 255 = no data
    label: np.ndarray | None  # uint8 0/1, 255 = ignore (the user's own labels)

    @property
    def export(self) -> np.ndarray:
        """The float32 GUM export (11 or 14, H, W), NaN where missing."""
        return decode_compact(self.parts)

    @property
    def geobox(self) -> GeoBox:
        return geobox_from_dict(self.attrs["geobox"])

    @property
    def with_products(self) -> bool:
        return "products" in self.parts


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
                        f"asks for {attrs[k]!r}; use a new --out folder (or the same settings to resume)"
                    )
            return
        if not fs.is_remote(self.root) and fs.exists(self.root):
            names = [n for n in fs.list_names(self.root) if n not in (ZARR_NAME, GEOTIFF_DIR)]
            if names:
                raise InputError(
                    f"{self.root}: the folder holds other files ({', '.join(names[:3])}) and is not a "
                    "patches dataset; give a new or empty --out folder"
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
        export: np.ndarray,
        geobox: GeoBox,
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
        for name, arr in encode_compact(export).items():
            self._put(g, name, arr, ["band", "y", "x"])
        if probability is not None and cls is not None:
            self._put(g, "probability", probability.astype(np.uint8), ["y", "x"])
            self._put(g, "class", cls.astype(np.uint8), ["y", "x"])
        if geotiff:
            self.write_geotiff(point.key, export, geobox, probability, cls, attrs)
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
        parts = {n: np.asarray(g[n][...]) for n in IMAGERY_PARTS if n in names}

        def opt(n: str) -> np.ndarray | None:
            return np.asarray(g[n][...]) if n in names else None

        return PatchRecord(key, attrs, parts, opt("probability"), opt("class"), opt("label"))

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
        self, key: str, export: np.ndarray, geobox: GeoBox, probability: np.ndarray | None,
        cls: np.ndarray | None, attrs: dict[str, Any],
    ) -> str:
        """One float32 GeoTIFF: the GUM export bands, P(urban) percent, class; NaN = no data."""
        import rasterio
        from rasterio.crs import CRS as RioCRS

        names = list(export_band_names(export.shape[0] == 14))
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


# --------------------------------------------------------------------------------------- labels


class Labeler:
    """The model's probability and class on a patch (the pseudo-label); the model loads lazily."""

    def __init__(self, checkpoint: str, settings: Any = None):
        self.checkpoint = str(checkpoint)
        self.settings = settings
        self._engine = None
        self._loaded = None
        self._lock = threading.Lock()

    def _load(self) -> None:
        from gum_ray.inference import InferenceEngine
        from gum_ray.model import load_checkpoint

        self._loaded = load_checkpoint(self.checkpoint)
        self._engine = InferenceEngine(self._loaded.model, self.settings)

    @property
    def loaded(self):
        with self._lock:
            if self._loaded is None:
                self._load()
        return self._loaded

    def label(self, export: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """GUM export (11/14, H, W) -> (probability uint8 percent, class uint8), 255 = no data."""
        from gum_ray.bands import preprocess, validity_mask
        from gum_ray.inference import probability_to_uint8

        spec = self.loaded.spec
        x = preprocess(export, with_products=spec.with_products)
        valid = validity_mask(export)
        with self._lock:  # one network run at a time; fetches and writes overlap around it
            pred = self._engine.predict(x)
        prob = probability_to_uint8(pred.probability, valid)
        cls = pred.label.astype(np.uint8)
        cls[~valid] = NODATA
        return prob, cls


# ---------------------------------------------------------------------------------------- the job


@dataclasses.dataclass(frozen=True)
class PatchJob:
    """What ``gum patches`` does: points, year, source, model and where to write (picklable)."""

    points: tuple[Point, ...]
    year: int
    out: str
    source: str = "synthetic"
    source_options: tuple[tuple[str, Any], ...] = ()
    checkpoint: str | None = None
    inference: Any = None  # InferenceSettings (None = defaults)
    size: int = PATCH_SIZE
    resolution: float = PATCH_RESOLUTION_M
    min_valid: float = DEFAULT_MIN_VALID
    geotiff: bool = True
    labels: bool = True  # False: imagery only (for the user's own labels), no model needed

    def __post_init__(self) -> None:
        if not self.points:
            raise InputError("no points given; a points file needs at least one Point feature")
        if not 0.0 <= self.min_valid <= 1.0:
            raise InputError(f"--min-valid {self.min_valid}: give a fraction between 0 and 1")
        if self.size < 16:
            raise InputError(f"patch size {self.size} px: must be at least 16")

    def make_source(self):
        from gum_ray.sources import get_source

        return get_source(self.source, **dict(self.source_options))

    def resolved_checkpoint(self) -> str | None:
        """The given checkpoint, or the demo model for the synthetic world (None without labels)."""
        if not self.labels:
            return None
        if self.checkpoint and self.checkpoint != "demo":
            return self.checkpoint
        if self.checkpoint == "demo" or self.source == "synthetic":
            from gum_ray.demo_model import ensure_demo_model

            return str(ensure_demo_model())
        raise InputError(
            f"--checkpoint is required with the {self.source!r} source (a GUM checkpoint .pth); "
            "only the synthetic world has a built-in demo model (--checkpoint demo)"
        )


@dataclasses.dataclass
class PatchOutcome:
    """What happened to one point."""

    id: str
    key: str
    status: str  # complete | no_imagery | done_before | failed
    message: str = ""
    seconds: float = 0.0


@dataclasses.dataclass
class PatchReport:
    """The run's summary; ``outcomes`` has one entry per point."""

    out: str
    outcomes: list[PatchOutcome]
    seconds: float

    def by_status(self, status: str) -> list[PatchOutcome]:
        return [o for o in self.outcomes if o.status == status]

    @property
    def written(self) -> int:
        return len(self.by_status(STATUS_COMPLETE))

    @property
    def no_imagery(self) -> list[PatchOutcome]:
        return self.by_status(STATUS_NO_IMAGERY)

    @property
    def done_before(self) -> int:
        return len(self.by_status("done_before"))

    @property
    def failed(self) -> list[PatchOutcome]:
        return self.by_status("failed")


class _Context:
    """What a worker needs, built once per process (the source, the labeller, the dataset)."""

    def __init__(self, job: PatchJob, checkpoint: str | None):
        self.job = job
        self.source = job.make_source()
        self.labeler = Labeler(checkpoint, job.inference) if checkpoint else None
        self.dataset = PatchDataset(job.out)


_CONTEXTS: dict[tuple[str, str | None], _Context] = {}
_CONTEXTS_LOCK = threading.Lock()


def _context(job: PatchJob, checkpoint: str | None) -> _Context:
    key = (repr(dataclasses.replace(job, points=job.points[:1])), checkpoint)  # all but the points
    with _CONTEXTS_LOCK:
        ctx = _CONTEXTS.get(key)
        if ctx is None:
            _CONTEXTS.clear()  # one job per worker process at a time
            ctx = _CONTEXTS[key] = _Context(job, checkpoint)
        return ctx


def make_patch(point: Point, ctx: _Context, checkpoint_sha256: str | None) -> PatchOutcome:
    """Fetch, label and store the patch of one point; a missing-imagery point is recorded, not fatal."""
    t0 = time.perf_counter()
    job = ctx.job
    geobox = point_geobox(point.lon, point.lat, job.size, job.resolution)
    dx, dy = centre_offset_px(geobox, point.lon, point.lat)
    attrs: dict[str, Any] = {
        "id": point.id, "key": point.key, "index": point.index, "lon": point.lon, "lat": point.lat,
        "year": job.year, "geobox": geobox_to_dict(geobox), "centre_offset_px": [dx, dy],
        "checkpoint_sha256": checkpoint_sha256,
    }
    # a source error (network, quota, credentials) is a failure, retried by a rerun; missing
    # imagery comes back as NaN and is recorded below as "no imagery"
    imagery = ctx.source.fetch(geobox, job.year)
    export = imagery.export
    valid = imagery.valid
    frac = float(valid.mean())
    attrs |= {"provenance": imagery.provenance, "valid_fraction": frac,
              "band_names": list(imagery.band_names)}
    if frac <= 0.0 or frac < job.min_valid:
        why = (f"no Sentinel-2 data in the patch for {job.year}" if frac <= 0.0 else
               f"Sentinel-2 data on {frac:.0%} of the patch, less than --min-valid {job.min_valid:.0%}")
        ctx.dataset.write_no_imagery(point, attrs | {"reason": why})
        return PatchOutcome(point.id, point.key, STATUS_NO_IMAGERY, why, time.perf_counter() - t0)
    prob = cls = None
    if ctx.labeler is not None:
        prob, cls = ctx.labeler.label(export)
        ok = cls != NODATA
        attrs |= {"urban_fraction": float((cls[ok] == 1).mean()) if ok.any() else 0.0}
    ctx.dataset.write_entry(point, export, geobox, prob, cls, attrs, geotiff=job.geotiff)
    return PatchOutcome(point.id, point.key, STATUS_COMPLETE, "", time.perf_counter() - t0)


def _safe_make_patch(point: Point, job: PatchJob, checkpoint: str | None, sha: str | None) -> PatchOutcome:
    t0 = time.perf_counter()
    try:
        return make_patch(point, _context(job, checkpoint), sha)
    except Exception as exc:  # noqa: BLE001 - one failing point must not stop the run
        log.debug("patch %s failed", point.id, exc_info=True)
        msg = str(exc) if isinstance(exc, GumError) else f"{type(exc).__name__}: {exc}"
        return PatchOutcome(point.id, point.key, "failed", msg[:500], time.perf_counter() - t0)


def plan_patches(job: PatchJob, dataset: PatchDataset) -> tuple[list[Point], list[PatchOutcome]]:
    """Points still to do, and outcomes for those already done (status says so)."""
    todo, done = [], []
    existing = set(dataset.keys())
    wanted = [p.key for p in job.points if p.key in existing]
    if len(wanted) > 32:  # many small reads (one per entry): overlap them (object stores)
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=16) as pool:
            found = dict(zip(wanted, pool.map(dataset.entry_attrs, wanted)))
    else:
        found = {k: dataset.entry_attrs(k) for k in wanted}
    for p in job.points:
        attrs = found.get(p.key)
        if attrs and attrs.get("status") in DONE_STATUSES:
            if abs(float(attrs.get("lon", p.lon)) - p.lon) > 1e-9 or abs(float(attrs.get("lat", p.lat)) - p.lat) > 1e-9:
                raise InputError(
                    f"{dataset.root}: point {p.id!r} is stored at ({attrs.get('lon')}, {attrs.get('lat')}) "
                    f"but the points file puts it at ({p.lon}, {p.lat}); give it a new id or use a new --out"
                )
            done.append(PatchOutcome(p.id, p.key, "done_before", str(attrs.get("status"))))
        else:
            todo.append(p)
    return todo, done


def run_patches(
    job: PatchJob,
    *,
    executor: Executor = "local",
    workers: int | None = None,
    ray_address: str | None = None,
    progress: Callable[[PatchOutcome], None] | None = None,
) -> PatchReport:
    """Make the patches of ``job``: resumable, in this process, a thread pool, or Ray tasks."""
    t0 = time.perf_counter()
    from gum_ray.model import load_checkpoint

    from gum_ray.inference import InferenceSettings
    from gum_ray.sources import check_year

    check_year(job.year, source="patches")
    source = job.make_source()
    checkpoint = job.resolved_checkpoint()
    sha = spec = None
    if checkpoint is not None:
        loaded = load_checkpoint(checkpoint)  # validate before any fetch (clear error, once)
        if loaded.spec.with_products and not source.with_products:
            raise CheckpointError(
                f"checkpoint {checkpoint}: is the 13-channel 'with products' model; fetch the products "
                "too (--products), or use the 10-channel checkpoint"
            )
        sha, spec = loaded.sha256, loaded.spec.as_dict()
        del loaded
    settings = job.inference or InferenceSettings()
    job = dataclasses.replace(job, inference=settings)
    dataset = PatchDataset(job.out)
    dataset.create({
        "year": job.year, "patch_size": job.size, "resolution_m": job.resolution,
        "source": source.describe(), "with_products": bool(source.with_products),
        "checkpoint_sha256": sha, "checkpoint": os.path.basename(checkpoint) if checkpoint else None,
        "model_spec": spec, "inference": settings.as_dict() if checkpoint else None,
        "min_valid": job.min_valid,
        "labels": ("class = the model's argmax (pseudo-label); label = the user's, where added"
                   if checkpoint else "imagery only: add labels with PatchDataset.set_label"),
    })
    todo, outcomes = plan_patches(job, dataset)
    for o in outcomes:
        if progress:
            progress(o)

    def note(o: PatchOutcome) -> None:
        outcomes.append(o)
        if progress:
            progress(o)

    if executor == "inline" or (executor == "local" and (workers or 1) <= 1) or not todo:
        for p in todo:
            note(_safe_make_patch(p, job, checkpoint, sha))
    elif executor == "local":
        from concurrent.futures import ThreadPoolExecutor, as_completed

        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gum-patch") as pool:
            futures = [pool.submit(_safe_make_patch, p, job, checkpoint, sha) for p in todo]
            for f in as_completed(futures):
                note(f.result())
    elif executor == "ray":
        for o in _run_ray(todo, job, checkpoint, sha, ray_address, workers):
            note(o)
    else:
        raise InputError(f"executor {executor!r}: use inline, local or ray")
    order = {p.key: i for i, p in enumerate(job.points)}
    outcomes.sort(key=lambda o: order.get(o.key, 0))
    return PatchReport(dataset.root, outcomes, time.perf_counter() - t0)


def _run_ray(todo: Sequence[Point], job: PatchJob, checkpoint: str | None, sha: str | None,
             address: str | None, workers: int | None) -> Iterable[PatchOutcome]:
    """Ray tasks, one per point, at most ``workers`` (default: 2 x cluster CPUs) in flight."""
    import ray

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS") or "local"
        from gum_ray.quiet import ray_runtime_env

        kwargs = {"include_dashboard": False} if address == "local" else {}
        ray.init(address=address, log_to_driver=False, runtime_env=ray_runtime_env(), **kwargs)
    remote = ray.remote(num_cpus=1, max_retries=2)(_safe_make_patch)
    job_ref = ray.put(job)
    cap = workers or max(2, int(2 * ray.cluster_resources().get("CPU", 1)))
    pending: list[Any] = []
    it = iter(todo)
    for p in it:
        pending.append(remote.remote(p, job_ref, checkpoint, sha))
        if len(pending) >= cap:
            ready, pending = ray.wait(pending, num_returns=1)
            yield from ray.get(ready)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        yield from ray.get(ready)


__all__ = [
    "DEFAULT_MIN_VALID",
    "Labeler",
    "PATCH_RESOLUTION_M",
    "PATCH_SIZE",
    "PatchDataset",
    "PatchJob",
    "PatchOutcome",
    "PatchRecord",
    "PatchReport",
    "Point",
    "centre_offset_px",
    "check_point_lonlat",
    "make_patch",
    "parse_points",
    "plan_patches",
    "point_geobox",
    "point_key",
    "points_geojson",
    "read_points",
    "run_patches",
    "utm_crs",
]
