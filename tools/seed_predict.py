#!/usr/bin/env python
"""The seed notebook's prediction of one GUM export, as a user of the notebook runs it (a benchmark
baseline for ``tools/bench_predict.py``): read the GeoTIFF, preprocess (the notebook's arithmetic),
mmseg ``init_model`` + ``test_step([tensor])`` (slide 256/256, batch 1, fp32), write the class map as
a GeoTIFF.

    .venv/bin/python tools/seed_predict.py INPUT.tif OUTPUT.tif CONFIG.py CHECKPOINT.pth
"""

from __future__ import annotations

import sys


def main() -> int:
    inp, out, config, ckpt = sys.argv[1:5]
    import numpy as np
    import rasterio
    import torch
    from mmseg.apis import init_model

    with rasterio.open(inp) as src:
        export = src.read().astype(np.float32)
        profile = src.profile
    x = np.nan_to_num(export, nan=0.0, posinf=0.0, neginf=0.0)
    s2 = np.clip(x[0:4], 0, 1)
    s1 = (np.clip(x[4:8], -25, 0) + 25) / 25
    slope = np.clip(x[9:10] / 90, 0, 1)
    aspect = np.clip(x[10:11] / 360, 0, 1)
    img = np.concatenate([s2, s1, slope, aspect]).astype(np.float32)
    model = init_model(config, ckpt, device="cpu")
    with torch.no_grad():
        result = model.test_step([torch.from_numpy(img)[None]])
    label = result[0].pred_sem_seg.data[0].numpy().astype(np.uint8)
    profile.update(count=1, dtype="uint8", nodata=None, compress="deflate")
    with rasterio.open(out, "w", **profile) as dst:
        dst.write(label, 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
