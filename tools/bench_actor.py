#!/usr/bin/env python
"""The model actor's whole cell path on a device, measured as `gum map` runs it: the number the GPU
goal (at least 35 % of the device's bf16 peak for the whole cell path, not the forward alone) is
about.

Cells of the default grid (0.25 degree, 3,064 x 2,002 px of UTM 10 m with their halo), filled with
the real Aberystwyth scene mirrored (``tools/bench_host.py``'s ``scene_cell``) or the synthetic
world, are written to an imagery cache; a :class:`~gum_ray.mapping.stages.CellPredictor` (the
model actor's class, outside Ray) with a random GUM 1 or GUM 2.0 network of the released width then
predicts them in calls of ``--per-call`` cells, as the driver hands them out: reader threads read and
decompress the next cells (beside a GPU into pinned memory, one thread per CPU the actor holds,
``stages.actor_cpus``), the engine uploads, decodes, cuts crops, runs the network, blends and
thresholds on the device, and P(urban) comes back as float16. Everything is timed from the call to
its result on the host.

It prints, per repeat and best of them: wall seconds, crops per second, milliseconds per crop, the
model FLOPs per second over the device's peak for the precision (on CUDA the nominal dense peak
of the card; on a CPU the measured rate of a large matrix product, as ``tools/bench_infer.py``),
the host CPU time per crop of the whole process (all its threads), and the engine's host-timed
stages (on CUDA these time launches, not the device's work). Then the batched forward alone at the
same batch, for the ceiling: the whole path over the forward alone is the share of the device's
time the rest costs.

    .venv/bin/python tools/bench_actor.py --device cuda [--cells 8] [--per-call 4] [--family gum1|gum2]
    .venv/bin/python tools/bench_actor.py --cells 1 --per-call 1        # a CPU: one cell, about a minute
"""

from __future__ import annotations

import argparse
import atexit
import concurrent.futures
import dataclasses
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_host import DEFAULT_IMAGE, scene_cell  # noqa: E402
from bench_infer import gum2_random, peak_flops, run_forward, synthetic_scene, sync  # noqa: E402

from gum_ray import bands  # noqa: E402
from gum_ray.grid import DEFAULT_GRID, parse_aoi  # noqa: E402
from gum_ray.inference import CROP, InferenceSettings, flops_per_crop  # noqa: E402
from gum_ray.mapping.job import MapJob  # noqa: E402
from gum_ray.mapping.stages import GPU_READERS, CellPredictor  # noqa: E402
from gum_ray.model import GUM_10, random_checkpoint  # noqa: E402

