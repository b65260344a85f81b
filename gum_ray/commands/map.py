"""``gum map``: the continental mapping job (the same as ``pipelines/continental.py`` on Ray)."""

from __future__ import annotations

import argparse
import sys

from gum_ray.errors import InputError


def add_job_arguments(p: argparse.ArgumentParser) -> None:
    """Flags that define a mapping job (shared by map, plan and the Ray job entrypoint)."""
    from gum_ray.commands.predict import add_inference_arguments
    from gum_ray.grid import DEFAULT_CELL_DEG, DEFAULT_CHUNK_PX, DEFAULT_HALO_PX, add_aoi_arguments
    from gum_ray.mapping.job import DEFAULT_DATA_DIR

    add_aoi_arguments(p, bbox_help="area to map")
    p.add_argument("--year", type=int, nargs="+", required=True, help="one or more calendar years")
    add_source_arguments(p)
    p.add_argument("--checkpoint", help="GUM checkpoint (.pth, GUM 1 or GUM 2.0); default for the synthetic "
                   "source: the demo model")
    from gum_ray.commands.predict import add_model_argument

    add_model_argument(p)
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR,
                   help=f"folder or gs:// prefix for product and cache (default ./{DEFAULT_DATA_DIR})")
    p.add_argument("--product", help="product Zarr path (default DATA_DIR/product.zarr)")
    p.add_argument("--cache", help="imagery cache path (default DATA_DIR/imagery-cache)")
    p.add_argument("--keep-cache", action="store_true",
                   help="keep each cell's cached imagery after it is committed (to map it again with "
                   "another model or settings without fetching); default: delete it once committed")
    p.add_argument("--cell-deg", type=float, default=DEFAULT_CELL_DEG, help="cell (shard) size in degrees")
    p.add_argument("--chunk-px", type=int, default=DEFAULT_CHUNK_PX, help="inner chunk size in px")
    p.add_argument("--halo", type=int, default=DEFAULT_HALO_PX, help="context around each cell in 10 m px")
    p.add_argument("--max-attempts", type=int, default=3, help="tries per cell before it is set aside")
    p.add_argument("--infer-actors", type=int, help="model actors (default: one per GPU, else one)")
    p.add_argument("--actor-threads", type=int, default=None,
                   help="CPUs per model actor: its torch threads, and beside a GPU its cache reader threads "
                        "(default: 1 on a CPU; beside a GPU 4, at most the cluster's CPUs per GPU less one)")
    p.add_argument("--fetch-concurrency", type=int, default=2, help="cells fetched at once")
    p.add_argument("--write-concurrency", type=int, default=2, help="cells written at once")
    p.add_argument("--cells-per-call", type=int, default=None,
                   help="cells a model actor predicts per call, their crops batched together (default: "
                        "4 on GPU actors, 1 on CPU actors)")
    p.add_argument("--lease-ttl", type=float, default=60.0,
                   help="seconds after which a dead run's lease on the product expires")
    p.add_argument("--ray-address", help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--no-preview", action="store_true", help="skip the quick-look PNG at the end")
    p.add_argument("--max-cells", type=int, help="map at most this many cells now (run again to go on)")
    from gum_ray.aoi import DEFAULT_MAX_AOI_CELLS

    p.add_argument("--max-aoi-cells", type=int, default=DEFAULT_MAX_AOI_CELLS,
                   help=f"refuse an AOI that covers more cells than this (default {DEFAULT_MAX_AOI_CELLS:,}: "
                        "catches typos and swapped coordinates; 0 = no cap)")
    p.add_argument("--summary-json", help="also write the run's summary as JSON to this file")
    p.add_argument("--quiet", action="store_true", help="no live progress line")
    add_inference_arguments(p)


def add_source_arguments(p: argparse.ArgumentParser) -> None:
    """``--source``, ``--source-option KEY=VALUE`` and ``--products`` (map, plan, patches)."""
    p.add_argument("--source", default="synthetic", choices=("synthetic", "ee", "geotiff"),
                   help="imagery: synthetic (offline world, default), ee (Earth Engine), geotiff")
    p.add_argument("--source-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option for the source, e.g. path=exports/ (geotiff), project=my-proj, "
                        "url=http://127.0.0.1:8765 (ee); repeatable")
    p.add_argument("--products", action="store_true", help="fetch the 3 built-up products (13-channel model)")


def source_options(items: list[str], products: bool) -> tuple[tuple[str, object], ...]:
    """``--source-option`` items (and ``--products``) as the sorted option pairs of a job."""
    opts: dict[str, object] = {}
    for item in items:
        if "=" not in item:
            raise InputError(f"--source-option {item!r}: write KEY=VALUE, e.g. path=exports/")
        k, v = item.split("=", 1)
        opts[k.strip()] = v
    if products:
        opts["with_products"] = True
    return tuple(sorted(opts.items()))


def job_from_args(args: argparse.Namespace):
    from gum_ray.commands.predict import settings_from_args
    from gum_ray.grid import ProductGrid, aoi_from_args
    from gum_ray.mapping.job import MapJob, default_paths

    if args.bbox is None and args.aoi is None:
        raise InputError("give the area to map: --bbox W S E N, or --aoi AREA.geojson")
    product, cache = default_paths(args.data_dir)
    return MapJob(
        aoi=aoi_from_args(args),
        years=tuple(args.year),
        product=args.product or product,
        cache=args.cache or cache,
        source=args.source,
        source_options=source_options(args.source_option, args.products),
        checkpoint=args.checkpoint,
        model=args.model,
        inference=settings_from_args(args),
        grid=ProductGrid(cell_deg=args.cell_deg, chunk_px=args.chunk_px),
        halo_px=args.halo,
        max_attempts=args.max_attempts,
        infer_actors=args.infer_actors,
        threads_per_actor=args.actor_threads,
        fetch_concurrency=args.fetch_concurrency,
        write_concurrency=args.write_concurrency,
        cells_per_call=args.cells_per_call,
        lease_ttl_s=args.lease_ttl,
        preview=not args.no_preview,
        max_cells=args.max_cells,
        max_aoi_cells=getattr(args, "max_aoi_cells", None),
        keep_cache=bool(getattr(args, "keep_cache", False)),
    )


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "map", help="map an AOI for one or more years into the global product (on Ray)",
        description="Fetch imagery, predict and write the global Zarr product for an AOI, on Ray "
        "(local by default). Resumes: committed cells are skipped.")
    add_job_arguments(p)
    return p


