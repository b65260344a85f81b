"""Under injected GCS faults (10 % of requests: 503s, connections reset before or after the store
acted, slow answers) nothing is lost: every cell committed, every cell's bytes right. The store's
retries (gcsfs's, and the conditional writes' own handling of an answer lost after the write) do
the work. Issue 12. The fast test writes through the store directly; the slow one is a whole
`gum map` (its gcsfs retries back off a second or more each: minutes on 2 shared cores)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from gum_ray.grid import ProductGrid, cells_for_aoi, parse_aoi
from tests.conftest import TEST_BUCKET
from tests.faultproxy import FaultProxy

BBOX = (8.571, 47.371, 8.589, 47.379)  # two 0.01-degree cells


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from gum_ray.model import ModelSpec, random_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    random_checkpoint(path, ModelSpec(10, 8, 4), seed=3)
    return path


@pytest.fixture()
def through_proxy(gcs_emulator, monkeypatch):
    """This process's gcsfs talks to the emulator through a fault proxy (10 %, seeded)."""
    import gcsfs

    with FaultProxy(gcs_emulator, rate=0.10, slow_s=0.2, seed=11) as proxy:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
        gcsfs.GCSFileSystem.clear_instance_cache()  # instances remember their endpoint
        try:
            yield proxy
        finally:
            monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator)
            gcsfs.GCSFileSystem.clear_instance_cache()


def test_the_store_writes_through_10_percent_faults(through_proxy):
    """Fast (no Ray, no model): the lease, the product, cell shards, commit markers and overviews
    written through 503s, resets (before and after the store acted) and slow answers: all there,
    every byte right, read back without the proxy."""
    import uuid

    from gum_ray.mapping.lease import RunLease
    from gum_ray.store.manifest import Manifest, write_and_commit
    from gum_ray.store.product import ProductSettings, ProductStore, encode_probability

    root = f"gs://{TEST_BUCKET}/store-faults-{uuid.uuid4().hex[:8]}"
    grid = ProductGrid(0.01, 40)
    cells = cells_for_aoi(parse_aoi(bbox=(8.571, 47.371, 8.599, 47.379)), grid)
    rng = np.random.default_rng(5)
    probs = {c.id: rng.random(c.shape).astype(np.float32) for c in cells}
    lease = RunLease(root, 60)
    lease.acquire()
    product = ProductStore.open_or_create(root, settings=ProductSettings(grid=grid), years=[2020])
    manifest = Manifest(root, grid)
    for c in cells:
        lease.beat_now()
        write_and_commit(product, manifest, 2020, c, probs[c.id], checkpoint_sha256="0" * 64,
                         settings={}, source="test", source_dates=None,
                         extra={"run_id": lease.run_id, "lease_generation": lease.generation})
    product.build_overviews(cells, years=[2020], check=lease.beat)
    lease.release()
    stats = dict(through_proxy.stats)
    through_proxy.rate = 0.0
    assert stats.get("error", 0) + stats.get("reset_before", 0) + stats.get("reset_after", 0) >= 3, stats
    again = ProductStore.open(root)
    assert manifest.done(2020) == {c.id for c in cells}
    for c in cells:
        np.testing.assert_array_equal(again.read_cell(2020, c), encode_probability(probs[c.id]))


@pytest.mark.slow
def test_a_run_through_10_percent_injected_gcs_faults_loses_nothing(gcs_emulator, tmp_path, ckpt):
    import os
    import uuid

    from gum_ray.store import fs
    from gum_ray.store.manifest import Manifest
    from tests.test_mapping_e2e import expected_cell

    root = f"gs://{TEST_BUCKET}/faults-{uuid.uuid4().hex[:8]}"
    fs.write_bytes(f"{root}/gum.pth", ckpt.read_bytes())
    with FaultProxy(gcs_emulator, rate=0.10, slow_s=0.3, seed=7) as proxy:
        env = {**os.environ, "STORAGE_EMULATOR_HOST": proxy.url, "GUM_CHECKPOINT_CACHE": str(tmp_path / "ck")}
        r = subprocess.run([sys.executable, "-m", "gum_ray.cli", "map", "--bbox", *map(str, BBOX),
                            "--year", "2020", "--checkpoint", f"{root}/gum.pth", "--data-dir", f"{root}/data",
                            "--cell-deg", "0.01", "--chunk-px", "40", "--halo", "64", "--quiet", "--no-preview",
                            "--keep-cache"],
                           capture_output=True, text=True, timeout=600, env=env)
        stats = dict(proxy.stats)
    assert r.returncode == 0, r.stderr[-3000:]
    faults = stats.get("error", 0) + stats.get("reset_before", 0) + stats.get("reset_after", 0)
    assert stats["requests"] > 50 and faults >= 3, stats
    product = f"{root}/data/product.zarr"
    grid = ProductGrid(0.01, 40)
    cells = cells_for_aoi(parse_aoi(bbox=BBOX), grid)
    assert Manifest(product).done(2020) == {c.id for c in cells}  # 0 cells missing
    from gum_ray import open_product

    ds = open_product(product)
    for cell in cells:  # 0 cells different
        w, s, e, n = cell.bounds
        got = ds["probability"].sel(year=2020, x=slice(w, e), y=slice(n, s)).values
        np.testing.assert_array_equal(got, expected_cell(product, f"{root}/data/imagery-cache", ckpt, cell))
