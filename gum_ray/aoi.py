"""GeoJSON areas of interest from untrusted files, and the cap on what an AOI may plan.

An AOI file is user input that decides how much a job fetches and computes, so it is checked before
anything runs (DESIGN.md decision 15):

* the file is bounded in size (:data:`MAX_AOI_BYTES`), and JSON nested too deeply for the parser,
  invalid UTF-8 or invalid JSON is one :class:`~gum_ray.errors.InputError`;
* the structure is walked without recursion (FeatureCollection, Feature, GeometryCollection up to
  :data:`MAX_DEPTH` levels), and every member is type-checked: ``coordinates`` must be arrays of
  rings of positions, a position an array of at least two finite numbers (not strings, not
  booleans, not ``null``); the error names where in the file the problem is
  (``features[0].geometry.coordinates[0][3]``);
* a ``crs`` member (GeoJSON 2008; RFC 7946 dropped it) is honoured or refused: CRS84 and the
  short ``EPSG:4326`` are longitude/latitude, as RFC 7946 is; the OGC URN/URL forms of EPSG:4326
  (``urn:ogc:def:crs:EPSG::4326``, ``http://www.opengis.net/def/crs/EPSG/0/4326``) put latitude
  first, so their positions are read (lat, lon) and swapped, with a warning that says so; any other
  CRS (a projected one such as EPSG:3857, a ``link`` CRS, ``null``) is refused with the way out
  (reproject to EPSG:4326);
* :func:`check_cell_cap` refuses an AOI that would plan more than ``--max-aoi-cells`` cells (a typo
  or swapped coordinates can otherwise ask for a continent), counting cells with an early stop so
  even a whole-world AOI is counted in bounded time and memory.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Any, Iterator

from gum_ray.errors import InputError
from gum_ray.urls import is_remote

log = logging.getLogger(__name__)

MAX_AOI_BYTES = 64 * 1024 * 1024
MAX_DEPTH = 8  # FeatureCollection > Feature > GeometryCollection > ... levels
DEFAULT_MAX_AOI_CELLS = 20_000  # Europe's bounding box (-10.5 35 30 60) is 16,200 cells of 0.25 deg

Ring = list[tuple[float, float]]

_LONLAT_CRS = (
    re.compile(r"^urn:ogc:def:crs:OGC:(1\.3)?:CRS84$", re.I),
    re.compile(r"^https?://www\.opengis\.net/def/crs/OGC/1\.3/CRS84$", re.I),
    re.compile(r"^(OGC:)?CRS84$", re.I),
    re.compile(r"^EPSG:4326$", re.I),  # the short form: longitude first by long convention (GDAL)
)
_LATLON_CRS = (
    re.compile(r"^urn:ogc:def:crs:EPSG:[\d.]*:4326$", re.I),
    re.compile(r"^https?://www\.opengis\.net/def/crs/EPSG/0/4326$", re.I),
)


def load_geojson(obj: str | Path | dict[str, Any], source: str | None = None) -> tuple[Any, str]:
    """Parse a GeoJSON file path, GeoJSON text or an already parsed object; returns (data, name)."""
    if isinstance(obj, str) and is_remote(obj):  # a gs:// object: read whole, same checks
        from gum_ray.urls import read_remote

        data = read_remote(obj, MAX_AOI_BYTES, "AOI file")
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise InputError(f"AOI file {obj}: is not UTF-8 text; GeoJSON is UTF-8 JSON") from None
        return _parse_json(text, f"AOI file {obj}"), source or obj
    if isinstance(obj, (str, Path)) and not str(obj).lstrip().startswith("{"):
        path = Path(obj)
        src = source or str(path)
        if not path.exists():
            raise InputError(f"AOI file {path} does not exist; give a GeoJSON polygon file")
        if path.is_dir():
            raise InputError(f"AOI file {path}: is a folder; give a GeoJSON polygon file")
        size = path.stat().st_size
        if size > MAX_AOI_BYTES:
            raise InputError(
                f"AOI file {path}: {size / 2**20:.0f} MiB is more than an AOI needs (limit "
                f"{MAX_AOI_BYTES // 2**20} MiB); simplify it (e.g. ogr2ogr -simplify 0.0005)"
            )
        try:
            text = path.read_bytes().decode("utf-8-sig")
        except OSError as exc:
            raise InputError(f"AOI file {path}: cannot be read ({exc.strerror or exc})") from None
        except UnicodeDecodeError:
            raise InputError(f"AOI file {path}: is not UTF-8 text; GeoJSON is UTF-8 JSON") from None
        return _parse_json(text, f"AOI file {path}"), src
    if isinstance(obj, (str, Path)):
        src = source or "GeoJSON text"
        return _parse_json(str(obj), src), src
    return obj, source or "GeoJSON"


def _parse_json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except RecursionError:
        raise InputError(f"{what}: nested too deeply to be GeoJSON; give a Polygon or MultiPolygon") from None
    except ValueError as exc:
        raise InputError(f"{what}: not readable GeoJSON ({str(exc)[:160]})") from None


def polygons_from_geojson(data: Any, src: str) -> list[list[Ring]]:
    """Every polygon of a GeoJSON object as rings of (lon, lat), each checked; see the module doc."""
    polys: list[list[Ring]] = []
    swapped: list[list[Ring]] = []
    for geom, where, latlon in _geometries(data, src):
        got = _polygons_of(geom, where, latlon, src)
        polys.extend(got)
        if latlon:
            swapped.extend(got)
    if not polys:
        raise InputError(f"{src}: the geometry has no polygon")
    if swapped:
        note_latlon(src, swapped)
    return polys


def _type_name(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, str):
        return f"the string {v[:40]!r}"
    if isinstance(v, (int, float)):
        return f"the number {v}"
    if isinstance(v, (list, tuple)):
        return "an array"
    if isinstance(v, dict):
        return "an object"
    return type(v).__name__


def _crs_order(crs: Any, where: str, src: str) -> bool | None:
    """The ``crs`` member at ``where``: None if absent, else True when positions are (lat, lon)."""
    if crs is None:
        raise InputError(
            f"{src}: {where}crs is null, which says the coordinates' CRS is unknown; if they are "
            "longitude/latitude degrees (EPSG:4326), remove the crs member"
        )
    name = None
    if isinstance(crs, dict) and crs.get("type") == "name" and isinstance(crs.get("properties"), dict):
        name = crs["properties"].get("name")
    if not isinstance(name, str):
        raise InputError(
            f"{src}: {where}crs is not a named CRS ({_type_name(crs)}); gum-ray reads GeoJSON in "
            "longitude/latitude (EPSG:4326): reproject the file (e.g. ogr2ogr -t_srs EPSG:4326) "
            "and drop the crs member"
        )
    name = name.strip()
    if any(rx.match(name) for rx in _LONLAT_CRS):
        return False
    if any(rx.match(name) for rx in _LATLON_CRS):
        return True
    raise InputError(
        f"{src}: {where}crs is {name[:80]!r}; gum-ray reads GeoJSON in longitude/latitude degrees "
        "(EPSG:4326 / CRS84): reproject the file (e.g. ogr2ogr -t_srs EPSG:4326 out.geojson in.geojson)"
    )


def _geometries(data: Any, src: str) -> Iterator[tuple[dict[str, Any], str, bool]]:
    """(geometry object, its path in the file, positions are lat/lon) for each geometry, in order."""
    stack: list[tuple[Any, str, bool, int]] = [(data, "", False, 0)]
    out: list[tuple[dict[str, Any], str, bool]] = []
    while stack:
        obj, where, latlon, depth = stack.pop()
        label = where or "the top level"
        if depth > MAX_DEPTH:
            raise InputError(f"{src}: {label}: GeoJSON objects nested more than {MAX_DEPTH} deep")
        if not isinstance(obj, dict):
            raise InputError(
                f"{src}: {label} is {_type_name(obj)}, not a GeoJSON object; "
                "give a Polygon, MultiPolygon, Feature or FeatureCollection"
            )
        if not isinstance(obj.get("type"), str):
            raise InputError(
                f"{src}: {label} has no 'type' member, so it is not GeoJSON; "
                "give a Polygon, MultiPolygon, Feature or FeatureCollection"
            )
        if "crs" in obj:
            order = _crs_order(obj["crs"], f"{where}." if where else "", src)
            latlon = bool(order)
        t = obj["type"]
        prefix = f"{where}." if where else ""
        if t == "FeatureCollection":
            feats = obj.get("features")
            if not isinstance(feats, list):
                raise InputError(f"{src}: {prefix}features is {_type_name(feats)}, expected an array of Features")
            if not feats:
                raise InputError(f"{src}: the FeatureCollection has no features")
            for i in range(len(feats) - 1, -1, -1):
                stack.append((feats[i], f"{prefix}features[{i}]", latlon, depth + 1))
        elif t == "Feature":
            geom = obj.get("geometry")
            if not geom:
                raise InputError(f"{src}: {where or 'a Feature'} has no geometry")
            stack.append((geom, f"{prefix}geometry", latlon, depth + 1))
        elif t == "GeometryCollection":
            geoms = obj.get("geometries")
            if not isinstance(geoms, list):
                raise InputError(f"{src}: {prefix}geometries is {_type_name(geoms)}, expected an array")
            for i in range(len(geoms) - 1, -1, -1):
                stack.append((geoms[i], f"{prefix}geometries[{i}]", latlon, depth + 1))
        else:
            out.append((obj, where, latlon))
    return iter(out)


def _polygons_of(g: dict[str, Any], where: str, latlon: bool, src: str) -> list[list[Ring]]:
    t = g.get("type")
    prefix = f"{where}." if where else ""
    if t not in ("Polygon", "MultiPolygon"):
        raise InputError(
            f"{src}: {where or 'the geometry'} is a {str(t)[:40]!r}, which has no area; an AOI must be a "
            "Polygon or MultiPolygon (buffer points or lines into polygons first)"
        )
    coords = g.get("coordinates")
    path = f"{prefix}coordinates"
    if not isinstance(coords, (list, tuple)):
        raise InputError(
            f"{src}: {path} is {_type_name(coords)}; a {t} needs an array of "
            + ("rings" if t == "Polygon" else "polygons")
        )
    polys = [(coords, path)] if t == "Polygon" else [(p, f"{path}[{i}]") for i, p in enumerate(coords)]
    out: list[list[Ring]] = []
    for poly, ppath in polys:
        if not isinstance(poly, (list, tuple)):
            raise InputError(f"{src}: {ppath} is {_type_name(poly)}; a polygon is an array of rings")
        rings: list[Ring] = []
        for j, ring in enumerate(poly):
            rings.append(_ring(ring, f"{ppath}[{j}]", latlon, src))
        if rings:
            out.append(rings)
    return out


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _ring(ring: Any, path: str, latlon: bool, src: str) -> Ring:
    if not isinstance(ring, (list, tuple)):
        raise InputError(f"{src}: {path} is {_type_name(ring)}; a ring is an array of [lon, lat] positions")
    pts: Ring = []
    for k, pt in enumerate(ring):
        here = f"{path}[{k}]"
        if not isinstance(pt, (list, tuple)):
            raise InputError(f"{src}: {here} is {_type_name(pt)}; a position is [lon, lat] in degrees")
        if len(pt) < 2:
            raise InputError(f"{src}: {here}: a position has fewer than 2 numbers")
        if not (_number(pt[0]) and _number(pt[1])):
            bad = pt[0] if not _number(pt[0]) else pt[1]
            raise InputError(f"{src}: {here}: a coordinate is {_type_name(bad)}; positions are [lon, lat] numbers")
        a, b = float(pt[0]), float(pt[1])
        lon, lat = (b, a) if latlon else (a, b)
        if not (math.isfinite(lon) and math.isfinite(lat)):
            raise InputError(f"{src}: {here}: non-finite coordinate {list(pt[:2])}")
        order = "(lat, lon) as its crs says" if latlon else "(lon, lat)"
        if not -90.0 <= lat <= 90.0:
            raise InputError(
                f"{src}: {here}: latitude {lat:g} is beyond +-90 degrees; positions are read {order} "
                "in degrees (EPSG:4326) - are the coordinates swapped or projected?"
            )
        if not -180.0 <= lon <= 360.0:
            raise InputError(
                f"{src}: {here}: longitude {lon:g} is outside -180..180; positions are read {order} "
                "in degrees (EPSG:4326) - are the coordinates projected?"
            )
        pts.append((lon, lat))
    if len(pts) < 4:
        raise InputError(f"{src}: {path}: a polygon ring has fewer than 4 positions")
    return pts


def note_latlon(src: str, polys: list[list[Ring]]) -> None:
    """Warn once that a lat/lon-ordered file was read swapped (saying where that puts the AOI)."""
    lons = [p[0] for poly in polys for p in poly[0]]
    lats = [p[1] for poly in polys for p in poly[0]]
    log.warning(
        "%s: its crs (EPSG:4326 as an OGC URN/URL) puts latitude first, so positions were read as "
        "(lat, lon): the AOI spans longitudes %.4f..%.4f, latitudes %.4f..%.4f",
        src, min(lons), max(lons), min(lats), max(lats),
    )


def note_antimeridian(aoi: Any) -> None:
    """Say (a warning line) that a GeoJSON AOI crosses 180 degrees and how it is mapped."""
    w, s, e, n = aoi.bounds
    log.warning(
        "%s crosses the antimeridian (180 degrees): it is mapped as %d parts, east from %g to 180 "
        "and from -180 to %g (latitudes %g..%g)", aoi.source, len(aoi.parts), w, e, s, n,
    )
