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

Modules: :mod:`.points` (points files), :mod:`.dataset` (this format: :class:`PatchDataset`,
:class:`PatchRecord`, which holds the patch's :class:`~gum_ray.imagery.Imagery`), :mod:`.run` (the
job). Work runs per point (fetch -> label -> write) in three ways: in this process (``executor="inline"``,
what the tests use), in a local thread pool (``"local"``, the default: fetches overlap, the network
runs one patch at a time), or as Ray tasks (``"ray"``; ``import ray`` happens only then), each
worker keeping the model loaded between points.
"""

from __future__ import annotations

from gum_ray.grid import centre_offset_px, point_geobox
from gum_ray.imagery import NODATA
from gum_ray.patches.dataset import (
    DONE_STATUSES,
    GEOTIFF_DIR,
    LABEL_ARRAYS,
    PATCHES_FORMAT,
    PATCHES_VERSION,
    STATUS_COMPLETE,
    STATUS_NO_IMAGERY,
    ZARR_NAME,
    PatchDataset,
    PatchRecord,
)
from gum_ray.patches.points import (
    MAX_LAT,
    MIN_LAT,
    Point,
    check_point_lonlat,
    parse_points,
    point_key,
    points_geojson,
    read_points,
    utm_crs,
)
from gum_ray.patches.run import (
    DEFAULT_MIN_VALID,
    PATCH_RESOLUTION_M,
    PATCH_SIZE,
    Executor,
    Labeler,
    PatchJob,
    PatchOutcome,
    PatchReport,
    make_patch,
    plan_patches,
    run_patches,
)

__all__ = [
    "DEFAULT_MIN_VALID",
    "DONE_STATUSES",
    "Executor",
    "GEOTIFF_DIR",
    "LABEL_ARRAYS",
    "Labeler",
    "MAX_LAT",
    "MIN_LAT",
    "NODATA",
    "PATCHES_FORMAT",
    "PATCHES_VERSION",
    "PATCH_RESOLUTION_M",
    "PATCH_SIZE",
    "PatchDataset",
    "PatchJob",
    "PatchOutcome",
    "PatchRecord",
    "PatchReport",
    "Point",
    "STATUS_COMPLETE",
    "STATUS_NO_IMAGERY",
    "ZARR_NAME",
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