YEAR = 2021


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--family", choices=("gum1", "gum2", "both"), default="gum1")
    ap.add_argument("--cells", type=int, default=8, help="cells predicted per repeat")
    ap.add_argument("--per-call", type=int, default=None,
                    help="cells per actor call (default as gum map: 4 beside a GPU, 1 on a CPU)")
    ap.add_argument("--readers", type=int, default=None,
                    help="CPUs the actor holds: beside a GPU its reader threads (default: stages.GPU_READERS); "
                         "on a CPU its torch threads (default: all)")
    ap.add_argument("--batch-size", type=int, default=None, help="default per device (32 on a GPU)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the network (reduce-overhead on CUDA)")
    ap.add_argument("--synthetic", action="store_true", help="the synthetic world's cells, not the real scene")
    ap.add_argument("--image", default=str(DEFAULT_IMAGE))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--forward-iters", type=int, default=None)
    args = ap.parse_args()
    if args.cells < 1 or args.repeats < 1:
        print("bench_actor: --cells and --repeats must be at least 1", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    per_call = args.per_call or (4 if gpu else 1)

    tmp = Path(tempfile.mkdtemp(prefix="bench_actor_"))
    atexit.register(shutil.rmtree, tmp, True)
    if args.synthetic:
        from gum_ray.sources import get_source

        synthetic = get_source("synthetic")
        scene = synthetic_scene()  # for the models' BN calibration only
    else:
        from gum_ray.export_io import open_export  # (rasterio: not needed for the synthetic world)

        synthetic = None
        with open_export(args.image) as src:
            scene = src.read_rows(0, src.height)

    base = DEFAULT_GRID.cell_at(-4.08, 52.41)
    cells = [(base.row + i // 4, base.col + i % 4) for i in range(args.cells)]
    settings = InferenceSettings(device=args.device, batch_size=args.batch_size, compile=args.compile)
    job = MapJob(aoi=parse_aoi(bbox=(-4.1, 52.3, -3.9, 52.5)), years=(YEAR,), product=str(tmp / "p.zarr"),
                 cache=str(tmp / "cache"), inference=settings, threads_per_actor=args.readers)
    cache = job.imagery_cache()
    def make(rc: tuple[int, int]) -> None:
        cell = job.cell(*rc)
        gbox = cell.utm_geobox(job.halo_px)
        export = synthetic.fetch(gbox, YEAR).export if synthetic else scene_cell(scene, gbox.shape.y, gbox.shape.x)
        cache.put_compact(YEAR, cell, bands.encode_compact(export), gbox, {})

    t = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(min(len(cells), os.cpu_count() or 1)) as pool:
        list(pool.map(make, cells))
    made_s = time.perf_counter() - t
    for family in (("gum1", "gum2") if args.family == "both" else (args.family,)):
        ckpt = tmp / f"{family}_random.pth"
        if family == "gum1":
            random_checkpoint(ckpt, GUM_10, seed=11, calibrate_on=bands.preprocess(scene))
        else:
            gum2_random(scene).save(ckpt)
        measure(dataclasses.replace(job, model=family), ckpt, cells, per_call, args, made_s)
    return 0


def measure(job: MapJob, ckpt: Path, cells: list[tuple[int, int]], per_call: int, args, made_s: float) -> None:
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    threads = args.readers or (GPU_READERS if gpu else None)
    actor = CellPredictor(job, str(ckpt), threads=threads)
    warm = actor.ready()  # raises a loading error; one crop through the network
    eng = actor.engine
    fpc = flops_per_crop(actor.model)
    mixed = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(eng.autocast_dtype, "fp32")
    peak, how = peak_flops(device, mixed)
    actor.predict_cells(YEAR, cells[:1])  # warm-up: a whole cell (allocations, kernels, tables)

    print(f"# bench_actor  {time.strftime('%Y-%m-%d %H:%M')}  device: "
          f"{torch.cuda.get_device_name(device) if gpu else platform.processor() or 'cpu'}  torch {torch.__version__}  "
          f"{job.model} ({fpc / 1e9:.1f} GFLOP a crop), {mixed}, batch {eng.batch_size}, "
          f"{'compiled, ' if args.compile else ''}{'channels_last' if eng.memory_format == torch.channels_last else 'NCHW'}")
    print(f"# {len(cells)} cells ({'synthetic world' if args.synthetic else 'real scene mirrored'}, "
          f"made in {made_s:.0f} s), {per_call} a call, {actor.readers} reader thread(s), torch threads "
          f"{torch.get_num_threads()}; warm-up {warm['warmup_s']:.2f} s; peak {peak / 1e12:.3f} TFLOP/s ({how})")
    print(f"{'repeat':<8} {'wall s':>8} {'crops':>6} {'crops/s':>9} {'ms/crop':>8} {'MFU':>6} {'host CPU ms/crop':>17}")
    best = None
    for k in range(args.repeats):
        n0, stages0, cpu0 = eng.crops_run, dict(eng.stage_s), cpu_seconds()
        t = time.perf_counter()
        for i in range(0, len(cells), per_call):
            preds = actor.predict_cells(YEAR, cells[i : i + per_call])
            assert all(np.isfinite(p.probability).any() for p in preds), "a cell came back without a value"
        sync(device)
        wall = time.perf_counter() - t
        crops, cpu = eng.crops_run - n0, cpu_seconds() - cpu0
        stages = {s: eng.stage_s[s] - stages0.get(s, 0.0) for s in eng.stage_s}
        print(f"{k + 1:<8} {wall:>8.2f} {crops:>6} {crops / wall:>9.1f} {1e3 * wall / crops:>8.3f} "
              f"{crops * fpc / wall / peak:>6.1%} {1e3 * cpu / crops:>17.3f}")
        if best is None or wall < best[0]:
            best = (wall, crops, stages)
    wall, crops, stages = best
    print("# engine stages of the best repeat, host-timed, ms per crop: "
          + ", ".join(f"{s} {1e3 * v / crops:.3f}" for s, v in stages.items() if v > 0))
    iters = args.forward_iters or (50 if gpu else 2)
    tf, _ = run_forward(actor.model, args.device, eng.batch_size, iters, job.inference.precision, args.compile)
    print(f"# the forward alone, batch {eng.batch_size}: {1e3 * tf / eng.batch_size:.3f} ms/crop, "
          f"MFU {eng.batch_size * fpc / tf / peak:.1%}; the whole path takes {wall / crops / (tf / eng.batch_size):.2f}x "
          f"its time ({CROP} px crops)")


if __name__ == "__main__":
    sys.exit(main())
