"""At the seed's settings gum-ray reproduces mmsegmentation's own path to the pixel (DESIGN 4)."""

import numpy as np
import pytest
import torch

from gum_ray import bands
from gum_ray.export_io import open_export
from gum_ray.inference import InferenceEngine, InferenceSettings
from gum_ray.model import CONFIG_DIR, GUM_10, load_checkpoint, random_checkpoint
from tests.helpers import require_realdata


def seed_notebook_classes(config: str, checkpoint: str, export: np.ndarray) -> np.ndarray:
    """The seed Colab notebook's prediction: init_model + test_step([tensor]), slide 256/256."""
    from mmseg.apis import init_model

    model = init_model(config, checkpoint, device="cpu")
    x = torch.from_numpy(bands.preprocess(export))[None]
    with torch.no_grad():
        result = model.test_step([x])
    return result[0].pred_sem_seg.data[0].numpy().astype(np.uint8)


@pytest.mark.slow
def test_seed_settings_equal_mmseg_test_step_on_real_imagery(tmp_path):
    path = require_realdata()
    with open_export(path) as src:
        export = src.read_rows(0, src.height)
    ckpt = tmp_path / "gum_random.pth"
    random_checkpoint(ckpt, GUM_10, seed=11, calibrate_on=bands.preprocess(export))
    reference = seed_notebook_classes(str(CONFIG_DIR / "gum_unet_psp.py"), str(ckpt), export)
    assert 0.02 < reference.mean() < 0.98, "random weights must give both classes"

    loaded = load_checkpoint(ckpt)
    engine = InferenceEngine(loaded.model, InferenceSettings.seed(device="cpu"))
    pred = engine.predict(bands.preprocess(export))
    mismatches = int((pred.label != reference).sum())
    assert mismatches == 0, f"{mismatches} pixels differ from mmseg's own path"
