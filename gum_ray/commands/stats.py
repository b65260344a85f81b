"""``gum stats --aoi AOI.geojson``: urban km^2 per year over an area, with geodesic pixel areas."""

from __future__ import annotations

import argparse
import json
import math

from gum_ray.commands.export import add_product_argument
from gum_ray.grid import add_aoi_arguments, aoi_from_args


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "stats",
        help="urban area (km2) per year over an AOI",
        description="Sum the geodesic (WGS84) area of pixels with P(urban) >= the threshold inside "
        "the AOI (pixel-centre rule), per year. Also prints the mapped area (pixels with data) and "
        "the AOI's area on the grid.",
    )
    add_aoi_arguments(p, bbox_help="area to sum over")
    add_product_argument(p)
    p.add_argument("--year", type=int, action="append", help="a year (repeatable; default all years)")
    p.add_argument("--level", type=int, default=0,
                   help="pyramid level: 0 = full resolution (default); higher = faster, approximate")
    p.add_argument("--threshold", type=int, default=50, help="urban when P(urban) >= this %% (default 50)")
    p.add_argument("--workers", type=int, default=2, help="threads reading shards (default 2)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def run(args: argparse.Namespace) -> int:
    from gum_ray.store.stats import urban_area

    aoi = aoi_from_args(args)
    rows = urban_area(
        args.product, aoi, years=args.year, level=args.level, threshold=args.threshold,
        max_workers=args.workers,
    )
    if args.json:
        print(json.dumps({"aoi": aoi.source, "threshold": args.threshold, "level": args.level,
                          "years": [r.to_dict() for r in rows]}, indent=1))
        return 0
    print(f"AOI {aoi.source}: urban = P(urban) >= {args.threshold} %, level {args.level}")
    print(f"{'year':>6} {'urban km2':>14} {'mapped km2':>14} {'AOI km2':>14} {'urban %':>8} {'mean P %':>8}")
    for r in rows:
        share = "-" if math.isnan(r.urban_share) else f"{100 * r.urban_share:.2f}"
        mean = "-" if math.isnan(r.mean_probability) else f"{r.mean_probability:.1f}"
        print(f"{r.year:>6} {r.urban_km2:>14,.3f} {r.mapped_km2:>14,.3f} {r.aoi_km2:>14,.3f} {share:>8} {mean:>8}")
    return 0
