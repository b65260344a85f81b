"""The fetch and write stages never import torch (issue 14): a Ray worker that only fetches or
writes cells (most of a cluster's CPU workers) skips torch's 1.5 s of import and its 300 MB."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_fetch_and_write_of_a_cell_run_without_torch(tmp_path):
    code = textwrap.dedent(f"""
        import sys
        import numpy as np
        from gum_ray.grid import ProductGrid, parse_aoi, cells_for_aoi
        from gum_ray.imagery import Prediction
        from gum_ray.mapping.job import MapJob
        from gum_ray.mapping import runner  # what a Ray worker unpickles the stage functions from
        from gum_ray.mapping.stages import fetch_cell, write_cell

        grid = ProductGrid(cell_deg=0.01, chunk_px=40)
        job = MapJob(aoi=parse_aoi(bbox=(8.571, 47.371, 8.579, 47.379)), years=(2020,),
                     product={str(tmp_path / "p.zarr")!r}, cache={str(tmp_path / "cache")!r}, grid=grid,
                     halo_px=32)
        cell = cells_for_aoi(job.aoi, grid)[0]
        assert fetch_cell(job, 2020, cell.row, cell.col)["fetched"]
        from gum_ray.store.product import ProductSettings, ProductStore
        ProductStore.open_or_create(job.product, settings=ProductSettings(grid=grid), years=job.years)
        imagery = job.imagery_cache().get(2020, cell)
        prob = np.full(tuple(imagery.geobox.shape), 0.25, np.float16)
        pred = Prediction(prob, None, imagery.geobox, {{}}, quality=imagery.input_quality())
        res = write_cell(job, 2020, cell.row, cell.col, pred, "0" * 64)
        assert res["committed"] and res["valid_px"] > 0
        print("torch imported:", "torch" in sys.modules)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "torch imported: False" in r.stdout
