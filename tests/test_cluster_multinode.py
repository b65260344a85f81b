"""Issue 12 on a real multi-node Ray cluster on loopback (tests/multinode.py): a head and two worker
nodes (`ray start`, token auth), data and checkpoint on fake-gcs-server behind a fault-injecting
proxy (tests/faultproxy.py), the job submitted with `ray job submit`.

* ten runs, each with a worker node SIGKILLed at a random moment and a node added back: each
  completes and its product is byte-identical to a single-node run of the same AOI;
* a run under 10 % injected GCS faults (503s, resets, slow answers) loses nothing;
* a node-local checkpoint is refused on the multi-node cluster before anything runs.

Slow (about 15 minutes on 2 cores): ``pytest -m slow tests/test_cluster_multinode.py``;
``GUM_KILL_TRIALS`` sets the number of kill trials (default 10). tools/cluster_trials.py runs the
same trials and prints the table recorded in docs/cluster.md.
"""

from __future__ import annotations

import os
import random
import sys

import pytest

from tests import cluster_scenarios as sc

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return sc.reference_run(tmp_path_factory.mktemp("ref"), sc.demo_checkpoint())


@pytest.fixture(scope="module")
def harness(gcs_emulator):
    from gum_ray.store import fs
    from tests.conftest import TEST_BUCKET
    from tests.faultproxy import FaultProxy
    from tests.multinode import LoopbackCluster

    fs.write_bytes(f"gs://{TEST_BUCKET}/mn/gum.pth", sc.demo_checkpoint().read_bytes())
    with FaultProxy(gcs_emulator, rate=0.0, seed=12) as proxy:
        env = {"STORAGE_EMULATOR_HOST": proxy.url}
        # the head runs the driver only: a killed worker takes the model actor or tasks with it
        with LoopbackCluster(workers=2, num_cpus=1, env=env, head_cpus=0) as cluster:
            yield cluster, proxy, env, f"gs://{TEST_BUCKET}/mn"


def test_node_local_checkpoint_refused_before_anything_runs(harness):
    from gum_ray.store import fs

    cluster, _, env, root = harness
    r = cluster.submit([sys.executable, str(sc.REPO / "pipelines" / "continental.py"),
                        *sc.job_args(f"{root}/refused", str(sc.demo_checkpoint()))], env_vars=env, cwd="/tmp")
    assert r.returncode != 0
    assert "is on this node only, but the Ray cluster has 3 nodes" in r.stdout + r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    assert not fs.exists(f"{root}/refused/product.zarr/zarr.json")  # nothing written


def test_worker_node_killed_mid_run_ten_times_product_identical(harness, reference):
    cluster, _, env, root = harness
    rng = random.Random(int(os.environ.get("GUM_KILL_SEED", "12")))
    results = []
    for k in range(int(os.environ.get("GUM_KILL_TRIALS", "10"))):
        # every other trial kills the node of the model actor (its replacement is then exercised)
        rec = sc.kill_trial(cluster, f"{root}/kill-{k}", f"{root}/gum.pth", rng, env,
                            victim="actor" if k % 2 == 0 else "random")
        got = sc.product_files(f"{root}/kill-{k}/product.zarr") if rec["rc"] == 0 else {}
        results.append((rec["rc"], got == reference, rec["killed"], rec["cells_at_kill"]))
        assert rec["rc"] == 0, rec["log_tail"]
        assert got == reference, sorted(k for k in set(got) | set(reference) if got.get(k) != reference.get(k))[:10]
    assert all(ok for _, ok, _, _ in results)


def test_a_run_under_10_percent_gcs_faults_loses_nothing(harness, reference):
    cluster, proxy, env, root = harness
    proxy.stats.clear()
    proxy.rate = 0.10
    try:
        r = cluster.submit([sys.executable, str(sc.REPO / "pipelines" / "continental.py"),
                            *sc.job_args(f"{root}/faults", f"{root}/gum.pth")], env_vars=env, cwd="/tmp")
    finally:
        proxy.rate = 0.0
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert proxy.stats["requests"] > 100 and proxy.stats["error"] + proxy.stats["reset_before"] > 5
    assert sc.markers(f"{root}/faults/product.zarr") == sc.N_CELLS  # 0 cells missing
    assert sc.product_files(f"{root}/faults/product.zarr") == reference  # 0 different
