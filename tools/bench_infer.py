#!/usr/bin/env python
"""Inference speed, side by side in one run, on the same image and the same (random) GUM weights.

  (a)  the seed notebook's path: mmseg init_model + test_step([tensor]), slide 256/256, batch 1, fp32
  (b)  gum-ray at the seed's settings (stride 256, no window, logits averaged, fp32, NCHW, batch 1):
       bit-exact with (a), so the same kernels
  (b') gum-ray, the seed's crop geometry (stride 256) with mixed precision + channels_last + BN folded
  (c)  gum-ray at its defaults (stride 192, Hann-blended probabilities, precision auto)
  (g)  the whole cell path: the scene as compact integers (as the imagery cache holds them) ->
       upload -> decode + preprocess + crops + blend + threshold on the device -> P(urban) back,
       defaults: the number the GPU goal (>= 35 % of bf16 peak for the whole cell path) is about
  (f)  the batched forward alone (random crops already on the device, batch --forward-batch,
       precision auto), in NCHW and in channels_last with BN folded (what the defaults choose), and
       compiled with --compile: the engine's ceiling per layout

and the same rows (b), (b'), (c), (f) for GUM 2.0 (``--family``; random weights of the released width,
BN calibrated on the image): its seed settings equal the authors' notebook (asserted by
tests/test_gum2.py), so (b) is the notebook's arithmetic, batched.

Mpx/s counts image pixels per second (crops overlap, so crop pixels are more). MFU = model FLOPs
(GUM 1: 1.51 MFLOP per crop pixel, GUM 2.0: 1.08) per second / peak: on CUDA the nominal dense peak of the device for the
precision; on the CPU the measured rate of a large GEMM in the same precision (a practical peak).

    .venv/bin/python tools/bench_infer.py                     # CPU, the Aberystwyth scene
    .venv/bin/python tools/bench_infer.py --device cuda       # on a GPU
    .venv/bin/python tools/bench_infer.py --family gum2       # GUM 2.0 rows only
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gum_ray import bands  # noqa: E402
from gum_ray.inference import (CROP, InferenceEngine, InferenceSettings, crop_count,  # noqa: E402
                               default_batch_size, flops_per_crop, resolve_precision)
from gum_ray.gum2 import GUM2_RELEASED, Gum2  # noqa: E402
from gum_ray.model import CONFIG_DIR, GUM_10, load_checkpoint, random_checkpoint  # noqa: E402

DEFAULT_IMAGE = REPO.parent / "shared" / "realdata" / "aberystwyth_2021-05-27_gum11.tif"
# nominal dense tensor-core peaks, FLOP/s
CUDA_PEAKS = {"H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
              "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
              "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12}}


def gemm_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_flops(device: torch.device, precision: str) -> tuple[float, str]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peaks in CUDA_PEAKS.items():
            if key in name:
                return peaks[precision], f"{key} nominal dense {precision}"
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
        return gemm_peak(device, dtype, 8192), f"measured {precision} GEMM"
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(precision, torch.float32)
    return gemm_peak(device, dtype), f"measured {precision} GEMM on {torch.get_num_threads()} threads"


def run_seed(config: str, ckpt: str, export: np.ndarray, device: str) -> tuple[float, np.ndarray]:
    from mmseg.apis import init_model

    model = init_model(config, ckpt, device=device)
    t = time.perf_counter()
    x = torch.from_numpy(bands.preprocess(export))[None]
    with torch.no_grad():
        result = model.test_step([x])
    label = result[0].pred_sem_seg.data[0].cpu().numpy()
    sync(torch.device(device))
    return time.perf_counter() - t, label


def run_engine(model, settings: InferenceSettings, export: np.ndarray):
    engine = InferenceEngine(model, settings)
    # warm-up on one crop (kernels, autocast caches); not timed, as the seed's model init is not
    engine.predict(engine.model.preprocess(export[:, :CROP, :CROP]))
    t = time.perf_counter()
    pred = engine.predict(engine.model.preprocess(export))
    sync(engine.device)
    return time.perf_counter() - t, pred, engine


def run_forward(model, device: str, batch: int, iters: int, precision: str, compile_: bool,
                channels_last: bool | None = None):
    settings = InferenceSettings(device=device, batch_size=batch, precision=precision, compile=compile_,
                                 channels_last=channels_last)
    engine = InferenceEngine(model, settings)
    crops = torch.from_numpy(np.random.default_rng(0).uniform(0, 1, (batch, engine.in_channels, CROP, CROP))
                             .astype(np.float32)).to(engine.device).contiguous(memory_format=engine.memory_format)
    for _ in range(2):
        engine._run_batch(crops)
    sync(engine.device)
    t = time.perf_counter()
    for _ in range(iters):
        engine._run_batch(crops)
    sync(engine.device)
    return (time.perf_counter() - t) / iters, engine


def run_cell_path(model, args, export: np.ndarray) -> tuple[float, int]:
    """(g): the scene as the imagery cache holds it (compact integers) through the device path."""
    parts = bands.encode_compact(export)
    eng = InferenceEngine(model, InferenceSettings(device=args.device, batch_size=args.batch_size,
                                                   compile=args.compile))
    eng.predict_compact({k: v[:, :CROP, :CROP] for k, v in parts.items()})  # warm-up
    n0 = eng.crops_run
    t = time.perf_counter()
    eng.predict_compact(parts)
    sync(eng.device)
    return time.perf_counter() - t, eng.crops_run - n0


def synthetic_scene(height: int = 947, width: int = 931) -> np.ndarray:
    """A (11, height, width) export of the synthetic world (a town of the README's example, 2021)."""
    from gum_ray.grid import DEFAULT_GRID, DEFAULT_HALO_PX
    from gum_ray.sources import get_source

    gbox = DEFAULT_GRID.cell_at(8.58, 47.38).utm_geobox(DEFAULT_HALO_PX)
    return np.ascontiguousarray(get_source("synthetic").fetch(gbox, 2021).export[:, :height, :width])


def gum2_random(export: np.ndarray) -> Gum2:
    """GUM 2.0 at the released width with random weights: BN calibrated on the image with smooth
    random Sentinel-1 (a scene without S1 would leave the S1 encoder's statistics degenerate), the
    classifier centred on the image as the notebook preprocesses it."""
    from gum_ray.gum2 import preprocess

    x = preprocess(export, mask_missing=False)
    cal = x.copy()
    coarse = torch.from_numpy(np.random.default_rng(11).uniform(0, 1, (1, 4, 16, 16)).astype(np.float32))
    cal[4:8] = torch.nn.functional.interpolate(coarse, size=x.shape[1:], mode="bilinear")[0].numpy()
    return Gum2.random(GUM2_RELEASED, seed=11, calibrate_on=cal, centre_on=x)


def engine_rows(model, export, args, mixed, n_seed, ref_label, ref_name, fpc, prefix):
    """(b') the seed geometry under mixed precision (with the notebook's preprocessing, so that it
    differs from (b) by rounding only), (c) the defaults and (g) the cell path from compact integers."""
    out = []
    bs = args.batch_size or default_batch_size(torch.device(args.device))
    notebook = model.as_notebook() if hasattr(model, "as_notebook") else model
    tb2, pred_b2, _ = run_engine(notebook, InferenceSettings(stride=256, window="none", merge="logits", device=args.device,
                                                          batch_size=args.batch_size, precision="auto"), export)
    out.append((f"(b') {prefix}seed geometry, {mixed} + channels_last + BN folded, batch {bs}", tb2, n_seed,
                mixed, f"{int((pred_b2.label != ref_label).sum())} px differ from {ref_name}", fpc))
    tc, _, eng_c = run_engine(model, InferenceSettings(device=args.device, batch_size=args.batch_size,
                                                       compile=args.compile), export)
    out.append((f"(c) {prefix}gum-ray defaults (stride {eng_c.settings.stride}, hann, {mixed}, batch {bs})",
                tc, eng_c.crops_run - 1, mixed, "-", fpc))
    tg, n_g = run_cell_path(model, args, export)
    out.append((f"(g) {prefix}cell path: compact ints -> device -> P(urban) (defaults)", tg, n_g, mixed, "-", fpc))
    return out


def forward_rows(model, args, fb, iters, mixed, fpc, prefix):
    """(f) per layout: NCHW, channels_last + BN folded, and compiled with --compile."""
    out = []
    for cl in (False, True):
        tf, _ = run_forward(model, args.device, fb, iters, "auto", False, channels_last=cl)
        out.append((f"(f) {prefix}forward, batch {fb}, {mixed}, " + ("channels_last + BN folded" if cl else "NCHW"),
                    tf, fb, mixed, "crop-Mpx/s", fpc))
    if args.compile:
        tf, _ = run_forward(model, args.device, fb, iters, "auto", True)
        out.append((f"(f) {prefix}forward, batch {fb}, {mixed}, channels_last + BN folded, compiled",
                    tf, fb, mixed, "crop-Mpx/s", fpc))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", default=str(DEFAULT_IMAGE), help="a GUM export GeoTIFF")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=None, help="default per device (1 on a CPU, 32 on a GPU)")
    ap.add_argument("--forward-batch", type=int, default=None, help="batch for (f); default 8 on CPU, 64 on GPU")
    ap.add_argument("--forward-iters", type=int, default=None)
    ap.add_argument("--compile", action="store_true", help="torch.compile in (c) and (f)")
    ap.add_argument("--repeats", type=int, default=1, help="best of N for (a) and (b)")
    ap.add_argument("--synthetic", action="store_true",
                    help="a scene of the synthetic world the size of the Aberystwyth scene, instead of --image "
                         "(no GeoTIFF, no rasterio: as on a lent GPU machine, tools/gpu_check.sh)")
    ap.add_argument("--family", choices=("gum1", "gum2", "both"), default="both",
                    help="model families to measure (default both, GUM 1 first)")
    args = ap.parse_args()

    device = torch.device(args.device)
    if args.synthetic:
        export, name = synthetic_scene(), "the synthetic world (931 x 947 px of a cell)"
    else:
        image = Path(args.image)
        if not image.exists():
            print(f"bench_infer: image {image} not found (pass --image, or --synthetic)", file=sys.stderr)
            return 2
        from gum_ray.export_io import open_export  # (rasterio: not needed for --synthetic)

        with open_export(image) as src:
            export = src.read_rows(0, src.height)
        name = f"image {image.name}"
    h, w = export.shape[1:]
    tmp = Path(tempfile.mkdtemp())
    mixed = "bf16" if resolve_precision("auto", device) in (torch.bfloat16, None) else "fp16"
    if device.type == "cpu" and resolve_precision("auto", device) is None:
        mixed = "fp32"
    n_seed = crop_count(h, w, 256)
    fb = args.forward_batch or (64 if device.type == "cuda" else 8)
    iters = args.forward_iters or (50 if device.type == "cuda" else 2)
    rows = []  # (path, seconds, crops, precision, check, flops per crop)
    notes = []
    best_a = None

    if args.family in ("gum1", "both"):
        x = bands.preprocess(export)
        ckpt = tmp / "gum_random.pth"
        random_checkpoint(ckpt, GUM_10, seed=11, calibrate_on=x)
        model = load_checkpoint(ckpt).model
        fpc = flops_per_crop(model)
        notes.append(f"GUM 1 {fpc / 1e9:.1f} GFLOP per 256 x 256 crop ({fpc / CROP**2 / 1e6:.2f} MFLOP/px)")
        seed_cfg = str(CONFIG_DIR / "gum_unet_psp.py")
        try:  # the seed's own path needs mmsegmentation (with mmcv's compiled ops for the device)
            import mmseg.apis  # noqa: F401
        except ImportError as exc:
            notes.append(f"(a) skipped: mmsegmentation cannot be imported here ({exc}); (b) is its arithmetic "
                         "(tests/test_fidelity.py), so the checks compare with (b)")
            best_a = None
        else:
            best_a = float("inf")
        best_b = float("inf")
        ref = None
        for _ in range(args.repeats):
            if best_a is not None:
                ta, ref = run_seed(seed_cfg, str(ckpt), export, args.device)
                best_a = min(best_a, ta)
            tb, pred_b, _ = run_engine(model, InferenceSettings.seed(device=args.device), export)
            best_b = min(best_b, tb)
        if best_a is not None:
            rows.append(("(a) seed path (mmseg test_step, 256/256, batch 1, fp32)", best_a, n_seed, "fp32", "-", fpc))
        rows.append(("(b) gum-ray seed settings (fp32 NCHW, batch 1)", best_b, n_seed, "fp32",
                     f"{int((pred_b.label != ref).sum())} px differ from (a)" if ref is not None else "-", fpc))
        rows.extend(engine_rows(model, export, args, mixed, n_seed, pred_b.label if ref is None else ref,
                                "(b)" if ref is None else "(a)", fpc, ""))
        rows.extend(forward_rows(model, args, fb, iters, mixed, fpc, ""))
        del model

    if args.family in ("gum2", "both"):
        g2 = gum2_random(export)
        fpc2 = flops_per_crop(g2)
        notes.append(f"GUM 2.0 {fpc2 / 1e9:.1f} GFLOP per crop ({fpc2 / CROP**2 / 1e6:.2f} MFLOP/px)")
        best_b2 = float("inf")
        for _ in range(args.repeats):
            tb2, pred_n, _ = run_engine(g2, InferenceSettings.seed(device=args.device), export)
            best_b2 = min(best_b2, tb2)
        rows.append(("(b) GUM 2.0 seed settings = the notebook (fp32 NCHW, batch 1)", best_b2, n_seed,
                     "fp32", "= notebook (tests/test_gum2.py)", fpc2))
        rows.extend(engine_rows(g2, export, args, mixed, n_seed, pred_n.label, "(b) GUM 2.0", fpc2,
                                "GUM 2.0 "))
        rows.extend(forward_rows(g2, args, fb, iters, mixed, fpc2, "GUM 2.0 "))

    peaks = {p: peak_flops(device, p) for p in {"fp32", mixed}}
    print(f"# bench_infer  {time.strftime('%Y-%m-%d')}  device: "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or 'cpu'} "
          f"({torch.get_num_threads()} threads)  torch {torch.__version__}")
    print(f"# {name}: {w} x {h} px = {h * w / 1e6:.3f} Mpx; " + "; ".join(notes) + "; peaks: "
          + ", ".join(f"{p} {v / 1e12:.3f} TFLOP/s ({how})" for p, (v, how) in peaks.items()))
    print(f"{'path':<72} {'crops':>5} {'s':>7} {'Mpx/s':>8} {'x (a)':>6} {'MFU':>6}  check")
    for name, t, crops, prec, check, fpc in rows:
        mfu = crops * fpc / t / peaks[prec][0]
        if check == "crop-Mpx/s":  # the batched forward alone: crop pixels per second
            print(f"{name:<72} {crops:>5} {t:>7.3f} {crops / t * CROP**2 / 1e6:>8.3f} {'':>6} {mfu:>6.1%}  "
                  f"{check}, {1e3 * t / crops:.2f} ms/crop")
            continue
        speed = f"{best_a / t:>6.2f}" if best_a else f"{'':>6}"
        print(f"{name:<72} {crops:>5} {t:>7.2f} {h * w / t / 1e6:>8.3f} {speed} {mfu:>6.1%}  {check}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
