"""Under injected GCS faults (10 % of requests: 503s, connections reset before or after the store
acted, slow answers) a run loses nothing: every cell committed, every cell's bytes what one process
computes from the same imagery. The store's retries (gcsfs's, and the conditional writes' own
handling of an answer lost after the write) do the work. Issue 12."""

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
                            "--cell-deg", "0.01", "--chunk-px", "40", "--halo", "64", "--quiet", "--no-preview"],
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
