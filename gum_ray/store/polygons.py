"""Urban-area polygons from the product: GeoParquet (1.1) or GeoJSON (RFC 7946), EPSG:4326.

A polygon is a 4-connected patch of pixels with P(urban) >= ``threshold`` (50 % by default) whose
centre lies in the AOI (the same pixels :func:`gum_ray.store.stats.urban_area` counts), traced
with ``rasterio.features.shapes`` in global pixel coordinates, so patches cut by shard edges join
exactly (integer coordinates) with one ``shapely.union_all``. Each polygon is then simplified
(Douglas-Peucker, topology kept) at ``simplify_px`` product pixels (default 1 px = 1/12000 degree,
about 9 m), moved to longitude/latitude, and kept when its geodesic area (WGS84, pyproj) is at
least ``min_area_km2`` (default 0.01 km^2 = 1 ha). Each feature carries ``id``, ``year`` and
``area_km2``.

Memory is bounded by one shard block at a time plus the polygons that touch a block's edge
(held until the end to be joined with their neighbours); polygons inside a block are written as
soon as they are found, in row groups of :data:`ROW_GROUP` features.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from gum_ray.version import __version__
from gum_ray.errors import InputError
from gum_ray.grid import AOI, PIXELS_PER_DEGREE, PRODUCT_CRS
from gum_ray.store import fs
from gum_ray.store.product import NODATA, URBAN_THRESHOLD, ProductStore

ROW_GROUP = 10_000
DEFAULT_MIN_AREA_KM2 = 0.01
DEFAULT_SIMPLIFY_PX = 1.0
FORMATS = ("geoparquet", "geojson")


@dataclass(frozen=True)
class PolygonsResult:
    path: str
    format: str
    polygons: int
    urban_km2: float  # sum of area_km2 over the written polygons
    dropped_small: int  # polygons under the minimum area


def _to_lonlat(geom: Any) -> Any:
    """Global pixel coordinates (col, row at level 0) -> longitude / latitude."""
    import shapely

    def f(xy: np.ndarray) -> np.ndarray:
        out = np.empty_like(xy)
        out[:, 0] = (xy[:, 0] - 180 * PIXELS_PER_DEGREE) / PIXELS_PER_DEGREE
        out[:, 1] = (90 * PIXELS_PER_DEGREE - xy[:, 1]) / PIXELS_PER_DEGREE
        return out

    return shapely.transform(geom, f)


def _block_polygons(product: ProductStore, year: int, rows: slice, cols: slice, geoms: list[Any] | None,
                    threshold: int) -> tuple[list[Any], list[Any]]:
    """Polygons (pixel coordinates) of one block: (inside the block, touching its edge)."""
    from affine import Affine
    from rasterio.features import geometry_mask, shapes
    from shapely.geometry import shape

    from gum_ray.grid import window_transform

    data = product.read_window(year, rows, cols)
    urban = (data >= threshold) & (data != NODATA)
    if geoms is not None and urban.any():
        urban &= ~geometry_mask(geoms, data.shape, window_transform(rows, cols), all_touched=False)
    if not urban.any():
        return [], []
    transform = Affine.translation(cols.start, rows.start)  # global pixel coordinates, exact
    inner, edge = [], []
    for geom, _ in shapes(urban.astype(np.uint8), mask=urban, connectivity=4, transform=transform):
        p = shape(geom)
        x0, y0, x1, y1 = p.bounds
        if x0 <= cols.start or y0 <= rows.start or x1 >= cols.stop or y1 >= rows.stop:
            edge.append(p)
        else:
            inner.append(p)
    return inner, edge


def urban_polygons(
    product: str | ProductStore,
    aoi: AOI,
    *,
    year: int,
    threshold: int = URBAN_THRESHOLD,
    min_area_km2: float = DEFAULT_MIN_AREA_KM2,
    simplify_px: float = DEFAULT_SIMPLIFY_PX,
    stats: dict[str, int] | None = None,
) -> Iterator[tuple[Any, float]]:
    """Yield (polygon in lon/lat, geodesic area km^2) of the urban patches of ``year`` in ``aoi``."""
    import shapely
    from pyproj import Geod

    from gum_ray.store.stats import _blocks

    p = product if isinstance(product, ProductStore) else ProductStore.open(product)
    p.year_index(year)
    if not 0 < threshold <= 100:
        raise InputError(f"threshold {threshold} %: must be within 1..100")
    if min_area_km2 < 0 or simplify_px < 0:
        raise InputError("--min-area and --simplify must not be negative")
    geoms = None if all(g.equals(g.envelope) for g in aoi.parts) else list(aoi.parts)
    geod = Geod(ellps="WGS84")
    stats = stats if stats is not None else {}
    stats.setdefault("dropped_small", 0)

    def finish(poly: Any) -> tuple[Any, float] | None:
        if simplify_px > 0:
            poly = poly.simplify(simplify_px, preserve_topology=True)
        if poly.is_empty:
            return None
        ll = shapely.geometry.polygon.orient(_to_lonlat(poly), 1.0)  # RFC 7946: exterior counter-clockwise
        area = abs(geod.geometry_area_perimeter(ll)[0]) / 1e6
        if area < min_area_km2:
            stats["dropped_small"] += 1
            return None
        return ll, area

    pending: list[Any] = []
    for rows, cols in _blocks(p, aoi, 0):
        inner, edge = _block_polygons(p, year, rows, cols, geoms, threshold)
        pending += edge
        for poly in inner:
            got = finish(poly)
            if got:
                yield got
    if pending:
        merged = shapely.union_all(pending)
        for poly in getattr(merged, "geoms", [merged]):
            got = finish(poly)
            if got:
                yield got


def _geo_metadata(bbox: list[float] | None) -> dict[str, Any]:
    col: dict[str, Any] = {
        "encoding": "WKB",
        "geometry_types": ["Polygon"],
        "crs": PRODUCT_CRS.to_json_dict(),
        "orientation": "counterclockwise",
        "edges": "planar",
        "covering": {"bbox": {"xmin": ["bbox", "xmin"], "ymin": ["bbox", "ymin"],
                              "xmax": ["bbox", "xmax"], "ymax": ["bbox", "ymax"]}},
    }
    if bbox is not None:
        col["bbox"] = bbox
    return {"version": "1.1.0", "primary_column": "geometry", "columns": {"geometry": col}}


def export_polygons(
    product: str | ProductStore,
    out: str | os.PathLike[str],
    *,
    year: int,
    aoi: AOI,
    fmt: str | None = None,
    threshold: int = URBAN_THRESHOLD,
    min_area_km2: float = DEFAULT_MIN_AREA_KM2,
    simplify_px: float = DEFAULT_SIMPLIFY_PX,
    overwrite: bool = True,
) -> PolygonsResult:
    """Write the urban polygons of ``year`` over ``aoi`` to ``out`` (GeoParquet or GeoJSON).

    ``fmt`` None picks the format from the suffix (.parquet / .geojson). The file is written to a
    temporary name and renamed (or uploaded) when complete.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    import shapely

    out = str(out)
    fmt = fmt or ("geoparquet" if out.lower().endswith((".parquet", ".geoparquet")) else
                  "geojson" if out.lower().endswith((".geojson", ".json")) else None)
    if fmt not in FORMATS:
        raise InputError(f"output {out}: name it .parquet (GeoParquet) or .geojson, or give --format")
    p = product if isinstance(product, ProductStore) else ProductStore.open(product)
    p.year_index(year)
    if not overwrite and fs.exists(out):
        raise InputError(f"output {out} exists; remove it or allow overwriting")
    meta = {"product": p.root, "year": year, "threshold_percent": threshold, "min_area_km2": min_area_km2,
            "simplify_px": simplify_px, "simplify_deg": simplify_px / PIXELS_PER_DEGREE,
            "aoi": aoi.source, "software": f"gum-ray {__version__}"}
    stats: dict[str, int] = {}
    polys = urban_polygons(p, aoi, year=year, threshold=threshold, min_area_km2=min_area_km2,
                           simplify_px=simplify_px, stats=stats)
    local = Path(out) if not fs.is_remote(out) else None
    workdir = local.parent if local is not None else Path(tempfile.gettempdir())
    workdir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".gum-polygons-", suffix=".tmp", dir=workdir)
    os.close(fd)
    n, total = 0, 0.0
    try:
        if fmt == "geoparquet":
            bbox_type = pa.struct([(k, pa.float64()) for k in ("xmin", "ymin", "xmax", "ymax")])
            schema = pa.schema(
                [("id", pa.int64()), ("year", pa.int32()), ("area_km2", pa.float64()),
                 ("bbox", bbox_type), ("geometry", pa.binary())],
                metadata={b"geo": json.dumps(_geo_metadata(None)).encode(), b"gum": json.dumps(meta).encode()},
            )
            with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
                batch: list[tuple[Any, float]] = []

                def flush() -> None:
                    geoms = [g for g, _ in batch]
                    b = shapely.bounds(np.array(geoms, dtype=object))
                    table = pa.table(
                        {
                            "id": pa.array(range(n - len(batch) + 1, n + 1), pa.int64()),
                            "year": pa.array([year] * len(batch), pa.int32()),
                            "area_km2": pa.array([a for _, a in batch], pa.float64()),
                            "bbox": pa.StructArray.from_arrays(
                                [pa.array(b[:, i]) for i in range(4)], names=["xmin", "ymin", "xmax", "ymax"]),
                            "geometry": pa.array(shapely.to_wkb(np.array(geoms, dtype=object)), pa.binary()),
                        },
                        schema=schema,
                    )
                    writer.write_table(table)
                    batch.clear()

                for geom, area in polys:
                    n += 1
                    total += area
                    batch.append((geom, area))
                    if len(batch) >= ROW_GROUP:
                        flush()
                if batch:
                    flush()
        else:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write('{"type": "FeatureCollection", "name": "gum_urban_%d", "gum": %s, "features": [\n'
                        % (year, json.dumps(meta)))
                for geom, area in polys:
                    n += 1
                    total += area
                    feat = {"type": "Feature", "id": n,
                            "properties": {"id": n, "year": year, "area_km2": round(area, 6)},
                            "geometry": json.loads(shapely.to_geojson(
                                shapely.geometry.polygon.orient(shapely.set_precision(geom, 1e-7), 1.0)))}
                    f.write(("" if n == 1 else ",\n") + json.dumps(feat, separators=(",", ":")))
                f.write("\n]}\n")
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the export is for sharing
        if local is not None:
            os.replace(tmp, local)
        else:
            fs.put_file(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return PolygonsResult(path=out, format=fmt, polygons=n, urban_km2=total,
                          dropped_small=stats.get("dropped_small", 0))
