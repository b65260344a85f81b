"""``gum status PRODUCT``: done / set aside / remaining per year, with the errors of set-aside cells."""

from __future__ import annotations

import argparse
import json


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("status", help="progress of the mapping runs of a product",
                       description="Per year: cells done, set aside (with their last error), retrying, "
                       "and remaining of the AOI of the latest run.")
    p.add_argument("product", help="the product (local folder or gs://...)")
    p.add_argument("--json", action="store_true", help="print JSON")
    return p


def run(args: argparse.Namespace) -> int:
    from gum_ray.grid import AOI, cells_for_aoi
    from gum_ray.store import fs
    from gum_ray.store.manifest import Manifest
    from gum_ray.store.product import ProductStore

    product = ProductStore.open(args.product)
    manifest = Manifest(product.root, product.grid)
    runs_dir = fs.join(product.root, "_manifest", "runs")
    runs = sorted(fs.list_names(runs_dir)) if fs.exists(runs_dir) else []
    latest = None
    if runs:
        recs = [json.loads(fs.read_bytes(fs.join(runs_dir, r))) for r in runs]
        latest = max(recs, key=lambda r: r.get("started", ""))
    cells = None
    max_attempts = 3
    if latest:
        cells = cells_for_aoi(AOI.from_geojson(latest["aoi"]), product.grid)
        max_attempts = int(latest.get("max_attempts", 3))
    report = {}
    for year in product.years:
        st = manifest.status(year, cells, max_attempts=max_attempts)
        aside = manifest.set_aside_errors(year, max_attempts)  # one listing, a read per set-aside cell
        stale = manifest.stale_overviews(year, product.settings.overview_levels)
        st["overview_shards_missing"] = {lv: len(sh) for lv, sh in stale.items() if sh}
        report[year] = {**st, "errors": aside}
    cache = None
    if latest and latest.get("cache") and latest.get("cache_key"):  # the latest run's imagery cache
        path = fs.join(fs.normalize(latest["cache"]), latest["cache_key"])
        objects, nbytes = fs.du(path)
        cache = {"path": path, "objects": objects, "bytes": nbytes, "keep_cache": bool(latest.get("keep_cache"))}
    if args.json:
        print(json.dumps({"product": product.root, "latest_run": latest and latest["run_id"],
                          "years": report, "cache": cache}, indent=1))
        return 0
    print(f"{product.root}" + (f" (latest run {latest['run_id']}, started {latest['started']})" if latest else ""))
    if cache is not None:
        policy = "kept" if cache["keep_cache"] else "entries deleted once their cell is committed"
        print(f"  imagery cache {cache['path']}: {cache['bytes'] / 1e6:,.1f} MB in {cache['objects']} objects ({policy})")
    for year, st in report.items():
        rem = f", {st['pending']} remaining of {st['total']}" if "pending" in st else ""
        print(f"  {year}: {st['done']} done, {st['set_aside']} set aside, {st['retrying']} retrying{rem}")
        if st["overview_shards_missing"]:
            levels = ", ".join(f"level {lv}: {n}" for lv, n in st["overview_shards_missing"].items())
            print(f"    overview shards missing or stale ({levels}); run the job again to build them")
        for cid, err in sorted(st["errors"].items()):
            print(f"    set aside {cid}: {err}")
    return 0
