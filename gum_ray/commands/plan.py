"""``gum plan``: cells, pixels, Earth Engine requests and bytes, device time, storage: before running."""

from __future__ import annotations

import argparse


def add_parser(sub) -> argparse.ArgumentParser:
    from gum_ray.commands.map import add_job_arguments

    p = sub.add_parser("plan", help="estimate a mapping job (cells, requests, bytes, GPU time)",
                       description="Estimate what `gum map` with the same flags will do and cost.")
    add_job_arguments(p)
    p.add_argument("--rate-device", choices=("gpu", "cpu"), default="gpu",
                   help="device whose inference rate to use for the time estimate (default gpu)")
    return p


def run(args: argparse.Namespace) -> int:
    from gum_ray.commands.map import job_from_args
    from gum_ray.mapping.estimate import estimate

    job = job_from_args(args)
    plan = estimate(job, device=args.rate_device)
    print(f"gum plan: {job.source} source, years {', '.join(map(str, job.years))}, "
          f"{job.grid.cell_deg} degree cells, stride {job.inference.stride}")
    for line in plan.lines():
        print("  " + line)
    return 0
