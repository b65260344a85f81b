"""The scenarios of issue 12 on the loopback multi-node harness (:mod:`tests.multinode`), shared by
tests/test_cluster_multinode.py and tools/cluster_trials.py (which runs the ten kill trials and
prints the table in docs/cluster.md).

World: the synthetic source, eight 0.01-degree cells of the demo town, the demo model uploaded to
fake-gcs-server as ``gs://BUCKET/gum.pth``; product and imagery cache on gs:// too.
"""

from __future__ import annotations

import random
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers import REPO

BBOX = (8.57, 47.37, 8.61, 47.39)  # 8 cells of 0.01 degree
N_CELLS = 8
YEAR = 2020


def job_args(data_dir: str, checkpoint: str, bbox=BBOX) -> list[str]:
    return ["--bbox", *map(str, bbox), "--year", str(YEAR), "--checkpoint", checkpoint,
            "--data-dir", data_dir, "--cell-deg", "0.01", "--chunk-px", "40", "--halo", "64",
            "--quiet", "--no-preview", "--lease-ttl", "30"]


def product_files(root: str) -> dict[str, bytes]:
    """Every object of a product but its manifest (markers hold times and hosts): the bytes that
    must be identical, level 0 and overviews."""
    from gum_ray.store import fs

    out = {rel: fs.read_bytes(fs.join(root, rel)) for rel in fs.find(root)
           if not rel.startswith("_manifest")}
    if "zarr.json" in out:  # the product's creation time is provenance, not content
        import json

        meta = json.loads(out["zarr.json"])
        attrs = meta.get("attributes", {})
        attrs.pop("history", None)
        attrs.get("gum_product", {}).pop("created", None)
        out["zarr.json"] = json.dumps(meta, sort_keys=True).encode()
    return out


def demo_checkpoint() -> Path:
    from gum_ray.demo_model import ensure_demo_model

    return ensure_demo_model()


def reference_run(out_dir: Path, checkpoint: Path, bbox=BBOX) -> dict[str, bytes]:
    """A single-node run (a local Ray, local disk) of the same job: the bytes to match."""
    product = out_dir / "product.zarr"
    if not (product / "zarr.json").exists():
        r = subprocess.run([sys.executable, "-m", "gum_ray.cli", "map",
                            *job_args(str(out_dir), str(checkpoint), bbox)],
                           capture_output=True, text=True, timeout=1200)
        if r.returncode != 0:
            raise RuntimeError(f"reference run failed: {r.stderr[-3000:]}")
    return product_files(str(product))


def markers(product: str) -> int:
    from gum_ray.store.manifest import Manifest

    return len(Manifest(product).done(YEAR))


def kill_trial(cluster, data_dir: str, checkpoint: str, rng: random.Random, env_vars: dict[str, str],
               timeout_s: float = 900, victim: str = "random") -> dict:
    """Submit the job; once a random number of cells (0 .. N-3) is committed and a random pause
    more, SIGKILL a worker node (``victim``: a random one, or ``"actor"``: the one running the model
    actor); add a node back; wait for the job. Returns what happened."""
    from gum_ray.mapping.lease import lease_path
    from gum_ray.store import fs

    product = data_dir + "/product.zarr"
    entry = [sys.executable, str(REPO / "pipelines" / "continental.py"), *job_args(data_dir, checkpoint)]
    t0 = time.time()
    proc = cluster.submit(entry, env_vars=env_vars, wait=False, cwd="/tmp")
    kill_after = rng.randint(0, N_CELLS - 3)  # cells committed before the kill; then a short pause
    pause = rng.uniform(0.0, 1.0)
    out: dict = {"kill_after_cells": kill_after, "pause_s": round(pause, 2)}
    try:
        while time.time() - t0 < timeout_s and proc.poll() is None:
            if fs.exists(lease_path(product)) and markers(product) >= kill_after:
                break
            time.sleep(0.3)
        time.sleep(pause)
        out["cells_at_kill"] = markers(product) if fs.exists(lease_path(product)) else 0
        out["job_running_at_kill"] = proc.poll() is None
        name = rng.choice(sorted(cluster.workers))  # drawn in either case: one random stream
        if victim == "actor":
            name = cluster.node_running("CellPredictor") or name
        out["actor_node"] = cluster.node_running("CellPredictor")
        victim = name
        out["killed"] = victim
        out["killed_processes"] = cluster.kill_node(victim)
        out["kill_s"] = round(time.time() - t0, 1)
        time.sleep(2.0)
        out["added"] = cluster.add_worker()
        log, _ = proc.communicate(timeout=max(60, timeout_s - (time.time() - t0)))
    finally:
        if proc.poll() is None:
            proc.kill()
    out["rc"] = proc.returncode
    out["wall_s"] = round(time.time() - t0, 1)
    out["log_tail"] = log[-2500:]
    return out


def summary_numbers(log: str) -> dict:
    import re

    m = re.search(r"(\d+) cells mapped, (\d+) already done \(skipped\), (\d+) set aside, (\d+) retried", log)
    c = re.search(r"(\d+) tries lost to the cluster .*?, (\d+) model actors replaced", log)
    return {"mapped": int(m[1]) if m else None, "set_aside": int(m[3]) if m else None,
            "retried": int(m[4]) if m else None,
            "cluster_retries": int(c[1]) if c else 0, "actors_replaced": int(c[2]) if c else 0}
