"""``gum patches --points POINTS.geojson --year Y --out PATCHES``: patches and pseudo-labels per point."""

from __future__ import annotations

import argparse
import sys

from gum_ray.errors import InputError


def add_parser(sub) -> argparse.ArgumentParser:
    from gum_ray.commands.map import add_source_arguments
    from gum_ray.commands.predict import add_inference_arguments, add_model_argument
    from gum_ray.patches import DEFAULT_MIN_VALID

    p = sub.add_parser(
        "patches",
        help="cut a 256 x 256 patch around each point and label it with the model (pseudo-labels)",
        description="For each Point of a GeoJSON file: a 256 x 256 patch at 10 m in the point's UTM zone, "
        "centred on it, with the imagery of a year from any source and the model's P(urban) and class "
        "(the pseudo-label), in a Zarr dataset (one group per point) plus one GeoTIFF per patch under "
        "OUT/geotiff/. Resumable: a rerun skips finished points. Points without imagery are reported "
        "and skipped.",
    )
    p.add_argument("--points", required=True, help="GeoJSON FeatureCollection of Points (lon/lat); "
                   "ids from the feature 'id' or properties.id, else the feature's index")
    p.add_argument("--year", type=int, required=True, help="calendar year of the imagery")
    p.add_argument("--out", required=True, help="the patches dataset: a folder (or gs://bucket/path)")
    add_source_arguments(p)
    p.add_argument("--checkpoint",
                   help="GUM checkpoint (.pth) that makes the pseudo-labels; 'demo' = the demo model "
                        "(the default for the synthetic source)")
    add_model_argument(p)
    p.add_argument("--no-labels", action="store_true",
                   help="imagery only, no model: patches for your own labels (PatchDataset.set_label)")
    p.add_argument("--min-valid", type=float, default=DEFAULT_MIN_VALID,
                   help=f"skip a point when less than this share of its patch has Sentinel-2 data "
                        f"(default {DEFAULT_MIN_VALID})")
    p.add_argument("--no-geotiff", action="store_true", help="do not write OUT/geotiff/<id>.tif")
    g = p.add_argument_group("parallelism")
    g.add_argument("--workers", type=int, default=2,
                   help="points processed at once (a local thread pool; default 2; 1 = one by one)")
    g.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                   help="run the points as Ray tasks on the cluster at ADDRESS (e.g. ray://head:10001, "
                        "'auto' = the running local cluster); without ADDRESS: RAY_ADDRESS, else a new "
                        "local Ray")
    p.add_argument("--quiet", action="store_true", help="no line per point")
    add_inference_arguments(p)
    return p


def run(args: argparse.Namespace) -> int:
    from gum_ray.commands.map import source_options
    from gum_ray.commands.predict import settings_from_args
    from gum_ray.mapping.limits import limiter_for
    from gum_ray.patches import PatchJob, read_points, run_patches

    points = read_points(args.points)
    if args.workers < 1:
        raise InputError(f"--workers {args.workers}: must be at least 1")
    job = PatchJob(
        points=tuple(points), year=args.year, out=args.out, source=args.source,
        source_options=source_options(args.source_option, args.products),
        checkpoint=args.checkpoint, model=args.model, inference=settings_from_args(args), min_valid=args.min_valid,
        geotiff=not args.no_geotiff, labels=not args.no_labels,
    )
    if args.no_labels and args.checkpoint:
        raise InputError("--no-labels makes imagery-only patches; drop --checkpoint (or --no-labels)")
    n = len(points)
    count = 0

    def progress(o) -> None:
        nonlocal count
        count += 1
        if args.quiet:
            return
        what = {"complete": "written", "done_before": "done before, skipped",
                "no_imagery": f"no imagery, skipped: {o.message}", "failed": f"FAILED: {o.message}"}[o.status]
        print(f"[{count}/{n}] {o.id}: {what}", file=sys.stderr)

    if args.ray is not None:
        report = run_patches(job, executor="ray", ray_address=args.ray or None, progress=progress,
                             limiter_for=limiter_for)
    else:
        report = run_patches(job, executor="local", workers=args.workers, progress=progress,
                             limiter_for=limiter_for)
    parts = [f"{report.written} written", f"{report.done_before} done before"]
    if report.no_imagery:
        parts.append(f"{len(report.no_imagery)} without imagery (skipped: "
                     + ", ".join(o.id for o in report.no_imagery[:10])
                     + (", ..." if len(report.no_imagery) > 10 else "") + ")")
    if report.failed:
        parts.append(f"{len(report.failed)} failed (rerun to retry: "
                     + ", ".join(o.id for o in report.failed[:10]) + ")")
    print(f"gum patches: {n} points: " + ", ".join(parts) + f"; {report.seconds:.1f} s", file=sys.stderr)
    print(f"patches: {report.out}", file=sys.stderr)
    return 2 if report.failed else 0
