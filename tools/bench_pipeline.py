#!/usr/bin/env python
"""The mapping pipeline, streamed versus its stages one after another, and driver memory vs plan size.

Part 1 (same cells, same model, same Earth Engine emulator with --latency s per request):
  * streamed: `gum map` (fetch, inference and write at the same time), stage loop time;
  * one after another: the same Ray stage functions with a barrier between stages
    (all fetches, then all predictions, then all writes); each stage's time and their sum.
  Target: streamed close to the slowest stage, not the sum.

Part 2: driver peak RSS of `gum map --max-cells K` for a plan of 100,000 cells versus 100 cells
(same K cells streamed; only the plan differs). Target: within 2x.

    .venv/bin/python tools/bench_pipeline.py [--cells 6] [--latency 1.0] [--big 100000]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gum_ray.model import ModelSpec, random_checkpoint  # noqa: E402

CELL_DEG = 0.01


def gum_map(bbox, data, ckpt, extra, emu_url=None) -> dict:
    summary = Path(data) / "summary.json"
    Path(data).mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "gum_ray.cli", "map", "--bbox", *map(str, bbox), "--year", "2020",
           "--checkpoint", str(ckpt), "--data-dir", str(data), "--cell-deg", str(CELL_DEG),
           "--chunk-px", "40", "--quiet", "--no-preview", "--summary-json", str(summary), *extra]
    if emu_url:
        cmd += ["--source", "ee", "--source-option", f"url={emu_url}", "--source-option", "credentials=anonymous",
                "--source-option", "project=bench"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"gum map failed:\n{r.stderr[-3000:]}")
    return json.loads(summary.read_text())


def staged(bbox, data, ckpt, emu_url, fetch_conc: int, write_conc: int) -> dict[str, float]:
    """The same stages as the pipeline, with a barrier between them."""
    import ray

    from gum_ray.commands.map import add_job_arguments, job_from_args
    from gum_ray.grid import cells_for_aoi
    from gum_ray.mapping.runner import _remote_stages, connect_ray
    from gum_ray.model import load_checkpoint
    from gum_ray.store.product import ProductSettings, ProductStore

    p = argparse.ArgumentParser()
    add_job_arguments(p)
    args = p.parse_args(["--bbox", *map(str, bbox), "--year", "2020", "--checkpoint", str(ckpt),
                         "--data-dir", str(data), "--cell-deg", str(CELL_DEG), "--chunk-px", "40",
                         "--source", "ee", "--source-option", f"url={emu_url}",
                         "--source-option", "credentials=anonymous", "--source-option", "project=bench"])
    job = job_from_args(args)
    cells = cells_for_aoi(job.aoi, job.grid)
    connect_ray(None, job)
    source = job.make_source()
    from gum_ray.mapping.limits import limiter_for

    limiter = limiter_for(source.request_limit())  # owned here, as run_map does
    ProductStore.open_or_create(job.product, settings=ProductSettings(grid=job.grid), years=job.years)
    fetch, write, Actor = _remote_stages(job, 0)
    sha = load_checkpoint(ckpt).sha256
    jref = ray.put(job)

    def bounded(submit, items, limit):
        out, inflight = [], []
        for it in items:
            if len(inflight) >= limit:
                done, inflight = ray.wait(inflight, num_returns=1)
                out += ray.get(done)
            inflight.append(submit(it))
        return out + ray.get(inflight)

    t = time.time()
    bounded(lambda c: fetch.remote(jref, 2020, c.row, c.col), cells, fetch_conc)
    t_fetch = time.time() - t
    t = time.time()  # the inference stage includes starting its actor, as in the streamed run
    actor = Actor.remote(job, str(ckpt), 1)
    preds = [actor.predict.remote(2020, c.row, c.col) for c in cells]
    ray.get(preds)
    t_infer = time.time() - t
    t = time.time()
    bounded(lambda cp: write.remote(jref, 2020, cp[0].row, cp[0].col, [cp[1]], sha, {}, None, None), zip(cells, preds), write_conc)
    t_write = time.time() - t
    del limiter
    ray.shutdown()
    return {"fetch": t_fetch, "infer": t_infer, "write": t_write}


def len_cells(args) -> int:
    return args.cells


def bbox_for(n_cells: int, lon0=8.5, lat0=47.0) -> tuple[float, float, float, float]:
    side = int(math.ceil(math.sqrt(n_cells)))
    rows = int(math.ceil(n_cells / side))
    eps = 1e-4
    return (lon0 + eps, lat0 + eps, lon0 + side * CELL_DEG - eps, lat0 + rows * CELL_DEG - eps)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=12)
    ap.add_argument("--latency", type=float, default=1.0, help="emulator seconds per request")
    ap.add_argument("--big", type=int, default=100_000)
    ap.add_argument("--small", type=int, default=100)
    ap.add_argument("--max-cells", type=int, default=4)
    ap.add_argument("--skip-memory", action="store_true")
    args = ap.parse_args()

    from gum_ray.sources.ee_emulator import start_emulator_process

    tmp = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    ckpt = tmp / "model.pth"
    random_checkpoint(ckpt, ModelSpec(10, 16, 8), seed=0)
    side = int(math.ceil(math.sqrt(args.cells)))
    bbox = (8.57 + 1e-4, 47.37 + 1e-4, 8.57 + side * CELL_DEG - 1e-4,
            47.37 + math.ceil(args.cells / side) * CELL_DEG - 1e-4)
    print(f"# bench_pipeline {time.strftime('%Y-%m-%d')}: {args.cells} cells of {CELL_DEG} deg, EE emulator "
          f"{args.latency} s/request, GUM-architecture model (base 16), local Ray on this machine")
    with start_emulator_process(max_seconds=3600, latency_s=args.latency) as emu:
        s = gum_map(bbox, tmp / "streamed", ckpt, ["--fetch-concurrency", "2", "--write-concurrency", "2"], emu.url)
        st = staged(bbox, tmp / "staged", ckpt, emu.url, 2, 2)
    total = sum(st.values())
    slowest = max(st.values())
    print(f"{'stage one after another':<28} " + "  ".join(f"{k} {v:6.1f} s" for k, v in st.items()))
    print(f"{'sum of stages':<28} {total:6.1f} s")
    print(f"{'slowest stage':<28} {slowest:6.1f} s ({max(st, key=st.get)})")
    print(f"{'streamed (gum map)':<28} {s['stream_s']:6.1f} s  = {s['stream_s'] / slowest:.2f} x slowest, "
          f"{s['stream_s'] / total:.2f} x sum   (whole command incl. Ray start: {s['wall_s']:.1f} s)")
    r = s.get("rates") or {}
    if r.get("cells"):
        n = r["cells"]
        print(f"{'  its stages, per cell':<28} fetch {r['fetch_s'] / max(r['fetched'], 1):.2f} s, "
              f"inference {r['predict_s'] / n:.2f} s, write {r['write_s'] / n:.2f} s "
              f"(staged: fetch {st['fetch'] * 2 / len_cells(args):.2f} s at concurrency 2)")

    if args.skip_memory:
        return 0
    mem = {}
    for n in (args.small, args.big):
        r = gum_map(bbox_for(n), tmp / f"plan{n}", ckpt, ["--max-cells", str(args.max_cells)])
        mem[n] = (r["driver_peak_mb"], r["driver_plan_rss_mb"], r["planned"] + r["remaining"])
    (ms, ps, ns), (mb, pb, nb) = mem[args.small], mem[args.big]
    print(f"driver peak RSS, plan of {ns:,} cells: {ms:7.1f} MB; plan of {nb:,} cells: {mb:7.1f} MB "
          f"-> {mb / ms:.2f}x (target <= 2x; {args.max_cells} cells streamed in each)")
    print(f"driver RSS with the plan built:  {ps:7.1f} MB vs {pb:7.1f} MB -> {pb / ps:.2f}x "
          f"(+{pb - ps:.1f} MB for {nb - ns:,} more cells)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
