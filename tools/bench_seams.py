#!/usr/bin/env python
"""Seams versus cost: how much crop borders show, for strides 256/192/128, with and without blending.

For each setting the scene is predicted and compared with a dense reference (stride 64, Hann-blended
probabilities: every pixel seen by 16 crops, far from most crop borders). Pixels are split into
"border" (within --band px of a crop edge of that setting's grid, image edges excluded) and
"interior". Reported per setting:

  crops/Mpx      cost (crops per million image pixels)
  dis border %   class disagreement with the reference at border pixels
  dis interior % ... at interior pixels
  |dP| border    mean |P(urban) - reference| at border pixels (percentage points)
  |dP| interior  ... at interior pixels
  step ratio     mean |P(x) - P(x-1)| across crop-edge lines / across all other lines (1 = no seam)

    .venv/bin/python tools/bench_seams.py [--checkpoint CKPT | --family gum2] [--image TIF] [--precision fp32]

Any model family: the checkpoint's (read from the file), or random weights of ``--family`` (GUM 1 or
GUM 2.0 at their released widths, BN calibrated on the image).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gum_ray.export_io import open_export  # noqa: E402
from gum_ray.inference import CROP, InferenceEngine, InferenceSettings, crop_starts  # noqa: E402
from gum_ray.model import GUM_10, random_checkpoint  # noqa: E402
from gum_ray.network import load_model  # noqa: E402

DEFAULT_IMAGE = REPO.parent / "shared" / "realdata" / "aberystwyth_2021-05-27_gum11.tif"


def edge_lines(n: int, stride: int) -> np.ndarray:
    """Positions (between pixel i-1 and i) where a crop starts or ends, image edges excluded."""
    lines = set()
    for a in crop_starts(n, stride):
        lines.update({a, a + CROP})
    return np.array(sorted(v for v in lines if 0 < v < n), dtype=int)


def border_mask(h: int, w: int, stride: int, band: int) -> np.ndarray:
    m = np.zeros((h, w), bool)
    for y in edge_lines(h, stride):
        m[max(y - band, 0): y + band] = True
    for x in edge_lines(w, stride):
        m[:, max(x - band, 0): x + band] = True
    return m


def step_ratio(p: np.ndarray, stride: int) -> float:
    dx = np.abs(np.diff(p, axis=1))  # dx[:, i-1] = |p[:, i] - p[:, i-1]|
    dy = np.abs(np.diff(p, axis=0))
    ex, ey = edge_lines(p.shape[1], stride) - 1, edge_lines(p.shape[0], stride) - 1
    on = np.concatenate([dx[:, ex].ravel(), dy[ey].ravel()])
    offx = np.ones(dx.shape[1], bool)
    offx[ex] = False
    offy = np.ones(dy.shape[0], bool)
    offy[ey] = False
    off = np.concatenate([dx[:, offx].ravel(), dy[offy].ravel()])
    return float(on.mean() / max(off.mean(), 1e-12)) if on.size else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", default=str(DEFAULT_IMAGE))
    ap.add_argument("--checkpoint", default=None, help="default: random weights of --family calibrated on the image")
    ap.add_argument("--family", choices=("gum1", "gum2"), default="gum1",
                    help="the family of the random weights when no checkpoint is given (default gum1)")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--band", type=int, default=16, help="border band half-width in px")
    ap.add_argument("--strides", default="256,192,128")
    args = ap.parse_args()

    with open_export(args.image) as src:
        export = src.read_rows(0, src.height)
    if args.checkpoint is None:
        ckpt = Path(tempfile.mkdtemp()) / f"{args.family}_random.pth"
        if args.family == "gum2":
            from gum_ray.gum2 import Gum2, preprocess

            Gum2.random(seed=11, calibrate_on=preprocess(export)).save(ckpt)
        else:
            from gum_ray import bands

            random_checkpoint(ckpt, GUM_10, seed=11, calibrate_on=bands.preprocess(export))
        what = f"random {args.family} weights (BN calibrated on the image)"
    else:
        ckpt = Path(args.checkpoint)
        what = ckpt.name
    model = load_model(ckpt)
    what += f", family {model.family}"
    valid = model.validity(export)
    x = model.preprocess(export)
    h, w = valid.shape

    def run(**kw):
        eng = InferenceEngine(model, InferenceSettings(device="cpu", precision=args.precision, **kw))
        t = time.perf_counter()
        pred = eng.predict(x)
        return pred, eng.crops_run, time.perf_counter() - t

    ref, ref_crops, _ = run(stride=64, window="hann")
    print(f"# bench_seams {time.strftime('%Y-%m-%d')}: {Path(args.image).name} ({w} x {h}), {what}, "
          f"precision {args.precision}; reference stride 64 hann ({ref_crops} crops); border = within "
          f"{args.band} px of a crop edge")
    print(f"{'stride':>6} {'window':>6} {'crops/Mpx':>9} {'dis border %':>12} {'dis interior %':>14} "
          f"{'|dP| border':>11} {'|dP| interior':>13} {'step ratio':>10}")
    for stride in [int(s) for s in args.strides.split(",")]:
        for window in ("none", "hann"):
            if stride == CROP and window == "hann":
                pass  # still meaningful at the last, overlapping row/column
            pred, crops, _ = run(stride=stride, window=window)
            border = border_mask(h, w, stride, args.band) & valid
            interior = ~border_mask(h, w, stride, args.band) & valid
            dis = pred.label != ref.label
            dp = np.abs(pred.probability - ref.probability) * 100
            print(f"{stride:>6} {window:>6} {crops / (h * w / 1e6):>9.1f} {dis[border].mean() * 100:>12.2f} "
                  f"{dis[interior].mean() * 100:>14.2f} {dp[border].mean():>11.2f} {dp[interior].mean():>13.2f} "
                  f"{step_ratio(pred.probability, stride):>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
