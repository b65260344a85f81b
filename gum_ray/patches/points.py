"""Points files: a GeoJSON FeatureCollection of Points, one patch per point (see :mod:`gum_ray.patches`).

A point's patch is the ``size`` x ``size`` GeoBox at 10 m in its UTM zone, centred on it
(:func:`gum_ray.grid.point_geobox`, the rule ``gum map`` uses for cells).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from gum_ray.errors import InputError, NotFoundError
from gum_ray.grid import utm_crs_for

#: Latitudes with a UTM zone (and Sentinel-2 land coverage): UTM is defined from 80 S to 84 N.
MIN_LAT, MAX_LAT = -80.0, 84.0

utm_crs = utm_crs_for  # a point's UTM zone: the rule gum map uses for cells


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


MAX_POINTS_BYTES = 256 * 2**20


def read_points(path: str | os.PathLike[str]) -> list[Point]:
    """Read and validate a points GeoJSON file, local or ``gs://`` (see :func:`parse_points`)."""
    from gum_ray.urls import is_remote

    if is_remote(path):
        from gum_ray.urls import read_remote

        data = read_remote(str(path), MAX_POINTS_BYTES, "points file")
        try:
            obj = json.loads(data.decode("utf-8-sig"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise InputError(f"points file {path}: not valid GeoJSON ({str(exc)[:160]}); give a "
                             "FeatureCollection of Points") from None
        return parse_points(obj, source=f"points file {path}")
    p = Path(path)
    if not p.exists():
        raise NotFoundError(f"points file {p}: no such file; give a GeoJSON FeatureCollection of Points")
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
