#!/usr/bin/env python
"""One GUM 1 crop (256 x 256, batch 1, fp32) through each convolution path torch offers on this CPU,
best of N, side by side: what the engine could choose from when there is no native bf16.

  NCHW (oneDNN)                 the seed's arithmetic (mmseg's layout)
  channels_last + BN folded     gum-ray's default layout
  ... + torch.compile freezing  inductor with frozen weights (oneDNN prepacked convs)
  oneDNN off                    ATen / NNPACK convolutions

Run it AVX2-only with ``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2`` to see an AVX2 CPU.

    .venv/bin/python tools/bench_conv_paths.py [--repeats 3] [--no-compile]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gum_ray.inference import fold_batchnorm  # noqa: E402
from gum_ray.model import GUM_10, Gum1, build_model, randomize  # noqa: E402


def best(fn, x, repeats: int) -> tuple[float, torch.Tensor]:
    with torch.inference_mode():
        y = fn(x)
        t_best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            y = fn(x)
            t_best = min(t_best, time.perf_counter() - t)
    return t_best, y


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    model = Gum1.from_module(randomize(build_model(GUM_10), 3))
    net = model.module.eval()
    x = torch.rand(1, 10, 256, 256)
    xcl = x.contiguous(memory_format=torch.channels_last)
    rows = []
    t0, y0 = best(model.forward, x, args.repeats)
    rows.append(("NCHW (oneDNN, the seed's)", t0, 0.0))
    folded = Gum1.from_module(copy.deepcopy(net))
    fold_batchnorm(folded.module)
    folded.module.to(memory_format=torch.channels_last)
    t1, y1 = best(folded.forward, xcl, args.repeats)
    rows.append(("channels_last + BN folded", t1, (y1 - y0).abs().max().item()))
    if not args.no_compile:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
        compiled = torch.compile(folded.forward)
        tc = time.perf_counter()
        with torch.inference_mode():
            compiled(xcl)
        tc = time.perf_counter() - tc
        t2, y2 = best(compiled, xcl, args.repeats)
        rows.append((f"+ torch.compile, freezing ({tc:.0f} s to compile)", t2, (y2 - y0).abs().max().item()))
    torch.backends.mkldnn.enabled = False
    t3, y3 = best(model.forward, x, args.repeats)
    rows.append(("oneDNN off (ATen / NNPACK)", t3, (y3 - y0).abs().max().item()))
    print(f"# bench_conv_paths  {time.strftime('%Y-%m-%d %H:%M')}  torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, one GUM 1 crop, fp32, best of {args.repeats}")
    print(f"{'path':<44} {'s/crop':>7} {'x NCHW':>7} {'max |logit diff|':>17}")
    for name, t, d in rows:
        print(f"{name:<44} {t:>7.3f} {t0 / t:>7.2f} {d:>17.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
