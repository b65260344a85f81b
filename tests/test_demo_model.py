"""The demo model: recipe, cache, a short honest training run, and (slow) held-out IoU >= 0.9."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from gum_ray import cli
from gum_ray.demo_model import (
    DEMO_SPEC,
    HELD_OUT_AREAS,
    TRAIN_AREAS,
    DemoRecipe,
    default_path,
    ensure_demo_model,
    train_demo_model,
)
from gum_ray.errors import InputError
from gum_ray.model import load_checkpoint


def test_recipe_keeps_held_out_areas_away_from_training_and_names_the_cache(monkeypatch, tmp_path):
    with pytest.raises(InputError, match="disjoint"):
        DemoRecipe(held_out_areas=(("near-paris", 2.5, 48.1),))
    r = DemoRecipe()
    assert r.hash() == DemoRecipe().hash()
    assert r.hash() != DemoRecipe(steps=r.steps + 1).hash()
    assert r.hash() == DemoRecipe(max_train_seconds=1.0).hash()  # a safety stop, not the recipe
    monkeypatch.delenv("GUM_DEMO_MODEL", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_path() == tmp_path / "gum-ray" / "demo-model" / f"{r.hash()}.pth"
    monkeypatch.setenv("GUM_DEMO_MODEL", str(tmp_path / "mine.pth"))
    assert default_path() == tmp_path / "mine.pth"


def test_ensure_returns_a_cached_file_without_training(monkeypatch, tmp_path):
    import gum_ray.demo_model as dm

    cached = tmp_path / "demo.pth"
    cached.write_bytes(b"x")

    def boom(*a, **k):
        raise AssertionError("must not train")

    monkeypatch.setattr(dm, "train_demo_model", boom)
    assert ensure_demo_model(cached) == cached
    monkeypatch.setenv("GUM_DEMO_MODEL", str(cached))
    assert ensure_demo_model() == cached


def test_a_short_training_run_writes_a_loadable_reduced_width_gum_checkpoint(tmp_path):
    recipe = DemoRecipe(steps=3, train_areas=TRAIN_AREAS[:2], train_years=(2021,), train_area_px=256,
                        held_out_areas=HELD_OUT_AREAS[:1], held_out_area_px=256, batch_size=2)
    lines: list[str] = []
    out = ensure_demo_model(tmp_path / "tiny.pth", recipe, echo=lines.append)
    assert out.exists() and any("training the demo model" in m for m in lines)
    loaded = load_checkpoint(out)
    assert loaded.spec == DEMO_SPEC
    demo = loaded.meta["gum_ray_demo"]
    assert demo["steps_done"] == 3 and demo["recipe"]["spec"] == DEMO_SPEC.as_dict()
    assert demo["recipe_hash"] == recipe.hash()
    assert set(demo["held_out"]["per_area"]) == {"demo"}
    assert loaded.meta["gum_ray_spec"] == DEMO_SPEC.as_dict()
    # the time budget stops training (and the schedule still ends annealed)
    res = train_demo_model(tmp_path / "timed.pth", dataclasses.replace(recipe, steps=1000, max_train_seconds=0.5))
    assert 1 <= res.steps < 1000


def _held_out_iou(checkpoint: Path) -> tuple[float, dict[str, float]]:
    """Urban IoU on the held-out areas, computed here from the synthetic world's ground truth."""
    from gum_ray.bands import preprocess
    from gum_ray.inference import InferenceEngine
    from gum_ray.patches import point_geobox
    from gum_ray.sources.synthetic import SyntheticSource, ground_truth

    engine = InferenceEngine(load_checkpoint(checkpoint).model)
    inter = union = 0
    per_area = {}
    for name, lon, lat in HELD_OUT_AREAS:
        gb = point_geobox(lon, lat, size=768)
        pred = engine.predict(preprocess(SyntheticSource().fetch(gb, 2021).export)).label.astype(bool)
        truth = ground_truth(gb, 2021)
        i, u = int((pred & truth).sum()), int((pred | truth).sum())
        per_area[name] = i / u
        inter, union = inter + i, union + u
    return inter / union, per_area


@pytest.mark.slow
def test_the_demo_model_reaches_iou_0_9_on_held_out_areas(capsys):
    """Trains the demo model once per machine (a few minutes), then measures it on areas it never saw."""
    path = ensure_demo_model()
    iou, per_area = _held_out_iou(path)
    print(f"held-out IoU {iou:.4f}: {per_area}")
    assert iou >= 0.9, per_area
    # never trained on: every held-out area is far from every training area
    for _, lon, lat in HELD_OUT_AREAS:
        assert all(max(abs(lon - a), abs(lat - b)) >= 0.5 for _, a, b in TRAIN_AREAS)
    assert cli.main(["demo-model"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(path)
