"""The land mask (cells without land are never fetched), `gum plan`'s cost model, the imagery cache
keyed by source and recipe with its delete-once-committed policy, and the resumable overview stage."""

from __future__ import annotations

import json
import shutil

import pytest

from gum_ray.grid import ProductGrid, cells_for_aoi, parse_aoi
from gum_ray.landmask import COAST_MARGIN_DEG, may_hold_land
from gum_ray.model import ModelSpec, random_checkpoint
from tests.helpers import gum, one_error_line, product_chunks

EUROPE = ("-10.5", "35", "30", "60")  # the README's Europe box
TOWN = ["--bbox", "8.571", "47.371", "8.579", "47.379"]  # one 0.01-degree cell
SMALL = ["--cell-deg", "0.01", "--chunk-px", "40", "--halo", "32", "--quiet", "--no-preview"]




@pytest.mark.parametrize("bounds, land", [
    ((8.55, 47.35, 8.60, 47.40), True),  # Zurich
    ((-30.0, 40.0, -29.75, 40.25), False),  # mid-Atlantic
    ((3.0, 55.0, 3.25, 55.25), False),  # the North Sea
    ((-31.25, 39.35, -31.0, 39.55), True),  # Flores, Azores (a small island)
    ((-64.9, 32.2, -64.6, 32.45), True),  # Bermuda
    ((179.9, -16.9, -179.9, -16.6), True),  # Fiji, across the antimeridian
    ((-150.0, -45.0, -149.75, -44.75), False),  # the South Pacific
])
def test_land_mask_knows_land_from_sea(bounds, land):
    assert may_hold_land(bounds) is land


def test_the_coast_margin_keeps_near_shore_cells_and_skips_open_sea():
    # the Dutch coast at The Hague (the beach near 4.25 E at 52.1 N): a box a few km offshore is
    # kept within the margin, one three margins out is skipped
    row = (52.10, 52.11)
    assert may_hold_land((4.30, row[0], 4.31, row[1]), margin_deg=0)
    off = (4.20, row[0], 4.21, row[1])
    assert may_hold_land(off) and not may_hold_land(off, margin_deg=0.0)
    assert not may_hold_land((4.25 - 3 * COAST_MARGIN_DEG, row[0], 4.26 - 3 * COAST_MARGIN_DEG, row[1]))


def test_plan_of_europe_counts_land_cells_and_what_the_mask_saves(capsys):
    assert gum("plan", "--bbox", *EUROPE, "--year", "2020", "--source", "ee", "--json") == 0
    plan = json.loads(capsys.readouterr().out)
    everything = len(cells_for_aoi(parse_aoi(bbox=tuple(map(float, EUROPE))), ProductGrid()))
    assert plan["cells_all"] == everything == 16200
    assert 0.5 * everything < plan["cells"] < 0.9 * everything  # Europe's box is about a third sea
    # the saved requests are the sea cells' share at the land cells' rate
    per_cell = plan["ee_requests"] / plan["cells"]
    assert plan["ee_requests_saved"] == pytest.approx(per_cell * (everything - plan["cells"]), rel=0.02)
    assert plan["ee_bytes_saved"] > 0 and plan["eecu_hours"] > 0 and plan["ee_wall_s"] > 0
    assert plan["rates"]["origin"]["s_per_request"] == "assumed"


def test_plan_text_states_every_rate_and_the_tiers(capsys):
    assert gum("plan", *TOWN, "--year", "2020", "--source", "ee", "--eecu-s-per-request", "2.5") == 0
    out = capsys.readouterr().out
    for text in ("land cells", "wall time at quota", "EECU", "community's 150", "contributor's 1,000",
                 "partner's 100,000", "2.50 EECU-s per request: given", "gpu-hours", "imagery cache"):
        assert text in out, text


@pytest.mark.parametrize("flag, expect", [(["--calibrate", "nowhere.zarr"], "--calibrate nowhere.zarr"),
                                          (["--eecu-s-per-request", "-1"], "--eecu-s-per-request")])
