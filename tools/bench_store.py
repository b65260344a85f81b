#!/usr/bin/env python
"""Benchmark the product store: write MB/s per process, stored bytes per km^2, objects per cell.

A "typical" product: real-size cells (0.25 degree = 3000 x 3000 px by default) around the
synthetic world's demo town (gum_ray.sources.synthetic), with a model-like probability made from
the world's urban ground truth (a blurred truth plus a faint smooth rural background, as a
network's softmax looks), or a deterministic pattern of towns when the synthetic world is absent.
Each process writes its share of the cells through the real write protocol (data, then the commit
marker); only that call is timed. Then the pyramid is built over the cells.

    .venv/bin/python tools/bench_store.py                      # local folder and gs:// (emulator)
    .venv/bin/python tools/bench_store.py --backend local --cells 16 --procs 2
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import numpy as np  # noqa: E402

from gum_ray.grid import Cell, ProductGrid, pixel_area_rows  # noqa: E402

CENTRE = (8.5823, 47.3818)  # the synthetic world's demo town


def typical_probability(cell: Cell, year: int = 2020) -> np.ndarray:
    """A model-like P(urban) on the cell's product GeoBox (float32 0-1)."""
    from scipy.ndimage import gaussian_filter, zoom

    try:
        from gum_ray.sources.synthetic import ground_truth

        truth = ground_truth(cell.product_geobox(), year).astype(np.float32)
    except ImportError:  # a deterministic pattern of towns
        n = cell.grid.cell_px
        yy, xx = np.mgrid[0:n, 0:n]
        rng = np.random.default_rng([cell.row, cell.col])
        truth = np.zeros((n, n), np.float32)
        for _ in range(6):
            cy, cx, r = rng.uniform(0, n), rng.uniform(0, n), rng.uniform(20, 90)
            truth[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 1.0
    rng = np.random.default_rng([cell.row, cell.col, year])
    n = truth.shape[0]
    # faint smooth background: mostly below the 2 % floor, some fields at 2-5 %
    coarse = rng.random((n // 100 + 2, n // 100 + 2)).astype(np.float32)
    background = 0.05 * zoom(coarse, 100, order=1)[:n, :n] ** 3
    p = 0.96 * gaussian_filter(truth, 1.2) + background
    p += rng.normal(0, 0.01, p.shape).astype(np.float32) * (p > 0.1)
    return np.clip(p, 0, 1).astype(np.float32)


def _worker(root: str, cells: list[tuple[int, int]], cell_deg: float, chunk_px: int, barrier, results) -> None:
    from gum_ray.store.manifest import Manifest, write_and_commit
    from gum_ray.store.product import ProductStore

    grid = ProductGrid(cell_deg, chunk_px)
    product = ProductStore.open(root, writable=True)
    manifest = Manifest(root)
    arrays = [(grid.cell(r, c), typical_probability(grid.cell(r, c))) for r, c in cells]
    barrier.wait(timeout=600)
    secs = 0.0
    nbytes = 0
    for cell, prob in arrays:
        t0 = time.perf_counter()
        write_and_commit(product, manifest, 2020, cell, prob, checkpoint_sha256="0" * 64,
                         settings={"bench": True}, source="synthetic", source_dates=("2020-01-01", "2021-01-01"))
        secs += time.perf_counter() - t0
        nbytes += prob.size  # uint8 product bytes written (uncompressed)
    results.put((os.getpid(), nbytes, secs, len(arrays)))


def bench(root: str, backend: str, args: argparse.Namespace) -> dict:
    from gum_ray.store import fs
    from gum_ray.store.product import ProductSettings, ProductStore

    grid = ProductGrid(args.cell_deg, args.chunk_px)
    product = ProductStore.create(root, settings=ProductSettings(grid=grid), years=[2020])
    objects0, bytes0 = fs.du(root)
    centre = grid.cell_at(*CENTRE)
    side = int(np.ceil(np.sqrt(args.cells)))
    cells = [(centre.row + i - side // 2, centre.col + j - side // 2) for i in range(side) for j in range(side)][: args.cells]
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(args.procs)
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(root, cells[k :: args.procs], args.cell_deg, args.chunk_px, barrier, results))
             for k in range(args.procs)]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    per_proc = [results.get(timeout=1800) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    wall = time.perf_counter() - t0
    objects1, bytes1 = fs.du(root)
    n_shards, shard_bytes = fs.du(fs.join(root, "probability", "c"))
    km2 = sum(pixel_area_rows(grid.cell(r, c).y_slice.start, grid.cell(r, c).y_slice.stop).sum() * grid.cell_px
              for r, c in cells) / 1e6
    t1 = time.perf_counter()
    n_ovr = product.build_overviews([grid.cell(r, c) for r, c in cells], max_workers=args.procs)
    ovr_s = time.perf_counter() - t1
    objects2, bytes2 = fs.du(root)
    rates = [nb / 1e6 / s for _, nb, s, _ in per_proc if s > 0]
    return {
        "backend": backend,
        "cells": len(cells),
        "cell_px": grid.cell_px,
        "procs": args.procs,
        "mbps_mean": float(np.mean(rates)),
        "mbps_min": float(np.min(rates)),
        "ms_per_cell": 1000 * sum(s for _, _, s, _ in per_proc) / len(cells),
        "stored_mb_per_cell": shard_bytes / 1e6 / len(cells),
        "bytes_per_km2": shard_bytes / km2,
        "ratio": (len(cells) * grid.cell_px**2) / max(shard_bytes, 1),
        "objects_per_cell": (objects1 - objects0) / len(cells),
        "shards_per_cell": n_shards / len(cells),
        "overview_shards": n_ovr,
        "overview_s": ovr_s,
        "overview_objects": objects2 - objects1,
        "overview_bytes_per_km2": (bytes2 - bytes1) / km2,
        "create_objects": objects0,
        "create_mb": bytes0 / 1e6,
        "wall_s": wall,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backend", choices=("local", "gcs", "both"), default="both")
    ap.add_argument("--cells", type=int, default=16)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--cell-deg", type=float, default=0.25)
    ap.add_argument("--chunk-px", type=int, default=1000)
    ap.add_argument("--root", default=None, help="local folder to use (default: a temporary one)")
    args = ap.parse_args()

    rows = []
    if args.backend in ("local", "both"):
        tmp = Path(args.root or tempfile.mkdtemp(prefix="gum-bench-")) / f"product-{uuid.uuid4().hex[:6]}.zarr"
        try:
            rows.append(bench(str(tmp), "local", args))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if args.backend in ("gcs", "both"):
        from tests.gcs import FakeGCS

        with FakeGCS() as server:
            os.environ["STORAGE_EMULATOR_HOST"] = server.url
            server.create_bucket("gum-bench")
            rows.append(bench(f"gs://gum-bench/{uuid.uuid4().hex[:6]}/product.zarr", "gcs (fake-gcs-server)", args))

    print(f"\ngum-ray product store benchmark: {rows[0]['cells']} cells of {rows[0]['cell_px']} x {rows[0]['cell_px']} px "
          f"around the synthetic world's demo town, {args.procs} writer processes, zarr v3 sharded, zstd 3, floor 2 %")
    head = f"{'backend':<24}{'write MB/s/proc':>16}{'(min)':>8}{'ms/cell':>9}{'stored MB/cell':>15}{'bytes/km2':>11}{'ratio':>7}{'objects/cell':>13}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['backend']:<24}{r['mbps_mean']:>16.1f}{r['mbps_min']:>8.1f}{r['ms_per_cell']:>9.0f}"
              f"{r['stored_mb_per_cell']:>15.3f}{r['bytes_per_km2']:>11.0f}{r['ratio']:>7.0f}{r['objects_per_cell']:>13.2f}")
    print()
    for r in rows:
        print(f"{r['backend']}: objects/cell = {r['shards_per_cell']:.2f} shard + markers; "
              f"pyramid: {r['overview_shards']} overview shards in {r['overview_s']:.1f} s, {r['overview_objects']} objects, "
              f"{r['overview_bytes_per_km2']:.0f} bytes/km2; empty product: {r['create_objects']} objects, "
              f"{r['create_mb']:.1f} MB; wall {r['wall_s']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
