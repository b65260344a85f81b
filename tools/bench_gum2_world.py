#!/usr/bin/env python
"""GUM 1 against GUM 2.0 on the synthetic world with clouds: no data, and IoU with and without S2.

Both demo models (trained, once per machine, on the cloud-free world; GUM 2.0 with the authors'
corruption scheme) predict the held-out places of the demo recipes (never trained on) with the
world's clouds on (``docs/synthetic_world.md``, "Clouds"), through the standard engine
(``InferenceEngine.predict_imagery``: each model's own preprocessing and validity; default settings,
fp32). Printed, as a Markdown table:

  clouded %       pixels without Sentinel-2 (the same for both models)
  no data %       pixels the model does not map (GUM 1: no S2; GUM 2.0: neither S2 nor S1)
  IoU mapped      urban IoU over the pixels the model maps
  IoU S2 present  ... over mapped pixels with Sentinel-2
  IoU S2 missing  ... over mapped pixels without Sentinel-2 (GUM 1 maps none)

then the same per held-out place.

    .venv/bin/python tools/bench_gum2_world.py [--year 2021] [--size 768]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gum_ray.demo_gum2 import ensure_gum2_demo_model, evaluate_model  # noqa: E402
from gum_ray.demo_model import HELD_OUT_AREAS, ensure_demo_model  # noqa: E402
from gum_ray.inference import InferenceSettings  # noqa: E402
from gum_ray.network import load_model  # noqa: E402


def fmt(m) -> str:
    """A Metrics' IoU, "-" where it scored no pixel (GUM 1 maps none without S2)."""
    return "-" if m.tp + m.fp + m.fn + m.tn == 0 else f"{m.iou:.3f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--year", type=int, default=2021)
    ap.add_argument("--size", type=int, default=768, help="side of each held-out area in 10 m px")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared 2-core machine two threads spin-wait)")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    settings = InferenceSettings(precision="fp32")
    rows = []
    for family, ensure in (("GUM 1", ensure_demo_model), ("GUM 2.0", ensure_gum2_demo_model)):
        model = load_model(ensure())
        rows.append((family, evaluate_model(model, HELD_OUT_AREAS, year=args.year, size=args.size, clouds=True,
                                            settings=settings)))
    print(f"synthetic world with clouds, {args.year}, held-out places "
          f"({', '.join(n for n, _, _ in HELD_OUT_AREAS)}), {args.size} x {args.size} px each\n")
    print("| demo model | clouded % | no data % | IoU mapped | IoU S2 present | IoU S2 missing |")
    print("|---|---|---|---|---|---|")
    for family, ev in rows:
        print(f"| {family} | {100 * ev.s2_missing_px / ev.pixels:.1f} | {100 * ev.nodata_share:.1f} | "
              f"{fmt(ev.all)} | {fmt(ev.s2_present)} | {fmt(ev.s2_missing)} |")
    print("\nper place: urban IoU over mapped pixels (GUM 1 / GUM 2.0)\n")
    print("| place | " + " | ".join(n for n, _, _ in HELD_OUT_AREAS) + " |")
    print("|---|" + "---|" * len(HELD_OUT_AREAS))
    for family, ev in rows:
        print(f"| {family} | " + " | ".join(fmt(ev.per_area[n]) for n, _, _ in HELD_OUT_AREAS) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