def test_plan_bad_rates_are_one_line(tmp_path, capsys, flag, expect, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert gum("plan", *TOWN, "--year", "2020", *flag) != 0
    assert expect in one_error_line(capsys)


def test_cache_keys_separate_sources_and_recipes():
    from gum_ray.sources import get_source
    from gum_ray.sources.synthetic import SyntheticSource

    keys = {get_source("synthetic").cache_key(), get_source("synthetic", with_products=True).cache_key(),
            get_source("ee", project="p").cache_key(), get_source("ee", project="p", url="http://127.0.0.1:9").cache_key()}
    assert len(keys) == 4
    # the project and operational knobs do not change the pixels: one key
    assert get_source("ee", project="a").cache_key() == get_source("ee", project="b", max_in_flight=3).cache_key()

    class NewWorld(SyntheticSource):
        recipe_version = SyntheticSource.recipe_version + 1

    assert NewWorld().cache_key() != SyntheticSource().cache_key()


def test_an_ee_job_never_reads_synthetic_imagery_from_a_shared_cache(tmp_path):
    from gum_ray.mapping.job import MapJob
    from gum_ray.sources.synthetic import SyntheticSource

    aoi = parse_aoi(bbox=(8.571, 47.371, 8.579, 47.379))
    common = dict(aoi=aoi, years=(2020,), product=str(tmp_path / "p"), cache=str(tmp_path / "cache"),
                  grid=ProductGrid(0.01, 40), halo_px=32)
    synth = MapJob(**common)
    ee = MapJob(**common, source="ee", source_options=(("project", "p"),))
    cell = synth.grid.cell_at(8.575, 47.375)
    synth.imagery_cache().put(2020, cell, SyntheticSource().fetch(cell.utm_geobox(32), 2020))
    assert synth.imagery_cache().has(2020, cell)
    assert not ee.imagery_cache().has(2020, cell)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    random_checkpoint(path, ModelSpec(10, 8, 4), seed=1)
    return path


def _overview_chunks(product):
    """The data chunks of the overview levels (not the coordinates, written when the product is made)."""
    return {str(p.relative_to(product)): p.read_bytes() for p in (product / "overviews").rglob("*")
            if p.is_file() and "/c/" in str(p) and p.parent.parent.name not in ("x", "y", "pixel_area", "year")}


def test_overviews_lost_in_a_crash_are_reported_and_rebuilt_cache_deleted_once_committed(tmp_path, ckpt, capsys):
    data = tmp_path / "data"
    product = data / "product.zarr"
    assert gum("map", *TOWN, "--year", "2020", "--data-dir", data, "--checkpoint", ckpt, *SMALL) == 0
    err = capsys.readouterr().err
    assert "1 cells mapped" in err and "overview shards built" in err and "measured:" in err
    built = _overview_chunks(product)
    assert built
    # the committed cell's imagery was deleted (default policy); the cache folder itself stays
    key_dirs = [p for p in (data / "imagery-cache").iterdir() if p.is_dir()]
    assert len(key_dirs) == 1 and key_dirs[0].name.startswith("synthetic-r")
    assert not any(p.is_file() for p in key_dirs[0].rglob("*"))

    # the crash: the cells are committed but the pyramid and its markers are gone
    shutil.rmtree(product / "_manifest" / "overviews")
    for name in built:
        (product / name).unlink()
    assert gum("status", product, "--json") == 0
    st = json.loads(capsys.readouterr().out)
    assert st["years"]["2020"]["done"] == 1
    assert st["years"]["2020"]["overview_shards_missing"] == {str(lv): 1 for lv in range(1, 7)}
    assert st["cache"]["keep_cache"] is False
    assert gum("status", product) == 0
    assert "overview shards missing or stale" in capsys.readouterr().out

    # the next run has no cell to map and builds the missing pyramid, byte for byte
    assert gum("map", *TOWN, "--year", "2020", "--data-dir", data, "--checkpoint", ckpt, *SMALL) == 0
    err = capsys.readouterr().err
    assert "0 cells mapped, 1 already done" in err and "6 overview shards built" in err
    assert _overview_chunks(product) == built
    assert gum("status", product, "--json") == 0
    assert json.loads(capsys.readouterr().out)["years"]["2020"]["overview_shards_missing"] == {}

    # --keep-cache keeps the imagery of committed cells (to map it again with another model)
    kept = tmp_path / "kept"
    assert gum("map", *TOWN, "--year", "2020", "--data-dir", kept, "--checkpoint", ckpt, *SMALL, "--keep-cache") == 0
    capsys.readouterr()
    assert any(p.name == "zarr.json" for p in (kept / "imagery-cache").rglob("*"))
    assert gum("status", kept / "product.zarr", "--json") == 0
    cache = json.loads(capsys.readouterr().out)["cache"]
    assert cache["keep_cache"] is True and cache["bytes"] > 0 and cache["objects"] > 0

    # and the measured rates calibrate the next plan
    assert gum("plan", *TOWN, "--year", "2020", "--calibrate", kept / "product.zarr", "--rate-device", "cpu") == 0
    assert "measured per actor by a run of" in capsys.readouterr().out


def test_a_damaged_cache_object_is_fetched_again_and_the_product_is_the_same(tmp_path, ckpt, capsys, caplog):
    """Storage damages a cached imagery object between two runs over a kept cache: the second run's
    read fails once with one clear reason, the entry is removed and fetched again, and the cell is
    committed with the same pixels as from the intact cache."""
    data = tmp_path / "data"
    assert gum("map", *TOWN, "--year", "2020", "--data-dir", data, "--checkpoint", ckpt, *SMALL, "--keep-cache") == 0
    capsys.readouterr()
    shard = next(p for p in (data / "imagery-cache").rglob("s2/c/0/0/0"))
    raw = shard.read_bytes()
    shard.write_bytes(raw[:-20] + bytes(b ^ 0xFF for b in raw[-20:]))  # the shard index, damaged
    summary = tmp_path / "second.json"
    assert gum("map", *TOWN, "--year", "2020", "--data-dir", data, "--product", tmp_path / "second.zarr",
               "--checkpoint", ckpt, *SMALL, "--keep-cache", "--summary-json", summary) == 0
    assert "1 cells mapped" in capsys.readouterr().err
    warned = [r.getMessage() for r in caplog.records if "failed in predict" in r.getMessage()]
    assert len(warned) == 1 and "damaged" in warned[0] and "fetched again" in warned[0], warned
    s = json.loads(summary.read_text())
    assert s["retried"] == 1 and s["set_aside"] == 0, s
    assert shard.read_bytes() == raw  # fetched again: the same imagery as the first run's
    assert product_chunks(tmp_path / "second.zarr") == product_chunks(data / "product.zarr")  # chunk for chunk
