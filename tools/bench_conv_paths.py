#!/usr/bin/env python
"""One GUM 1 crop (256 x 256, batch 1, fp32) through each convolution path torch offers on this CPU,
best of N, side by side: what the engine could choose from when there is no native bf16.

  NCHW (oneDNN)                 the seed's arithmetic (mmseg's layout)
  channels_last + BN folded     gum-ray's layout (with the 1 x 1 upsample convs run first)
  ... + Winograd                gum-ray's fp32 CPU default: the deep 3 x 3 convs by Winograd
  ... + torch.compile freezing  inductor with frozen weights (oneDNN prepacked convs)
  oneDNN off                    ATen / NNPACK convolutions

``--layers`` adds, per 3 x 3 convolution of the folded network, its time direct (oneDNN) and by
Winograd on the input it gets in a 256 x 256 crop (with the engine's tile where the engine uses
Winograd, else F(4x4, 3x3)), and what the engine runs.

Run it AVX2-only with ``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2``
to see an AVX2 CPU.

    .venv/bin/python tools/bench_conv_paths.py [--repeats 3] [--no-compile] [--layers]
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

from gum_ray.model import GUM_10, Gum1, build_model, randomize  # noqa: E402
from gum_ray.unet import conv_before_upsample, fold_batchnorm  # noqa: E402
from gum_ray.winograd import WinogradConv2d, eligible, use_winograd  # noqa: E402


def best(fn, x, repeats: int) -> tuple[float, torch.Tensor]:
    with torch.inference_mode():
        y = fn(x)
        t_best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            y = fn(x)
            t_best = min(t_best, time.perf_counter() - t)
    return t_best, y


def per_layer(folded: torch.nn.Module, wino: torch.nn.Module, x: torch.Tensor, repeats: int) -> list:
    """(name, 'in->out @side', direct s, Winograd s, the engine's rule takes it) per 3 x 3 conv."""
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: shapes.setdefault(n, tuple(inp[0].shape)) and None)
             for n, m in folded.named_modules() if eligible(m)]
    with torch.inference_mode():
        folded(x)
    for h in hooks:
        h.remove()
    convs, swapped = dict(folded.named_modules()), dict(wino.named_modules())
    out = []
    for name, shape in shapes.items():
        conv = convs[name]
        xi = torch.rand(shape).contiguous(memory_format=torch.channels_last)
        td, _ = best(conv, xi, repeats)
        rule = swapped[name]
        tile = rule.tile if isinstance(rule, WinogradConv2d) else 0
        trial = WinogradConv2d(conv, min_tiles=1)  # the engine's tile where it uses one, else 4 x 4
        if tile:
            trial.prepare(tile)
        tw, _ = best(trial, xi, repeats)
        out.append((name, f"{conv.in_channels}->{conv.out_channels} @{shape[-1]}", td, tw,
                    f"F({tile}x{tile})" if tile else "direct"))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--layers", action="store_true", help="per 3 x 3 conv: direct against Winograd")
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
    conv_before_upsample(folded.module)
    folded.module.to(memory_format=torch.channels_last)
    t1, y1 = best(folded.forward, xcl, args.repeats)
    rows.append(("channels_last + BN folded", t1, (y1 - y0).abs().max().item()))
    wino = Gum1.from_module(copy.deepcopy(folded.module))
    use_winograd(wino.module)
    tw, yw = best(wino.forward, xcl, args.repeats)
    rows.append(("+ Winograd (the fp32 CPU default)", tw, (yw - y0).abs().max().item()))
    layer_rows = per_layer(folded.module, wino.module, xcl, args.repeats) if args.layers else []
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
    if layer_rows:
        print(f"{'3 x 3 conv (folded network)':<44} {'in->out @px':>14} {'direct ms':>10} {'Winograd ms':>12} "
              f"{'gain':>6}  engine")
        for name, shape, td, tw, engine in layer_rows:
            print(f"{name:<44} {shape:>14} {td * 1e3:>10.1f} {tw * 1e3:>12.1f} {td / tw:>6.2f}  {engine}")
        print(f"{'sum':<44} {'':>14} {sum(r[2] for r in layer_rows) * 1e3:>10.1f} "
              f"{sum(r[3] for r in layer_rows) * 1e3:>12.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
