"""``gum export --bbox W S E N --year Y OUT.tif``: a Cloud Optimized GeoTIFF of any area of the product."""

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
        help="export an area of the product as a Cloud Optimized GeoTIFF",
        description="Export P(urban) of one year over a bbox or GeoJSON AOI as a COG (uint8 percent, "
        "255 = no data, 512 px blocks, ZSTD, internal overviews, EPSG:4326 on the product grid). "
        "GDAL before 3.13 cannot read sharded Zarr: this is what GIS users open.",
    )
    p.add_argument("output", help="output .tif (local path or gs://)")
    p.add_argument("--year", type=int, required=True, help="the year to export")
    add_aoi_arguments(p, bbox_help="area to export")
    add_product_argument(p)
    p.add_argument("--level", type=int, default=0, help="pyramid level: 0 = full resolution (default)")
    p.add_argument("--no-overwrite", action="store_true", help="fail if the output exists")
    return p


def run(args: argparse.Namespace) -> int:
    from gum_ray.store.cog import export_cog

    aoi = aoi_from_args(args)
    res = export_cog(
        args.product, args.output, year=args.year, aoi=aoi, level=args.level, overwrite=not args.no_overwrite
    )
    print(
        f"wrote {res.path}: {res.width} x {res.height} px, level {res.level}, "
        f"{res.valid_px:,} px with data"
    )
    return 0
