"""The inference engine and training know a model only through gum_ray.network.UrbanModel.

A second, deliberately simple model family (a per-pixel linear model on two bands, its own
preprocessing and its own validity) runs through the same engine, training step and compatibility
rule as GUM 1, and its answer is known in closed form.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from odc.geo.geobox import GeoBox

from gum_ray.imagery import Imagery
from gum_ray.inference import InferenceEngine, InferenceSettings, flops_per_crop
from gum_ray.network import UrbanModel, check_compatible, needs_products
from gum_ray.training import freeze_encoder, train_step
from tests.helpers import random_export

GRID = GeoBox.from_bbox((467190, 5246400, 470190, 5249400), "EPSG:32632", resolution=10)  # 300 x 300


class NirModel:
    """logit(urban) - logit(other) = 4 * (0.3 - B8) + (slope / 90): no context, so blending is exact."""

    family = "nir-test"
    meta: dict[str, Any] = {}

    def __init__(self) -> None:
        conv = torch.nn.Conv2d(2, 2, 1)
        with torch.no_grad():
            conv.weight.zero_()
            conv.bias.zero_()
            conv.weight[1, 0] = -4.0  # B8
            conv.weight[1, 1] = 1.0  # slope / 90
            conv.bias[1] = 1.2
        self._module = torch.nn.Sequential(conv)

    in_channels = 2
    required_bands = ("B8", "slope")

    @property
    def module(self) -> torch.nn.Module:
        return self._module

    @property
    def encoder(self) -> torch.nn.Module:
        return self._module

    def preprocess(self, export: np.ndarray) -> np.ndarray:
        return np.nan_to_num(np.stack([export[3], export[9] / 90.0]).astype(np.float32))

    def validity(self, export: np.ndarray) -> np.ndarray:
        return np.isfinite(export[3])  # this family needs only B8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._module(x)

    def provenance(self) -> dict[str, Any]:
        return {"family": self.family, "checkpoint": None, "checkpoint_sha256": None}

    def save(self, path: Any, meta: dict[str, Any] | None = None) -> str:
        raise NotImplementedError("a test family is not saved")


def test_a_second_family_runs_through_the_engine_with_a_known_answer():
    model = NirModel()
    assert isinstance(model, UrbanModel) and not needs_products(model)
    check_compatible(model, False)
    export = random_export(300, 300)
    export[0:3, :20] = np.nan  # S2 visible bands missing: this family still maps the pixels
    export[3, -10:, :] = np.nan  # B8 missing: no data
    img = Imagery.from_export(export, GRID)
    engine = InferenceEngine(model, InferenceSettings(precision="fp32", stride=192))
    pred = engine.predict_imagery(img)
    assert pred.geobox == GRID
    z = 4 * (0.3 - export[3]) + export[9] / 90.0
    want = 1 / (1 + np.exp(-z))
    ok = np.isfinite(export[3])
    np.testing.assert_allclose(pred.probability[ok], want[ok], atol=1e-5)
    assert np.isnan(pred.probability[~ok]).all() and np.isfinite(pred.probability[:20, :]).all()
    np.testing.assert_array_equal(pred.classes()[ok], (want[ok] > 0.5).astype(np.uint8))
    assert engine.crops_run == 4  # 300 px at stride 192: 2 x 2 crops
    assert flops_per_crop(model) == 2 * 2 * 2 * 256 * 256  # one 1x1 conv, 2 -> 2 channels


def test_training_steps_and_freezing_use_only_the_interface():
    model = NirModel()
    x = torch.rand(2, 2, 256, 256)
    y = (x[:, 0] < 0.3).long()
    opt = torch.optim.SGD(model.module.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.module.parameters()]
    loss = train_step(model, opt, x, y, None)
    assert np.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.module.parameters()))
    assert freeze_encoder(model) == 2 and not any(p.requires_grad for p in model.module.parameters())
