"""``gum plan``: cells (land and all), Earth Engine requests, bytes, quota time and EECU, device
time and storage of a mapping job: before running it."""

from __future__ import annotations

import argparse
import json


def add_parser(sub) -> argparse.ArgumentParser:
    from gum_ray.commands.map import add_job_arguments

    p = sub.add_parser("plan", help="estimate a mapping job (cells, requests, EECU, GPU time, storage)",
                       description="Estimate what `gum map` with the same flags will do and cost. Rates "
                       "are stated with where they come from; --calibrate takes them from a previous run.")
    add_job_arguments(p)
    p.add_argument("--rate-device", choices=("gpu", "cpu"), default="gpu",
                   help="device whose inference rate to use for the time estimate (default gpu)")
    p.add_argument("--calibrate", metavar="PRODUCT",
                   help="use the rates measured by the latest finished `gum map` run into PRODUCT "
                   "(seconds per Earth Engine request, crops/s per actor)")
    p.add_argument("--eecu-s-per-request", type=float,
                   help="EECU-seconds one request costs (from your project's EECU usage over a small run "
                   "divided by its requests); default: one EECU per request-second")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    return p


def run(args: argparse.Namespace) -> int:
    from gum_ray.commands.map import job_from_args
    from gum_ray.errors import InputError
    from gum_ray.mapping.estimate import estimate

    if args.eecu_s_per_request is not None and not args.eecu_s_per_request > 0:
        raise InputError(f"--eecu-s-per-request {args.eecu_s_per_request}: must be > 0", param="eecu_s_per_request")
    job = job_from_args(args)
    plan = estimate(job, device=args.rate_device, calibrate=args.calibrate,
                    eecu_s_per_request=args.eecu_s_per_request)
    if args.json:
        print(json.dumps(plan.as_dict(), indent=1, default=str))
        return 0
    print(f"gum plan: {job.source} source, years {', '.join(map(str, job.years))}, "
          f"{job.grid.cell_deg} degree cells, stride {job.inference.stride}")
    for line in plan.lines():
        print("  " + line)
    return 0