def run(args: argparse.Namespace) -> int:
    return run_job(job_from_args(args), ray_address=args.ray_address, quiet=args.quiet,
                   summary_json=args.summary_json)


def run_job(job, *, ray_address: str | None, quiet: bool = False, summary_json: str | None = None) -> int:
    import json

    from gum_ray.mapping.runner import iter_summary_lines, run_map

    summary = run_map(job, ray_address=ray_address, live=False if quiet else None)
    if summary_json:
        with open(summary_json, "w") as f:
            json.dump(summary.as_dict(), f, indent=1)
    for line in iter_summary_lines(summary, job):
        print(line, file=sys.stderr)
    preview = None
    if job.preview and (summary.done or summary.skipped) and "://" not in job.product:
        from pathlib import Path

        from gum_ray.store.preview import render_preview

        for year in job.years:  # beside a local product; for gs:// use `gum preview`
            preview = Path(job.product).parent / f"preview_{year}.png"
            render_preview(job.product, preview, year=year, aoi=job.aoi)
    w, s, e, n = job.aoi.bounds
    print(f"product: {job.product}", file=sys.stderr)
    if preview:
        print(f"quick-look: {preview}", file=sys.stderr)
    y = job.years[-1]
    print("read it:\n"
          f"  python -c \"import gum_ray; print(gum_ray.open_product('{job.product}'))\"\n"
          f"  gum stats --product {job.product} --bbox {w} {s} {e} {n}\n"
          f"  gum export --product {job.product} --bbox {w} {s} {e} {n} --year {y} urban_{y}.tif",
          file=sys.stderr)
    return 0 if summary.set_aside == 0 else 3
