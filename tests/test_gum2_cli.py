"""GUM 2.0 on the command line: ``gum predict`` reads the family from the checkpoint (or ``--model``),
records it, and every bad input is one clear line, exit code 2, nothing written, no traceback."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
import torch

from gum_ray.gum2 import Gum2
from gum_ray.model import ModelSpec, random_checkpoint
from tests.helpers import random_export, write_export
from tests.hostile import error_lines, gum_cli


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A GUM 1 checkpoint and GUM 2.0 checkpoints (width 8), good and broken, in the authors' layout."""
    d = tmp_path_factory.mktemp("ckpts")
    random_checkpoint(d / "gum1.pth", ModelSpec(10, 8, 4), seed=1)
    good = Gum2.random(8, seed=1, size=32)
    good.save(d / "gum2.pth")
    sd = {k: v.clone() for k, v in good.module.state_dict().items()}

    def broken(name: str, edit) -> None:
        s = dict(sd)
        edit(s)
        torch.save({"epoch": 1, "state_dict": s, "lr": 1e-4}, d / name)

    broken("missing.pth", lambda s: s.pop("s1_encoder.encoder.layer3.1.bn2.running_var"))
    broken("misshapen.pth", lambda s: s.update({"ffm.0.out.0.weight": torch.zeros(8, 16, 1, 1)}))
    broken("unknown.pth", lambda s: s.update({"aux_head.conv.weight": torch.zeros(2, 8, 1, 1)}))
    return d


@pytest.fixture
def scene(tmp_path):
    export = random_export(64, 80, bands=14)
    export[0:4, :, :20] = np.nan  # no Sentinel-2 on the left: GUM 2.0 still maps it
    export[0:8, :10, :10] = np.nan  # no S2 and no S1: no data
    return write_export(tmp_path / "scene14.tif", export)


def test_gum_predict_reads_the_family_from_the_checkpoint_and_records_it(tmp_path, ckpts, scene):
    out = tmp_path / "out.tif"
    r = gum_cli("predict", scene, out, "--checkpoint", ckpts / "gum2.pth", "--precision", "fp32", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    with rasterio.open(out) as src:
        tags, label = src.tags(), src.read(2)
    assert tags["model_family"] == "gum2" and tags["model_channels"] == "10"
    assert (label[:10, :10] == 255).all(), "neither S2 nor S1: no data"
    assert (label[10:, :20] != 255).all(), "no S2 but S1: mapped under GUM 2.0"
    assert (label[:, 20:] != 255).all()


@pytest.mark.parametrize(
    "case, want",
    [
        ("gum1_forced_as_gum2", "is a GUM 1 checkpoint, not the GUM 2.0 asked for (--model gum2)"),
        ("missing", "key 's1_encoder.encoder.layer3.1.bn2.running_var' of the GUM 2.0 network (width 8) is missing"),
        ("misshapen", "key 'ffm.0.out.0.weight' has shape (8, 16, 1, 1), the GUM 2.0 network (width 8) needs (8, 24, 1, 1)"),
        ("unknown", "unexpected key 'aux_head.conv.weight': not part of the GUM 2.0 network (width 8)"),
        ("products", "is GUM 2.0, which has no 'with products' variant"),
    ],
)
def test_bad_gum2_input_is_one_line_and_writes_nothing(tmp_path, ckpts, scene, case, want):
    ckpt = {"gum1_forced_as_gum2": "gum1.pth", "products": "gum2.pth"}.get(case, f"{case}.pth")
    extra = {"gum1_forced_as_gum2": ["--model", "gum2"], "products": ["--products", "yes"]}.get(case, [])
    out = tmp_path / "out"
    out.mkdir()
    r = gum_cli("predict", scene, out / "x.tif", "--checkpoint", ckpts / ckpt, "--quiet", *extra)
    lines = error_lines(r.stderr)
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith("gum: error: ") and want in lines[0], lines
    assert "Traceback" not in r.stderr
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("command", ["map", "patches", "finetune"])
def test_every_command_that_takes_a_checkpoint_refuses_the_wrong_forced_family(tmp_path, ckpts, command):
    out = tmp_path / "out"
    args = {
        "map": ["map", "--bbox", "7.60", "47.55", "7.62", "47.57", "--year", "2021", "--data-dir", out,
                "--checkpoint", ckpts / "gum1.pth", "--no-preview", "--quiet"],
        "patches": ["patches", "--points", tmp_path / "pts.geojson", "--year", "2021", "--out", out,
                    "--checkpoint", ckpts / "gum1.pth", "--quiet"],
        "finetune": ["finetune", "--init", ckpts / "gum1.pth", "--data", tmp_path / "none", "--out",
                     tmp_path / "tuned.pth", "--quiet"],
    }[command]
    (tmp_path / "pts.geojson").write_text(
        '{"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {"id": "a"}, '
        '"geometry": {"type": "Point", "coordinates": [7.61, 47.56]}}]}')
    r = gum_cli(*args, "--model", "gum2")
    lines = error_lines(r.stderr)
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and "is a GUM 1 checkpoint, not the GUM 2.0 asked for (--model gum2)" in lines[0], lines
    assert not out.exists() and not (tmp_path / "tuned.pth").exists()
