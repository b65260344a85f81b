"""``gum tiles --year Y --zoom A-B OUT``: web-map tiles (XYZ PNG, optionally PMTiles) and a viewer page."""

from __future__ import annotations

import argparse

from gum_ray.commands.export import add_product_argument
from gum_ray.grid import add_aoi_arguments, aoi_from_args


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "tiles",
        help="write web-map tiles of the product and a viewer page",
        description="Write P(urban) as web Mercator XYZ tiles (OUT/<year>/{z}/{x}/{y}.png, 256 px "
        "palette PNGs, colour ramp YlOrRd, no data transparent) over the cells the product has "
        "written, plus OUT/index.html (a Leaflet map with a year switch, a legend and a value on "
        "click). Low zooms read the overview pyramid. Tiles already there are skipped (resume).",
    )
    p.add_argument("output", help="output folder (local path or gs://)")
    p.add_argument("--year", type=int, action="append", required=True,
                   help="a year to tile (repeatable: the page gets a year switch)")
    p.add_argument("--zoom", required=True, metavar="A-B", help="zoom range, e.g. 4-14 (or one zoom)")
    add_aoi_arguments(p, bbox_help="only tiles over written cells within this area (default: all)")
    add_product_argument(p)
    p.add_argument("--workers", type=int, default=2, help="threads rendering tiles (default 2)")
    p.add_argument("--backend", choices=["auto", "threads", "ray"], default="auto",
                   help="auto (default): Ray when a run has more than 20,000 tiles, else threads")
    p.add_argument("--ray-address", default=None, help="a Ray cluster to render on (implies Ray)")
    p.add_argument("--pmtiles", action="store_true", help="also pack each year into OUT/<year>.pmtiles")
    p.add_argument("--cdn", action="store_true",
                   help="the page loads Leaflet from a CDN instead of a copy beside the tiles")
    p.add_argument("--basemap", default="osm",
                   help="basemap of the page: osm (default), none, or an XYZ URL template")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def run(args: argparse.Namespace) -> int:
    from gum_ray.store.tiles import parse_zoom_range, write_tiles
    from gum_ray.viewer import write_viewer

    zooms = parse_zoom_range(args.zoom)
    aoi = aoi_from_args(args) if (args.bbox or args.aoi) else None
    echo = (lambda m: None) if args.quiet else print
    results = write_tiles(
        args.product, args.output, years=args.year, zooms=zooms, aoi=aoi, workers=args.workers,
        backend=args.backend, ray_address=args.ray_address, pmtiles=args.pmtiles,
        progress=not args.quiet, echo=echo,
    )
    write_viewer(args.output, cdn=args.cdn, basemap=args.basemap)
    for r in results:
        rate = f", {r.tiles_per_s:,.0f} tiles/s" if r.written else ""
        pm = f"; {r.pmtiles}" if r.pmtiles else ""
        print(f"{r.year}: wrote {r.written:,} tiles, {r.skipped:,} already there "
              f"(of {r.planned:,} at zooms {r.zooms[0]}-{r.zooms[1]}) in {r.seconds:.1f} s{rate}{pm}")
    print(f"open {results[0].out}/index.html over http, e.g. "
          f"python -m http.server -d {results[0].out} 8000, then http://127.0.0.1:8000/")
    return 0
