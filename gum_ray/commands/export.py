"""``gum export --bbox W S E N --year Y OUT.tif``: a Cloud Optimized GeoTIFF of any area of the product.

Also ``--format geoparquet|geojson`` (urban-area polygons, :mod:`gum_ray.store.polygons`) and
``--cogs OUT/`` (one COG per written cell, a GDAL VRT and a STAC collection over them,
:mod:`gum_ray.store.cogs_export`).
"""

from __future__ import annotations

import argparse
import os

from gum_ray.grid import add_aoi_arguments, aoi_from_args


def add_product_argument(p: argparse.ArgumentParser) -> None:
    """``--product PATH`` (default ``$GUM_PRODUCT``, else the default local product folder)."""
    from gum_ray.store.product import DEFAULT_PRODUCT_PATH

    p.add_argument(
        "--product",
        default=os.environ.get("GUM_PRODUCT", DEFAULT_PRODUCT_PATH),
        help="the product: a local folder or gs://bucket/path (default $GUM_PRODUCT, else "
        f"{DEFAULT_PRODUCT_PATH})",
    )


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "export",
        help="export an area of the product as a COG, urban polygons (GeoParquet/GeoJSON), or COGs + VRT + STAC",
        description="Export P(urban) of one year over a bbox or GeoJSON AOI as a COG (uint8 percent, "
        "255 = no data, 512 px blocks, ZSTD, internal overviews, EPSG:4326 on the product grid). "
        "GDAL before 3.13 cannot read sharded Zarr: this is what GIS users open. With --format "
        "geoparquet|geojson (or a .parquet / .geojson output): urban-area polygons. With --cogs: one COG "
        "per written cell, a GDAL VRT over them and a STAC collection (see docs/viewer.md).",
    )
    p.add_argument("output", help="output .tif, .parquet or .geojson (local path or gs://); a folder with --cogs")
    p.add_argument("--year", type=int, required=True, help="the year to export")
    add_aoi_arguments(p, bbox_help="area to export")
    add_product_argument(p)
    p.add_argument("--level", type=int, default=0, help="pyramid level: 0 = full resolution (default)")
    p.add_argument("--no-overwrite", action="store_true", help="fail if the output exists")
    p.add_argument("--format", choices=["cog", "geoparquet", "geojson"], default=None,
                   help="cog (a GeoTIFF), or urban-area polygons as geoparquet / geojson "
                   "(default: from the output's suffix)")
    p.add_argument("--threshold", type=int, default=50,
                   help="polygons: urban when P(urban) >= this %% (default 50)")
    p.add_argument("--min-area", type=float, default=0.01, metavar="KM2",
                   help="polygons: drop polygons smaller than this many km2 (default 0.01 = 1 ha)")
    p.add_argument("--simplify", type=float, default=1.0, metavar="PX",
                   help="polygons: simplification tolerance in product pixels of 1/12000 degree "
                   "(default 1 = about 9 m; 0 = exact pixel edges)")
    p.add_argument("--cogs", action="store_true",
                   help="OUTPUT is a folder: one COG per written cell of the year (within the bbox, "
                   "if given), a GDAL VRT over them and a STAC collection")
    p.add_argument("--workers", type=int, default=2, help="--cogs: COGs written at once (default 2)")
    return p


def run(args: argparse.Namespace) -> int:
    from gum_ray.store.cog import export_cog

    if args.cogs:
        return _run_cogs(args)
    fmt = args.format
    if fmt is None and args.output.lower().endswith((".parquet", ".geoparquet", ".geojson", ".json")):
        fmt = "geojson" if args.output.lower().endswith((".geojson", ".json")) else "geoparquet"
    if fmt in ("geoparquet", "geojson"):
        return _run_polygons(args, fmt)
    aoi = aoi_from_args(args)
    res = export_cog(
        args.product, args.output, year=args.year, aoi=aoi, level=args.level, overwrite=not args.no_overwrite
    )
    print(
        f"wrote {res.path}: {res.width} x {res.height} px, level {res.level}, "
        f"{res.valid_px:,} px with data"
        + (f"; input quality: {res.quality_path}" if res.quality_path else "")
    )
    return 0


def _run_polygons(args: argparse.Namespace, fmt: str) -> int:
    from gum_ray.store.polygons import export_polygons

    res = export_polygons(
        args.product, args.output, year=args.year, aoi=aoi_from_args(args), fmt=fmt,
        threshold=args.threshold, min_area_km2=args.min_area, simplify_px=args.simplify,
        overwrite=not args.no_overwrite,
    )
    print(f"wrote {res.path}: {res.polygons:,} urban polygons (P >= {args.threshold} %), "
          f"{res.urban_km2:,.3f} km2; {res.dropped_small:,} under {args.min_area:g} km2 dropped")
    return 0


def _run_cogs(args: argparse.Namespace) -> int:
    from gum_ray.store.cogs_export import export_cogs

    aoi = aoi_from_args(args) if (args.bbox or args.aoi) else None
    res = export_cogs(args.product, args.output, year=args.year, aoi=aoi, workers=args.workers)
    print(f"wrote {res.written:,} COGs ({res.skipped:,} already there) of {res.cells:,} written cells, "
          f"{res.vrt} and {res.collection}")
    return 0
