"""`gum map --model gum2` end to end on the cloudy synthetic world, then the same cached area re-mapped
with GUM 1 into a new product without fetching again: GUM 2.0 maps the pixels under cloud that GUM 1
writes as no data, and both products carry the same input-quality band."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gum_ray.cli import main
from gum_ray.grid import ProductGrid
from gum_ray.imagery import NODATA
from gum_ray.store.product import ProductStore
from gum_ray.store.quality import QUALITY

YEAR = "2022"  # the cell is 40 % under the world's clouds in 2022, town pixels too
TOWN = ["--bbox", "8.571", "47.371", "8.579", "47.379"]  # one 0.01-degree cell
SMALL = ["--cell-deg", "0.01", "--chunk-px", "40", "--halo", "32", "--quiet", "--no-preview",
         "--precision", "fp32", "--source-option", "clouds=true"]
GRID = ProductGrid(cell_deg=0.01, chunk_px=40)


def marker(product: Path, cell) -> dict:
    return json.loads((product / "_manifest" / YEAR / f"{cell.id}.json").read_text())


def test_gum_map_model_gum2_then_remap_the_cache_with_gum1(tmp_path, gum2_demo_model):
    cache = tmp_path / "imagery-cache"
    p2, p1 = tmp_path / "gum2.zarr", tmp_path / "gum1.zarr"
    # no --checkpoint: the synthetic source's demo model of the family asked for
    assert main(["map", *TOWN, "--year", YEAR, "--model", "gum2", "--product", str(p2), "--cache", str(cache),
                 "--keep-cache", *SMALL]) == 0
    # the same area with the other family: a new product over the same imagery cache
    assert main(["map", *TOWN, "--year", YEAR, "--product", str(p1), "--cache", str(cache), *SMALL]) == 0
    cell = GRID.cell_at(8.575, 47.375)
    m2, m1 = marker(p2, cell), marker(p1, cell)
    assert m2["model_family"] == "gum2" and m1["model_family"] == "gum1"
    assert m2["times"]["fetched"] is True and m1["times"]["fetched"] is False  # not fetched again
    prod2, prod1 = ProductStore.open(str(p2)), ProductStore.open(str(p1))
    q2 = prod2.read_window(int(YEAR), cell.y_slice, cell.x_slice, variable=QUALITY)
    q1 = prod1.read_window(int(YEAR), cell.y_slice, cell.x_slice, variable=QUALITY)
    np.testing.assert_array_equal(q1, q2)  # the band describes the imagery, not the model
    no_s2 = q2 == 6  # Sentinel-1 and terrain only: under the clouds
    assert 0.1 < no_s2.mean() < 0.9 and ((q2 == 7) | no_s2).all()
    pr2 = prod2.read_cell(int(YEAR), cell)
    pr1 = prod1.read_cell(int(YEAR), cell)
    assert (pr2 != NODATA).all()  # GUM 2.0 maps every pixel, clouded or not
    # GUM 1 writes no data under the clouds (bar the warp's border pixels) and maps the rest
    assert (pr1[no_s2] == NODATA).mean() > 0.9 and (pr1[~no_s2] != NODATA).mean() > 0.9


def test_the_corruption_scheme_zeroes_whole_modalities_or_cloud_patches():
    import dataclasses

    import torch

    from gum_ray.demo_gum2 import Gum2DemoRecipe, corrupt, simulated_clouds

    rng = np.random.default_rng(0)
    for cover in (0.2, 0.5, 0.8):
        assert abs(simulated_clouds(rng, cover).mean() - cover) < 0.01
    recipe = Gum2DemoRecipe()
    x = torch.rand(64, 10, 64, 64) + 0.1  # no zeros before
    kinds = corrupt(x, rng, recipe)
    assert set(kinds) == {"clean", "no_s2", "no_s1", "clouds"}
    for b, k in enumerate(kinds):
        s2_zero, s1_zero = (x[b, :4] == 0).float().mean(), (x[b, 4:8] == 0).float().mean()
        assert (k, float(s1_zero)) == (k, 1.0 if k == "no_s1" else 0.0)
        if k == "no_s2":
            assert s2_zero == 1.0
        elif k == "clouds":
            assert 0.15 < s2_zero < 0.85 and (x[b, :4] == 0).all(0).float().mean() == s2_zero
        else:
            assert s2_zero == 0.0
        assert (x[b, 8:] > 0).all()  # terrain is never taken away
    with pytest.raises(Exception, match="corruption fractions"):
        dataclasses.replace(recipe, no_s2_fraction=0.6, cloud_fraction=0.6)
