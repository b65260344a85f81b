"""The two pixel containers (Imagery, Prediction) and the errors a library user can catch as builtins."""

from __future__ import annotations

import numpy as np
import pytest
from odc.geo.geobox import GeoBox

from gum_ray.commands import flagify
from gum_ray.errors import CheckpointError, CheckpointNotFoundError, InputError, NotFoundError, require_file
from gum_ray.imagery import NODATA, Imagery, Prediction
from gum_ray.sources.synthetic import render

GRID = GeoBox.from_bbox((467190, 5246400, 467830, 5246880), "EPSG:32632", resolution=10)  # 64 x 48 px


@pytest.mark.parametrize("with_products", [False, True])
def test_compact_round_trip_keeps_the_parts_exactly(with_products):
    img, _ = render(GRID, 2021, with_products=with_products)
    img.export[4:8, :5, :7] = np.nan  # no Sentinel-1 here
    img = Imagery.from_export(img.export, GRID, {"source": "test"})
    parts = img.to_compact()
    assert set(parts) == {"s2", "s2_mask", "s1", "s1_mask", "terrain", "terrain_mask"} | (
        {"products"} if with_products else set())
    back = Imagery.from_compact(parts, GRID, img.provenance)
    # floats to the encoding's precision (aspect's -180 degree offset rounds in float32) ...
    np.testing.assert_allclose(back.export, img.export, rtol=1e-6, atol=0)
    assert (np.isnan(back.export) == np.isnan(img.export)).all()
    assert back.with_products is with_products and back.geobox == GRID
    for m in img.masks:
        np.testing.assert_array_equal(back.masks[m], img.masks[m])
    assert not back.masks["s1"][:5, :7].any() and back.masks["s2"][:5, :7].all()
    for k, v in parts.items():  # ... and the stored integers exactly
        np.testing.assert_array_equal(back.to_compact()[k], v)


def test_to_xarray_carries_the_grid_through_odc_geo():
    img, _ = render(GRID, 2021)
    ds = img.to_xarray()
    assert ds["export"].dims == ("band", "y", "x") and list(ds["band"].values)[:2] == ["B4", "B3"]
    assert ds.odc.geobox == GRID
    np.testing.assert_array_equal(ds["export"].values, img.export)
    np.testing.assert_array_equal(ds["s2_mask"].values, img.masks["s2"])
    assert '"source": "synthetic"' in ds.attrs["provenance"]


def test_imagery_refuses_arrays_that_do_not_fit_its_grid():
    with pytest.raises(ValueError, match="expected"):
        Imagery.from_export(np.zeros((11, 10, 10), np.float32), GRID)
    with pytest.raises(ValueError, match="float32"):
        Imagery(np.zeros((11,) + tuple(GRID.shape)), {"s2": 1, "s1": 1, "terrain": 1}, {}, GRID)


def test_prediction_percent_and_classes_mark_no_data():
    prob = np.array([[0.0, 0.504, 0.996], [0.5, 0.7, 0.2]], np.float32)
    label = (prob > 0.5).astype(np.uint8)
    valid = np.array([[True, True, True], [False, True, True]])
    pred = Prediction(prob, label).masked(valid)
    np.testing.assert_array_equal(pred.valid, valid)
    np.testing.assert_array_equal(pred.percent(), [[0, 50, 100], [NODATA, 70, 20]])
    np.testing.assert_array_equal(pred.classes(), [[0, 1, 1], [NODATA, 1, 0]])
    assert np.isfinite(prob).all()  # masking copies
    with pytest.raises(ValueError, match="probabilities only"):
        Prediction(prob).classes()


def test_errors_are_builtins_and_the_cli_names_flags(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        require_file(tmp_path / "nope.tif", label="input nope.tif", expect="a GeoTIFF")
    assert isinstance(info.value, NotFoundError) and isinstance(info.value, InputError)
    with pytest.raises(FileNotFoundError) as info:
        require_file(tmp_path / "c.pth", label="checkpoint c.pth", expect="a .pth", error=CheckpointError)
    assert isinstance(info.value, CheckpointNotFoundError) and isinstance(info.value, ValueError)
    err = InputError("stride 300: must be between 1 and 256 px", param="stride")
    assert flagify(err) == "--stride 300: must be between 1 and 256 px"
    err = InputError("halo_px -1: must be >= 0 px", param="halo_px")
    assert flagify(err) == "--halo -1: must be >= 0 px"
    assert flagify(InputError("no parameter here")) == "no parameter here"
