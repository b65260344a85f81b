"""The main job end to end: a real Ray head on loopback, `ray job submit`, the Earth Engine emulator,
the synthetic world; then the product is checked against a single-process prediction of the same
imagery on the same grid, read back by coordinates through xarray.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from gum_ray.grid import ProductGrid, parse_aoi
from gum_ray.model import ModelSpec, random_checkpoint
from tests.helpers import REPO, product_chunks
from tests.raycluster import RAY, ray_head

pytestmark = pytest.mark.slow

# two 0.01-degree cells (120 x 120 product px) in the synthetic world's demo town
BBOX = (8.571, 47.371, 8.589, 47.379)
CELL_DEG, CHUNK = 0.01, 40


def job_args(data_dir, ckpt, *extra):
    return ["--bbox", *map(str, BBOX), "--year", "2020", "--checkpoint", str(ckpt),
            "--data-dir", str(data_dir), "--cell-deg", str(CELL_DEG), "--chunk-px", str(CHUNK),
            "--halo", "64", "--quiet", "--no-preview", *extra]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    random_checkpoint(path, ModelSpec(10, 8, 4), seed=3)
    return path


@pytest.fixture(scope="module")
def emulator():
    from gum_ray.sources.ee_emulator import start_emulator_process

    emu = start_emulator_process(max_seconds=1800)
    yield emu
    emu.stop()


def expected_cell(product_root, cache_root, ckpt, cell, year=2020):
    """What one process gives for the cell: cached imagery -> engine -> warp -> stored encoding."""
    from gum_ray import bands
    from gum_ray.inference import InferenceEngine, InferenceSettings
    from gum_ray.model import load_checkpoint
    from gum_ray.store.cache import ImageryCache
    from gum_ray.store.product import encode_probability
    from gum_ray.warp import warp_probability

    from gum_ray.store import fs

    # the one source's entries (the run kept them: --keep-cache); local or gs://
    key, = (n for n in fs.list_names(str(cache_root)) if not n.endswith(".json"))
    cached = ImageryCache(str(cache_root), key).get(year, cell)
    export = cached.export
    engine = InferenceEngine(load_checkpoint(ckpt).model, InferenceSettings())
    prob = engine.predict(bands.preprocess(export)).probability.astype(np.float16)
    prob[~bands.validity_mask(export)] = np.nan
    warped = warp_probability(prob.astype(np.float32), cached.geobox, cell.product_geobox())
    return encode_probability(warped)


def test_ray_job_submit_through_the_ee_emulator(tmp_path, ckpt, emulator):
    from gum_ray import open_product
    from gum_ray.grid import cells_for_aoi

    data = tmp_path / "data"
    with ray_head() as (gcs, dashboard, env):
        cmd = [RAY, "job", "submit", "--address", dashboard, "--",
               sys.executable, str(REPO / "pipelines" / "continental.py"),
               *job_args(data, ckpt, "--source", "ee", "--source-option", f"url={emulator.url}",
                         "--source-option", "credentials=anonymous",
                         "--source-option", "project=gum-emulator", "--keep-cache")]
        for _ in range(30):  # the head's job agent may need a few more seconds after start
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path, env=env)
            if "No available agent" not in r.stdout + r.stderr:
                break
            time.sleep(2)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert "2 cells mapped" in r.stdout + r.stderr, r.stdout[-3000:]
        assert emulator.stats()["requests"] > 0
    grid = ProductGrid(CELL_DEG, CHUNK)
    cells = cells_for_aoi(parse_aoi(bbox=BBOX), grid)
    assert len(cells) == 2
    ds = open_product(str(data / "product.zarr"))
    assert ds.rio.crs.to_epsg() == 4326
    for cell in cells:
        expected = expected_cell(data / "product.zarr", data / "imagery-cache", ckpt, cell)
        w, s, e, n = cell.bounds
        got = ds["probability"].sel(year=2020, x=slice(w, e), y=slice(n, s)).values
        assert got.shape == expected.shape == cell.shape
        np.testing.assert_array_equal(got, expected)
        # a single pixel by coordinates: its centre lands on the same value
        lon, lat = w + 7.5 / 12000, n - 11.5 / 12000
        assert ds["probability"].sel(year=2020, x=lon, y=lat, method="nearest").values == expected[11, 7]


def test_kill_driver_mid_run_then_resume_is_byte_identical(tmp_path, ckpt):
    bbox_big = ("--bbox", "8.57", "47.37", "8.60", "47.39")  # 6 cells
    gum = [sys.executable, "-m", "gum_ray.cli", "map"]
    # the uninterrupted reference run
    ref_dir = tmp_path / "ref"
    r = subprocess.run(gum + job_args(ref_dir, ckpt) + list(bbox_big), capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    # the interrupted run: kill -9 the driver once the first cell is committed
    run_dir = tmp_path / "run"
    # one fetch and one cell a model call at a time, so cells commit one by one, about a fetch
    # apart, and the kill lands mid-run (with the defaults the six can commit within a poll)
    args = gum + job_args(run_dir, ckpt, "--lease-ttl", "25", "--write-concurrency", "1", "--fetch-concurrency", "1",
                          "--cells-per-call", "1") + list(bbox_big)
    log = open(tmp_path / "killed-run.log", "w")
    proc = subprocess.Popen(args, stdout=log, stderr=log, start_new_session=True)
    try:
        markers = run_dir / "product.zarr" / "_manifest" / "2020"
        deadline = time.time() + 600
        while time.time() < deadline and not (markers.exists() and any(markers.glob("*.json"))):
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(60)
        _kill_group(proc.pid)  # the killed driver's local Ray daemons, orphaned as in a real crash
        n_first = len(list(markers.glob("*.json")))
        assert 1 <= n_first < 6, "the run must be interrupted mid-way"
        from gum_ray.mapping.lease import read_lease

        lease = read_lease(str(run_dir / "product.zarr"))
        first_run = lease["run_id"]
        assert lease["state"] == "held" and lease["generation"] == 1 and lease["age_s"] < 25
        # the lease is fresh, but its holder's process on this host is gone: the resume takes it
        # over at once (a holder elsewhere would have to expire first: tests/test_lease.py)
        r = subprocess.run(args, capture_output=True, text=True, timeout=900)
    finally:
        _kill_group(proc.pid)
        log.close()
    assert r.returncode == 0, r.stderr[-3000:]
    mapped, done = map(int, re.search(r"(\d+) cells mapped, (\d+) already done", r.stderr).groups())
    assert mapped + done == 6 and done >= n_first, r.stderr[-3000:]
    assert product_chunks(run_dir / "product.zarr") == product_chunks(ref_dir / "product.zarr")
    # every cell committed once, by one of the two runs, each fenced by its lease generation
    runs = {}
    for m in markers.glob("*.json"):
        rec = json.loads(m.read_text())
        assert rec["cell_id"] == m.stem
        runs.setdefault(rec["run_id"], []).append(rec)
    assert len(runs) == 2 and len(runs[first_run]) >= done
    assert sum(map(len, runs.values())) == 6
    for run_id, recs in runs.items():
        assert {rec["lease_generation"] for rec in recs} == {1 if run_id == first_run else 2}


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
