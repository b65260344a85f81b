"""``gum serve PRODUCT``: the viewer page with tiles rendered on the fly (a quick look, no files written)."""

from __future__ import annotations

import argparse


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "serve",
        help="serve a map of the product in the browser (tiles rendered on the fly)",
        description="Serve the viewer page of `gum tiles` with tiles rendered from the product "
        "(a local folder or gs://) as they are asked for; a click shows P(urban) and input quality "
        "from full resolution. Binds to 127.0.0.1 unless --host says otherwise.",
    )
    p.add_argument("product", help="the product: a local folder or gs://bucket/path")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    p.add_argument("--year", type=int, action="append", help="a year to show (repeatable; default all)")
    p.add_argument("--max-zoom", type=int, default=18, help="deepest zoom served (default 18)")
    p.add_argument("--basemap", default="osm", help="osm (default), none, or an XYZ URL template")
    return p


def run(args: argparse.Namespace) -> int:
    from gum_ray.viewer.server import ProductViewer, ViewerServer

    viewer = ProductViewer(args.product, years=args.year, max_zoom=args.max_zoom, basemap=args.basemap)
    server = ViewerServer(viewer, args.host, args.port)
    for year, r in sorted(viewer.renderers.items()):
        missing = r.missing_overviews(range(1, r.levels + 1))
        if missing:
            print(f"note: {year}: the overviews are not built over {len(missing)} shard(s); zoomed out "
                  f"(overview level {min(m[0] for m in missing)} and up) the map is empty there", flush=True)
    years = ", ".join(map(str, sorted(viewer.renderers)))
    print(f"serving {viewer.product.root} ({years}) at {server.url}  (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("gum serve: stopped", flush=True)
    finally:
        server.httpd.server_close()
    return 0
