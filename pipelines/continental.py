#!/usr/bin/env python
"""Ray job entrypoint: continental urban mapping (the same job as ``gum map``).

Submit it to a cluster (see README "Running on a Ray cluster"):

    ray dashboard cluster/gcp.yaml &      # SSH tunnel: the job server listens on the head's loopback
    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python pipelines/continental.py --aoi europe.geojson --year 2020 --source ee \\
        --checkpoint gs://my-bucket/gum/stage2.safetensors --data-dir gs://my-bucket/gum

The cluster runs Ray with token authentication (the client needs the cluster's token in
``~/.ray/auth_token`` or ``RAY_AUTH_TOKEN``); ``.gitignore`` keeps keys and checkpoints out of the
``--working-dir`` upload. The AOI is checked before anything runs (``--max-aoi-cells``), and every
model actor loads the checkpoint without running code from it (docs/security.md).

Under ``ray job submit`` the driver joins the cluster through RAY_ADDRESS; run directly, it starts a
local Ray. Running it again resumes: committed cells are skipped.
"""

from __future__ import annotations

import argparse
import sys

from gum_ray.errors import GumError


def main(argv: list[str] | None = None) -> int:
    from gum_ray import quiet

    quiet.configure(None)  # GUM_VERBOSE=1 shows third-party warnings
    from gum_ray.commands.map import add_job_arguments, job_from_args, run_job

    parser = argparse.ArgumentParser(prog="continental.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_job_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_job(job_from_args(args), ray_address=args.ray_address, quiet=args.quiet,
                       summary_json=args.summary_json)
    except GumError as exc:
        print(f"continental.py: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
