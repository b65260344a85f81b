"""``gum preview --bbox W S E N --year Y OUT.png``: a quick-look map of the product."""

from __future__ import annotations

import argparse

from gum_ray.commands.export import add_product_argument
from gum_ray.grid import add_aoi_arguments, aoi_from_args


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "preview",
        help="render a quick-look PNG map of an area",
        description="Render P(urban) of one year over an AOI as a PNG: colour ramp with legend, "
        "no data in grey, scale bar, longitude/latitude axes. Uses the pyramid when it is built.",
    )
    p.add_argument("output", help="output .png (local path or gs://)")
    p.add_argument("--year", type=int, required=True, help="the year to show")
    add_aoi_arguments(p, bbox_help="area to show")
    add_product_argument(p)
    p.add_argument("--level", type=int, default=None, help="pyramid level (default: chosen from --max-px)")
    p.add_argument("--max-px", type=int, default=1200, help="about this many pixels across (default 1200)")
    return p


def run(args: argparse.Namespace) -> int:
    from gum_ray.store.preview import render_preview

    res = render_preview(
        args.product, args.output, year=args.year, aoi=aoi_from_args(args), level=args.level,
        max_px=args.max_px,
    )
    extra = f", x{res.factor} mean" if res.factor > 1 else ""
    print(f"wrote {res.path}: {res.shape[1]} x {res.shape[0]} px from level {res.level}{extra}")
    return 0
