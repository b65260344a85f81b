"""`gum map` / `gum plan` / `gum status`: planning, bad input (clear errors, nothing written),
and cells that keep failing are set aside while the run goes on."""

from __future__ import annotations

import json

import pytest

from gum_ray.grid import ProductGrid, cells_for_aoi, parse_aoi
from gum_ray.model import ModelSpec, random_checkpoint
from tests.helpers import gum, one_error_line

TOWN = ["--bbox", "8.571", "47.371", "8.579", "47.379"]  # one 0.01-degree cell
SMALL = ["--cell-deg", "0.01", "--chunk-px", "40", "--halo", "32", "--quiet", "--no-preview"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    random_checkpoint(d / "tiny.pth", ModelSpec(10, 8, 4), seed=1)
    random_checkpoint(d / "tiny13.pth", ModelSpec(13, 8, 4), seed=1)
    return d




def test_plan_counts_cells_requests_and_time(capsys):
    bbox = ["--bbox", "8.0", "47.0", "9.0", "48.0"]
    assert gum("plan", *bbox, "--year", "2020", "2021", "--source", "ee") == 0
    out = capsys.readouterr().out
    cells = cells_for_aoi(parse_aoi(bbox=(8.0, 47.0, 9.0, 48.0)), ProductGrid())
    assert f"cells (shards)        {len(cells)} x 2 year(s) = {2 * len(cells)}" in out
    assert "Earth Engine" in out and "gpu-seconds" in out and "km²" in out


@pytest.mark.parametrize("case", ["not_geojson", "ocean", "channels", "ray_address", "no_area"])
def test_bad_input_is_a_clear_error_and_nothing_is_written(tmp_path, ckpt, capsys, case):
    data = tmp_path / "data"
    args = ["map", "--year", "2020", "--data-dir", data, "--checkpoint", ckpt / "tiny.pth", *SMALL]
    if case == "not_geojson":
        bad = tmp_path / "aoi.geojson"
        bad.write_text("this is not json")
        args += ["--aoi", bad]
    elif case == "ocean":
        args += ["--bbox", "-40.05", "10.0", "-40.0", "10.05"]
    elif case == "channels":
        args += TOWN + ["--checkpoint", ckpt / "tiny13.pth"]
    elif case == "ray_address":
        args += TOWN + ["--ray-address", "127.0.0.1:1"]
    assert gum(*args) != 0
    line = one_error_line(capsys)
    expect = {"not_geojson": "aoi.geojson", "ocean": "nothing to map", "channels": "13-channel",
              "ray_address": "Ray cluster", "no_area": "--bbox"}[case]
    assert expect in line
    assert not data.exists()


def test_product_with_other_grid_settings(tmp_path, ckpt, capsys):
    from gum_ray.store.product import ProductSettings, ProductStore

    product = tmp_path / "data" / "product.zarr"
    ProductStore.create(str(product), settings=ProductSettings(grid=ProductGrid(0.05, 200)), years=[2020])
    before = sorted(p.name for p in product.rglob("*"))
    assert gum("map", *TOWN, "--year", "2020", "--data-dir", tmp_path / "data", "--checkpoint",
               ckpt / "tiny.pth", *SMALL) == 2
    assert "0.05 degree cells" in one_error_line(capsys)
    assert sorted(p.name for p in product.rglob("*")) == before


@pytest.mark.slow
def test_failing_cells_are_set_aside_and_the_run_goes_on(tmp_path, ckpt, capsys):
    from gum_ray.sources.ee_emulator import start_emulator_process

    data = tmp_path / "data"
    with start_emulator_process(max_seconds=600, rate_5xx=1.0) as emu:  # every request fails
        code = gum("map", *TOWN, "--year", "2020", "--data-dir", data, "--checkpoint", ckpt / "tiny.pth",
                   *SMALL, "--source", "ee", "--source-option", f"url={emu.url}",
                   "--source-option", "credentials=anonymous", "--source-option", "project=emu",
                   "--source-option", "max_attempts=2", "--source-option", "backoff_s=0.01",
                   "--max-attempts", "2")
    err = capsys.readouterr().err
    assert code == 3
    assert "0 cells mapped" in err and "1 set aside" in err and "1 retried" in err
    assert gum("status", data / "product.zarr", "--json") == 0
    report = json.loads(capsys.readouterr().out)["years"]["2020"]
    assert report["set_aside"] == 1 and report["done"] == 0
    (cell_id, error), = report["errors"].items()
    assert cell_id.startswith("r") and error


def test_lease_one_writer_per_product(tmp_path):
    from gum_ray.errors import GumError
    from gum_ray.mapping.lease import LeaseLost, RunLease, assert_lease_held

    product = str(tmp_path / "p.zarr")
    (tmp_path / "p.zarr").mkdir()
    first = RunLease(product, ttl_s=3.0)
    first.acquire()
    assert first.generation == 1
    assert_lease_held(product, first.run_id, 1)
    with pytest.raises(GumError, match="another run"):
        RunLease(product, ttl_s=3.0).acquire()
    import time

    time.sleep(5)  # the first run stops beating: its lease goes stale (2 s of margin)
    with pytest.raises(LeaseLost):
        assert_lease_held(product, first.run_id, 1)
    second = RunLease(product, ttl_s=30)
    second.acquire()  # takes over the expired lease, with the next lease generation
    assert second.generation == 2
    assert_lease_held(product, second.run_id, 2)
    with pytest.raises(LeaseLost, match="holder"):
        assert_lease_held(product, first.run_id, 1)
    second.release()
    with pytest.raises(LeaseLost, match="released"):
        assert_lease_held(product, second.run_id, 2)
