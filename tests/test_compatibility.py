"""One compatibility rule between a model and imagery, the same answer in every command.

The rule (gum_ray.network.check_compatible): the imagery must carry every band the model needs;
extra bands are fine. So a 13-channel model refuses 11-band imagery everywhere (gum map, gum patches,
gum predict, gum finetune, the mapping stages), and a 10-channel model takes 14-band imagery
everywhere (gum map used to refuse it while gum patches and gum predict took it).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from odc.geo.geobox import GeoBox

from gum_ray.cli import main
from gum_ray.errors import CheckpointError
from gum_ray.grid import ProductGrid
from gum_ray.imagery import Imagery
from gum_ray.model import ModelSpec, random_checkpoint
from gum_ray.network import check_compatible, load_model, needs_products
from gum_ray.patches import PatchJob, parse_points, points_geojson, run_patches
from gum_ray.sources.synthetic import DEMO_LONLAT, SyntheticSource
from tests.helpers import random_export, write_export

TOWN_BBOX = ["--bbox", "8.571", "47.371", "8.579", "47.379"]
SMALL = ["--cell-deg", "0.01", "--chunk-px", "40", "--halo", "32", "--quiet", "--no-preview"]
RULE = "needs the bands worldcover_built, gisa_2019, wsf_2019"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    random_checkpoint(d / "c10.pth", ModelSpec(10, 8, 4), seed=3)
    random_checkpoint(d / "c13.pth", ModelSpec(13, 8, 4), seed=3)
    return d


def gum(*args) -> int:
    return main([str(a) for a in args])


def error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("gum: error: ")]
    assert len(err) == 1, err
    return err[0]


def test_the_rule_itself(ckpts):
    m10, m13 = load_model(ckpts / "c10.pth"), load_model(ckpts / "c13.pth")
    assert not needs_products(m10) and needs_products(m13)
    for model, with_products in [(m10, False), (m10, True), (m13, True)]:
        check_compatible(model, with_products)  # no error
    with pytest.raises(CheckpointError, match=RULE) as info:
        check_compatible(m13, False, what="the imagery")
    assert info.value.param == "with_products" and isinstance(info.value, ValueError)


def test_a_13_channel_model_refuses_11_band_imagery_in_every_command(tmp_path, ckpts, capsys):
    c13 = ckpts / "c13.pth"
    # gum map (the synthetic source without --products)
    assert gum("map", *TOWN_BBOX, "--year", "2021", "--data-dir", tmp_path / "m", "--checkpoint", c13, *SMALL) == 2
    lines = [error_line(capsys)]
    # gum patches
    (tmp_path / "pts.geojson").write_text(json.dumps(points_geojson([("a", *DEMO_LONLAT)])))
    assert gum("patches", "--points", tmp_path / "pts.geojson", "--year", "2021", "--out", tmp_path / "p",
               "--checkpoint", c13, "--quiet") == 2
    lines.append(error_line(capsys))
    # gum predict (an 11-band export)
    write_export(tmp_path / "x.tif", random_export(40, 50))
    assert gum("predict", tmp_path / "x.tif", tmp_path / "y.tif", "--checkpoint", c13, "--quiet") == 2
    lines.append(error_line(capsys))
    for line in lines:
        assert RULE in line and "--products" in line and "with_products" not in line, line
    assert not (tmp_path / "m").exists() and not (tmp_path / "y.tif").exists()


def test_the_mapping_stage_asks_the_same_rule(tmp_path, ckpts):
    from gum_ray.grid import parse_aoi
    from gum_ray.mapping.job import MapJob
    from gum_ray.mapping.stages import CellPredictor
    job = MapJob(aoi=parse_aoi(bbox=(8.571, 47.371, 8.579, 47.379)), years=(2021,), product=str(tmp_path / "p"),
                 cache=str(tmp_path / "c"), grid=ProductGrid(0.01, 40), halo_px=32)
    cell = job.grid.cell_at(8.575, 47.375)
    gbox = cell.utm_geobox(job.halo_px)
    job.imagery_cache().put(2021, cell, SyntheticSource().fetch(gbox, 2021))
    with pytest.raises(CheckpointError, match=RULE):
        CellPredictor(job, str(ckpts / "c13.pth")).predict(2021, cell.row, cell.col)
    pred = CellPredictor(job, str(ckpts / "c10.pth")).predict(2021, cell.row, cell.col)
    assert pred.geobox == gbox and pred.probability.dtype == np.float16


def test_a_10_channel_model_takes_14_band_imagery_in_every_command(tmp_path, ckpts, capsys):
    c10 = ckpts / "c10.pth"
    # gum map with --products gets past the check (it stops later, at the unreachable Ray address)
    assert gum("map", *TOWN_BBOX, "--year", "2021", "--data-dir", tmp_path / "m", "--checkpoint", c10,
               "--products", "--ray-address", "127.0.0.1:1", *SMALL) == 2
    assert "Ray cluster" in error_line(capsys)
    # gum patches with the products
    pts = tuple(parse_points(points_geojson([("a", *DEMO_LONLAT)])))
    report = run_patches(PatchJob(pts, 2021, str(tmp_path / "p"), checkpoint=str(c10),
                                  source_options=(("with_products", True),), geotiff=False), executor="inline")
    assert report.written == 1
    # gum predict on a 14-band export
    write_export(tmp_path / "x.tif", random_export(40, 50, bands=14))
    assert gum("predict", tmp_path / "x.tif", tmp_path / "y.tif", "--checkpoint", c10, "--quiet") == 0
    # and the engine on 14-band imagery
    from gum_ray.inference import InferenceEngine, InferenceSettings

    gb = GeoBox.from_bbox((467190, 5246400, 467690, 5246800), "EPSG:32632", resolution=10)  # 40 x 50
    img = Imagery.from_export(random_export(40, 50, bands=14), gb)
    pred = InferenceEngine(load_model(c10), InferenceSettings(precision="fp32")).predict_imagery(img)
    assert pred.probability.shape == (40, 50) and np.isfinite(pred.probability).all()
