"""Benchmark of the map outputs on full-size cells: `gum tiles`, `gum serve` tiles, polygons, COGs.

Builds a product of ``--cells`` x ``--cells`` default-size cells (0.25 degree, 3000 x 3000 px)
around the synthetic demo town (P(urban) = the synthetic ground truth, smoothed; the overview
pyramid built as `gum map` builds it), then times each output and prints a Markdown table.

    .venv/bin/python tools/bench_viewer.py --cells 2 --zoom 4-14
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=2, help="cells on a side (default 2 = 0.5 x 0.5 degree)")
    ap.add_argument("--zoom", default="4-14", help="zoom range for gum tiles (default 4-14)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--serve-tiles", type=int, default=60, help="tiles rendered one by one, as gum serve does")
    ap.add_argument("--dir", default=None, help="work folder (default: a temporary one)")
    args = ap.parse_args()

    import mercantile

    from gum_ray.grid import AOI, DEFAULT_GRID
    from gum_ray.sources.synthetic import DEMO_LONLAT
    from gum_ray.store.cogs_export import export_cogs
    from gum_ray.store.polygons import export_polygons
    from gum_ray.store.product import ProductSettings, ProductStore
    from gum_ray.store.stats import urban_area
    from gum_ray.store.tiles import TileRenderer, parse_zoom_range, write_tiles
    from tests.town import town_probability

    work = Path(args.dir or tempfile.mkdtemp(prefix="gum-bench-viewer-"))
    root = str(work / "product.zarr")
    c0 = DEFAULT_GRID.cell_at(*DEMO_LONLAT)
    cells = [DEFAULT_GRID.cell(c0.row + i, c0.col + j) for i in range(args.cells) for j in range(args.cells)]
    rows = []
    t = time.perf_counter()
    p = ProductStore.create(root, settings=ProductSettings(), years=[2021])
    for c in cells:
        p.write_cell(2021, c, town_probability(c, 2021))
    p.build_overviews(cells, years=[2021])
    rows.append(("build the test product (synthetic truth, write, overviews)", f"{len(cells)} cells", time.perf_counter() - t, ""))
    w = min(c.bounds[0] for c in cells)
    s = min(c.bounds[1] for c in cells)
    e = max(c.bounds[2] for c in cells)
    n = max(c.bounds[3] for c in cells)

    zooms = parse_zoom_range(args.zoom)
    res = write_tiles(p, str(work / "tiles"), years=[2021], zooms=zooms, workers=args.workers, backend="threads",
                      progress=False)[0]
    rows.append((f"gum tiles --zoom {args.zoom} ({args.workers} threads)", f"{res.written:,} tiles",
                 res.seconds, f"{res.tiles_per_s:,.0f} tiles/s"))
    for z in (zooms[0], zooms[1]):
        # one zoom alone, resumed from nothing
        out = work / f"tiles-z{z}"
        r = write_tiles(p, str(out), years=[2021], zooms=(z, z), workers=args.workers, backend="threads",
                        progress=False)[0]
        rows.append((f"gum tiles --zoom {z}", f"{r.written:,} tiles", r.seconds, f"{r.tiles_per_s:,.1f} tiles/s"))
    t = time.perf_counter()
    r2 = write_tiles(p, str(work / "tiles"), years=[2021], zooms=zooms, progress=False)[0]
    rows.append(("gum tiles again (resume: all there)", f"{r2.skipped:,} skipped", time.perf_counter() - t, ""))

    renderer = TileRenderer(p, 2021)
    rng = random.Random(0)
    z = min(max(zooms[1], 12), 16)
    tiles = list(mercantile.tiles(w, s, e, n, zooms=z))
    pick = rng.sample(tiles, min(args.serve_tiles, len(tiles)))
    t = time.perf_counter()
    for tt in pick:
        renderer.render_png(tt.z, tt.x, tt.y)
    dt = time.perf_counter() - t
    rows.append((f"gum serve: one zoom-{z} tile at a time (no cache)", f"{len(pick)} tiles", dt,
                 f"{1000 * dt / len(pick):.1f} ms/tile"))
    t4 = mercantile.tile(*DEMO_LONLAT, 6)
    t = time.perf_counter()
    renderer.render_png(6, t4.x, t4.y)
    rows.append(("gum serve: one zoom-6 tile (overviews)", "1 tile", time.perf_counter() - t, ""))

    aoi = AOI.from_bbox(w, s, e, n)
    t = time.perf_counter()
    pol = export_polygons(p, work / "urban.parquet", year=2021, aoi=aoi)
    dt = time.perf_counter() - t
    st = urban_area(p, aoi, years=[2021])[0]
    rows.append(("gum export --format geoparquet (whole area)", f"{pol.polygons:,} polygons", dt,
                 f"{pol.urban_km2:.2f} km2 vs gum stats {st.urban_km2:.2f} km2 "
                 f"({100 * (pol.urban_km2 / st.urban_km2 - 1):+.2f} %)"))
    t = time.perf_counter()
    cg = export_cogs(p, str(work / "gis"), year=2021, workers=args.workers)
    dt = time.perf_counter() - t
    rows.append(("gum export --cogs (COGs + VRT + STAC)", f"{cg.written} COGs", dt, f"{dt / max(cg.written, 1):.1f} s/COG"))

    print("| step | size | seconds | rate |\n|---|---|---:|---|")
    for name, size, sec, rate in rows:
        print(f"| {name} | {size} | {sec:.2f} | {rate} |")
    print(json.dumps({"work": str(work)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
