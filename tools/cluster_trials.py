#!/usr/bin/env python
"""Issue 12's "must show" on the loopback multi-node harness: N trials of a run with a worker node
killed (SIGKILL of its raylet, workers and agents) at a random moment and a node added back, each
product compared byte for byte with a single-node run; then a run under injected GCS faults.

    .venv/bin/python tools/cluster_trials.py --trials 10 [--seed 12] [--fault-rate 0.1]

Prints one markdown table row per trial (docs/cluster.md holds the recorded table).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--seed", type=int, default=12)
    ap.add_argument("--fault-rate", type=float, default=0.1)
    ap.add_argument("--head-cpus", type=int, default=0,
                    help="CPUs of the head node (0: every task and model actor runs on the workers, "
                         "so a killed node takes the model actor or tasks with it)")
    ap.add_argument("--victim", choices=("random", "actor", "alternate"), default="random",
                    help="the worker node killed: a random one, the model actor's, or alternately")
    ap.add_argument("--no-faults-run", action="store_true", help="skip the injected-fault run")
    ap.add_argument("--json", help="write every trial's record here")
    ap.add_argument("--reference-dir", default=os.path.join(tempfile.gettempdir(), "gum-trials-reference"),
                    help="the single-node reference run (made once, reused)")
    args = ap.parse_args()

    from gum_ray.store import fs
    from tests import cluster_scenarios as sc
    from tests.faultproxy import FaultProxy
    from tests.gcs import FakeGCS
    from tests.multinode import LoopbackCluster

    rng = random.Random(args.seed)
    ckpt = sc.demo_checkpoint()
    t = time.time()
    ref = sc.reference_run(Path(args.reference_dir), ckpt)
    print(f"reference (single node, local Ray): {len(ref)} objects, {time.time() - t:.0f} s", flush=True)
    records = []
    with FakeGCS() as gcs, FaultProxy(gcs.url, rate=0.0, seed=args.seed) as proxy:
        os.environ["STORAGE_EMULATOR_HOST"] = gcs.url
        gcs.create_bucket("gum")
        fs.write_bytes("gs://gum/gum.pth", ckpt.read_bytes())
        env = {"STORAGE_EMULATOR_HOST": proxy.url}
        with LoopbackCluster(workers=2, num_cpus=1, env=env, head_cpus=args.head_cpus) as cluster:
            print("| trial | killed | cells committed at kill | cluster retries | actors replaced | "
                  "cells set aside | wall s | product identical |", flush=True)
            print("|---|---|---|---|---|---|---|---|", flush=True)
            for k in range(1, args.trials + 1):
                data = f"gs://gum/trial-{k}"
                victim = args.victim if args.victim != "alternate" else ("actor" if k % 2 else "random")
                rec = sc.kill_trial(cluster, data, "gs://gum/gum.pth", rng, env, victim=victim)
                got = sc.product_files(data + "/product.zarr") if rec["rc"] == 0 else {}
                rec["identical"] = got == ref
                rec["missing_or_different"] = sorted(
                    key for key in set(ref) | set(got) if ref.get(key) != got.get(key))[:10]
                rec.update(sc.summary_numbers(rec["log_tail"]))
                records.append(rec)
                actor = " (the model actor's)" if rec["killed"] == rec.get("actor_node") else ""
                print(f"| {k} | {rec['killed']}{actor} ({rec['killed_processes']} processes, "
                      f"{rec['kill_s']} s in) | {rec['cells_at_kill']} of {sc.N_CELLS} | "
                      f"{rec['cluster_retries']} | {rec['actors_replaced']} | {rec['set_aside']} | "
                      f"{rec['wall_s']} | {'yes' if rec['identical'] else 'NO'} (rc {rec['rc']}) |",
                      flush=True)
                if not rec["identical"]:
                    print(rec["log_tail"], file=sys.stderr)
            if not args.no_faults_run:
                proxy.rate = args.fault_rate
                proxy.stats.clear()
                data = "gs://gum/faults"
                t = time.time()
                r = cluster.submit([sys.executable, str(sc.REPO / "pipelines" / "continental.py"),
                                    *sc.job_args(data, "gs://gum/gum.pth")], env_vars=env, cwd="/tmp")
                proxy.rate = 0.0
                got = sc.product_files(data + "/product.zarr") if r.returncode == 0 else {}
                bad = sorted(key for key in set(ref) | set(got) if ref.get(key) != got.get(key))
                rec = {"fault_run": True, "rc": r.returncode, "wall_s": round(time.time() - t, 1),
                       "proxy": dict(proxy.stats), "objects_missing_or_different": len(bad),
                       "cells_committed": sc.markers(data + "/product.zarr"), **sc.summary_numbers(r.stdout + r.stderr)}
                records.append(rec)
                print(f"faults at {args.fault_rate:.0%}: {json.dumps(rec)}", flush=True)
                if r.returncode != 0 or bad:
                    print((r.stdout + r.stderr)[-4000:], file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1))
    ok = all(r.get("identical", r.get("objects_missing_or_different") == 0) for r in records)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
