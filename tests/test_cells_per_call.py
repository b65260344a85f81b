"""Cross-cell batching in `gum map` (issue 14): a model actor predicts several cells per call, their
crops in shared batches, and reads the next cell while the current one runs. At batch 1 (a CPU's
default) the product is the same as one cell per call, to the byte, on any CPU; at larger batches
the crops of two cells share a batch, which oneDNN may round differently (AVX2 kernels do, in the
last bit of a few pixels), so there the predictions are compared within float16 rounding. One bad
cell in a call fails alone."""

from __future__ import annotations

import numpy as np
import pytest

from gum_ray.grid import ProductGrid, cells_for_aoi, parse_aoi
from gum_ray.inference import InferenceSettings
from gum_ray.mapping.job import MapJob
from gum_ray.mapping.stages import CellPredictor, StageFailed, fetch_cell
from gum_ray.model import ModelSpec, random_checkpoint
from gum_ray.store import fs
from tests.cluster_scenarios import product_files
from tests.helpers import gum

BBOX = ["--bbox", "8.571", "47.371", "8.599", "47.389"]  # 3 x 2 cells of 0.01 degree
SMALL = ["--cell-deg", "0.01", "--chunk-px", "40", "--halo", "32", "--quiet", "--no-preview"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    random_checkpoint(path, ModelSpec(10, 8, 4), seed=1)
    return path


@pytest.mark.parametrize("batch", [1, 4])
def test_one_bad_cell_in_a_call_fails_alone_and_the_others_equal_single_calls(tmp_path, ckpt, batch):
    grid = ProductGrid(cell_deg=0.01, chunk_px=40)
    job = MapJob(aoi=parse_aoi(bbox=(8.571, 47.371, 8.599, 47.389)), years=(2020,),
                 product=str(tmp_path / "p.zarr"), cache=str(tmp_path / "cache"), grid=grid, halo_px=32,
                 checkpoint=str(ckpt), inference=InferenceSettings(device="cpu", batch_size=batch))
    cells = cells_for_aoi(job.aoi, grid)[:3]
    for c in cells:
        fetch_cell(job, 2020, c.row, c.col)
    # the middle cell's entry lost a part (a deletion cut short): that cell fails, not its mates
    fs.remove(fs.join(job.imagery_cache().path(2020, cells[1]), "s1"), recursive=True)
    actor = CellPredictor(job, str(ckpt))
    actor.ready()
    got = actor.predict_group(2020, [(c.row, c.col) for c in cells])
    assert isinstance(got, tuple) and len(got) == 3
    assert isinstance(got[1], StageFailed) and got[1].stage == "predict" and not got[1].cluster
    assert "lacked s1" in got[1].message
    assert actor.engine.crops_run > 0
    for i in (0, 2):  # each equals the cell alone (at batch 4, crops of cells 0 and 2 shared batches)
        alone = CellPredictor(job, str(ckpt)).predict(2020, cells[i].row, cells[i].col)
        if batch == 1:
            np.testing.assert_array_equal(got[i].probability, alone.probability)
        else:  # float16 P(urban): a last-bit difference of the network is at most one float16 step
            np.testing.assert_allclose(got[i].probability.astype(np.float32),
                                       alone.probability.astype(np.float32), rtol=2e-3, atol=1e-3)
            assert np.array_equal(np.isnan(got[i].probability), np.isnan(alone.probability))
        np.testing.assert_array_equal(got[i].quality, alone.quality)
        assert got[i].geobox == alone.geobox
    # without errors as values (a direct call), the bad cell's error is raised
    fetch_cell(job, 2020, cells[1].row, cells[1].col)
    fs.remove(fs.join(job.imagery_cache().path(2020, cells[1]), "s2"), recursive=True)
    with pytest.raises(Exception, match="lacked s2"):
        actor.predict_cells(2020, [(c.row, c.col) for c in cells])


@pytest.mark.slow
def test_gum_map_cells_per_call_gives_the_same_bytes(tmp_path, ckpt):
    import json

    products, calls = {}, {}
    for n in (1, 3):
        data = tmp_path / f"per-call-{n}"
        assert gum("map", *BBOX, "--year", "2020", "--data-dir", data, "--checkpoint", ckpt, *SMALL,
                   "--cells-per-call", str(n), "--batch-size", "1", "--fetch-concurrency", "3",
                   "--summary-json", tmp_path / f"s{n}.json") == 0
        products[n] = product_files(str(data / "product.zarr"))
        summary = json.loads((tmp_path / f"s{n}.json").read_text())
        assert summary["done"] == 6
        calls[n] = summary["predict_calls"]
    assert any(k.startswith("probability/") for k in products[1])
    assert products[1] == products[3]
    assert calls[1] == 6 and calls[3] < 6  # cells did share calls


@pytest.mark.parametrize("flag, value", [("--cells-per-call", "0"), ("--actor-threads", "0"),
                                         ("--infer-actors", "-1")])
def test_per_actor_counts_must_be_positive(tmp_path, ckpt, capsys, flag, value):
    from tests.helpers import one_error_line

    data = tmp_path / "data"
    assert gum("map", *BBOX, "--year", "2020", "--data-dir", data, "--checkpoint", ckpt, *SMALL,
               flag, value) == 2
    assert one_error_line(capsys) == f"gum: error: {flag} {value}: must be at least 1"
    assert not data.exists()
