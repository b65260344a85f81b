"""GUM 2.0 in ``gum patches`` (pseudo-labels) and ``gum finetune`` (the frozen-encoder option freezes
its three encoders); fp32, a width-8 model, two patches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gum_ray.errors import CheckpointError
from gum_ray.finetune import FinetuneSettings, finetune
from gum_ray.gum2 import Gum2
from gum_ray.network import load_model
from gum_ray.patches import PatchDataset, PatchJob, parse_points, points_geojson, run_patches
from gum_ray.sources.synthetic import DEMO_LONLAT, towns_near

YEAR = 2021


@pytest.fixture(scope="module")
def gum2_ckpt(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("g2") / "gum2_w8.pth"
    Gum2.random(8, seed=6, size=64).save(path)
    return str(path)


@pytest.fixture(scope="module")
def patches(tmp_path_factory, gum2_ckpt) -> str:
    towns = sorted(towns_near(*DEMO_LONLAT, radius_km=12.0, year=YEAR), key=lambda t: (t.lon, t.lat))[:3]
    pts = tuple(parse_points(points_geojson([(f"t{i}", t.lon, t.lat) for i, t in enumerate(towns)])))
    out = tmp_path_factory.mktemp("patches") / "p"
    job = PatchJob(pts, YEAR, str(out), checkpoint=gum2_ckpt, model="gum2", geotiff=False,
                   inference=None)
    report = run_patches(job, executor="inline")
    assert report.written == 3
    return str(out)


def test_gum_patches_labels_with_a_gum2_checkpoint(patches, gum2_ckpt):
    ds = PatchDataset(patches)
    assert ds.attrs["model_family"] == "gum2"
    assert ds.attrs["model_spec"] == {"in_channels": 10, "width": 8, "psp_channels": 2}
    assert ds.attrs["checkpoint_sha256"] == load_model(gum2_ckpt).provenance()["checkpoint_sha256"]
    for key in ds.complete_keys():
        rec = ds.read(key)
        assert set(np.unique(rec.cls)) <= {0, 1}, "every pixel of a synthetic patch has imagery"


def test_gum_patches_refuses_a_gum2_checkpoint_forced_as_gum1(tmp_path, gum2_ckpt):
    pts = tuple(parse_points(points_geojson([("a", *DEMO_LONLAT)])))
    with pytest.raises(CheckpointError, match="is a GUM 2.0 checkpoint, not the GUM 1 asked for"):
        run_patches(PatchJob(pts, YEAR, str(tmp_path / "p"), checkpoint=gum2_ckpt, model="gum1"),
                    executor="inline")
    assert not (tmp_path / "p").exists()


def test_finetune_from_gum2_with_the_encoders_frozen(tmp_path, patches, gum2_ckpt):
    start = load_model(gum2_ckpt)
    out = tmp_path / "tuned2.pth"
    settings = FinetuneSettings(epochs=1, batch_size=2, lr=1e-3, val_fraction=0.34, freeze_encoder=True,
                                precision="fp32", device="cpu", model="gum2", keep="last")
    res = finetune(gum2_ckpt, patches, out, settings, echo=None)
    assert res.path == str(out)
    tuned = load_model(out)
    assert isinstance(tuned, Gum2) and tuned.spec == start.spec
    before, after = start.module.state_dict(), tuned.module.state_dict()
    encoders = ("s2_encoder.", "s1_encoder.", "topo_encoder.")
    # the three encoders (weights and BN statistics) are unchanged; the fusion, decoder or head moved
    for k, v in before.items():
        if k.startswith(encoders):
            assert torch.equal(after[k], v), k
    assert any(not torch.equal(after[k], v) for k, v in before.items() if not k.startswith(encoders))
    assert tuned.meta["gum_ray_finetune"]["settings"]["freeze_encoder"] is True


def test_gum_patches_labels_clouded_points_under_gum2_and_sets_them_aside_under_gum1(tmp_path, gum2_ckpt):
    """A point in Quito's cell, overcast in the cloudy synthetic world in 2021: no Sentinel-2 at all."""
    from gum_ray.grid import point_geobox
    from gum_ray.model import ModelSpec, random_checkpoint
    from gum_ray.sources.synthetic import SyntheticSource

    quito = (-78.4, -0.1)
    pts = tuple(parse_points(points_geojson([("q", *quito)])))
    probe = SyntheticSource(clouds=True).fetch(point_geobox(*quito, size=256), YEAR)
    assert not probe.masks["s2"].any() and probe.masks["s1"].all()
    gum1 = tmp_path / "gum1.pth"
    random_checkpoint(gum1, ModelSpec(10, 8, 4), seed=1)
    for ckpt, model, written in ((gum2_ckpt, "gum2", 1), (str(gum1), "gum1", 0)):
        job = PatchJob(pts, YEAR, str(tmp_path / model), checkpoint=ckpt, model=model, geotiff=False,
                       inference=None, source_options=(("clouds", True),))
        report = run_patches(job, executor="inline")
        assert report.written == written, (model, report)
        assert len(report.no_imagery) == 1 - written
