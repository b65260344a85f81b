#!/usr/bin/env python
"""Host cost of the cell path with a near-free network: ns per pixel and ms per crop of each stage.

A cached cell of the default grid (0.25 degree, about 2,800 px of UTM 10 m plus a 128 px halo a
side), filled with the real Aberystwyth scene mirrored (reflected at its edges, again and again, so
the imagery compresses like imagery: tiled copies of it, ``--fill tiled``, repeat whole rows that
Blosc's LZ4 finds within its 64 KiB window, and compress twice as well as the scene itself), runs
through what a model actor does (``CellPredictor``): read the cache objects, decompress (Blosc
LZ4HC, the shard reader), upload, decode the compact integers and the model's preprocessing (GUM 1's: one table lookup per
channel, ``bands.code_tables``; the per-op path is reported beside it), cut crops, a near-free
network (a 1 x 1 convolution, 10 -> 2 channels), blend, threshold and encode (P(urban) float16 to
the host).
One thread (``torch.set_num_threads(1)``) unless ``--threads``.

It also reports the work that stays on the CPU when the device is a GPU: read and decompress (a
model actor beside a GPU decompresses into pinned memory, so the upload is a DMA; the copy into
staging memory it would otherwise take is shown beside; only the bands the engine reads) and
bookkeeping (the engine's Python and kernel launches per crop, and those of a cell's decode and
input quality: run on torch's ``meta`` device, where ops do no arithmetic, with the launches
counted and each costed at ``LAUNCH_S``, :class:`LaunchCount`), the aggregate rate of
1..``--readers`` reader threads decompressing cells at once (as a model actor's: one malloc
arena, memory reused), and the share of time an H100 would be busy (GUM 1 forward at bf16 peak:
0.10 ms per crop).

    .venv/bin/python tools/bench_host.py [--stride 192] [--repeats 3]
"""

from __future__ import annotations

import argparse
import atexit
import collections
import dataclasses
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gum_ray import bands  # noqa: E402
from gum_ray.grid import DEFAULT_GRID, DEFAULT_HALO_PX  # noqa: E402
from gum_ray.inference import InferenceEngine, InferenceSettings  # noqa: E402
from gum_ray.shuffled import ShuffledPart  # noqa: E402
from gum_ray.store import fs  # noqa: E402
from gum_ray.store.cache import ImageryCache  # noqa: E402

DEFAULT_IMAGE = REPO.parent / "shared" / "realdata" / "aberystwyth_2021-05-27_gum11.tif"
H100_MS_PER_CROP = 0.10  # 99.3 GFLOP per crop at ~989 TFLOP/s dense bf16


class NearFree:
    """A near-free :class:`~gum_ray.network.UrbanModel`: GUM 1's preprocessing, a 1 x 1 conv."""

    family = "near-free"
    meta: dict = {}

    def __init__(self) -> None:
        self._module = torch.nn.Conv2d(10, 2, 1)

    in_channels = 10
    required_bands = bands.EXPORT_BANDS
    module = property(lambda self: self._module)
    encoder = property(lambda self: self._module)

    def preprocess(self, export, out=None):
        return bands.preprocess(export, with_products=False, out=out)

    def validity(self, export):
        return bands.validity_mask(export)

    def channel_sources(self):  # GUM 1's preprocessing: decoded and preprocessed by table lookup
        return bands.GUM1_CHANNEL_SOURCES[:10]

    def forward(self, x):
        return self._module(x)

    def provenance(self):
        return {"family": self.family}

    def save(self, path, meta=None):
        raise NotImplementedError


#: the host's cost of one kernel launch by PyTorch on CUDA (dispatcher, TensorIterator, the CUDA
#: runtime's launch): an assumption, not measured here (no GPU): 5-10 us is what eager PyTorch
#: usually takes; the larger is taken. Measured on a GPU with ``--device cuda`` instead.
LAUNCH_S = 10e-6
#: launches one aten op stands for where it is more than one kernel on CUDA: an accumulating
#: index_put_ makes a linear index, sorts it (CUB radix sort: several passes) and scatters
MULTI_LAUNCH = {"aten.index_put_.default": 8, "aten._index_put_impl_.default": 8, "aten.index_put.default": 8}


class LaunchCount:
    """Count the kernels a block of engine code would launch on a GPU, run on the ``meta`` device:
    every aten op that is not a view or an allocation is a launch (:data:`MULTI_LAUNCH` where it is
    several); the time spent inside those ops on ``meta`` (some of which are Python reference
    implementations there, up to a millisecond an op, where CUDA's host spends microseconds) is
    taken out of the wall time and :data:`LAUNCH_S` a launch put in its place (:meth:`host_s`)."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                t = time.perf_counter()
                out = func(*args, **(kwargs or {}))
                name = str(func)
                op = name.split(".")[1]
                if op in ("to", "contiguous"):  # a launch only where it copies
                    launch = out is not args[0]
                else:  # views and allocations launch nothing
                    launch = not (func.is_view or op.startswith(("empty", "new_empty", "detach", "lift_fresh", "alias")))
                if launch:
                    counter.inside += time.perf_counter() - t
                    counter.launches += MULTI_LAUNCH.get(name, 1)
                    counter.ops[name] += 1
                return out

        self.mode = Mode
        self.launches = 0
        self.inside = 0.0
        self.ops: collections.Counter = collections.Counter()

    def host_s(self, fn, runs: int = 3) -> float:
        """The host's time for ``fn()`` on a GPU, estimated as above, the best of ``runs``: the wall
        time of a run under the counting mode less the time inside its launching ops (so it keeps
        the engine's Python, views, allocations and the mode's own few microseconds an op: on the
        high side), plus :data:`LAUNCH_S` a launch."""
        best = float("inf")
        for _ in range(runs):
            self.launches, self.inside = 0, 0.0
            self.ops.clear()
            with self.mode():
                t0 = time.perf_counter()
                fn()
                wall = time.perf_counter() - t0
            best = min(best, wall - self.inside + self.launches * LAUNCH_S)
        return best


def scene_cell(scene: np.ndarray, h: int, w: int, fill: str = "mirrored") -> np.ndarray:
    """A (bands, h, w) cell filled from a smaller (bands, H, W) scene: ``mirrored``, reflected at its
    edges again and again (numpy's ``symmetric`` pad), so no row repeats within a compressor's window
    and the cell compresses about as the scene does (5.6 against the scene's 6.1 bytes a pixel in
    the cache; Aberystwyth); ``tiled``, copies side by side (3.0 bytes a pixel: LZ4 finds each row's
    repeats, 931 px apart)."""
    if fill == "tiled":
        return np.tile(scene, (1, -(-h // scene.shape[1]), -(-w // scene.shape[2])))[:, :h, :w].copy()
    pad = ((0, 0), (0, max(h - scene.shape[1], 0)), (0, max(w - scene.shape[2], 0)))
    return np.ascontiguousarray(np.pad(scene, pad, mode="symmetric")[:, :h, :w])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", default=str(DEFAULT_IMAGE))
    ap.add_argument("--stride", type=int, default=192)
    ap.add_argument("--repeats", type=int, default=3, help="best of N")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--synthetic", action="store_true",
                    help="fill the cell from the synthetic world instead of the real scene")
    ap.add_argument("--fill", choices=("mirrored", "tiled"), default="mirrored",
                    help="how the real scene fills the cell: reflected at its edges (compresses as the scene does), "
                         "or tiled (repeats whole rows, which LZ4 and zstd find: half the bytes; runs before "
                         "2026-12-03 16:00 used it)")
    ap.add_argument("--codecs", action="store_true",
                    help="also decompress the same arrays with numcodecs directly (zstd 1/3, Blosc lz4 and lz4hc with byte shuffle, "
                         "on one thread), without Zarr")
    ap.add_argument("--ops", action="store_true", help="also list the aten ops the GPU path's bookkeeping launches")
    ap.add_argument("--readers", type=int, default=2,
                    help="also read + decompress the cell on 1..N threads at once (a model actor's readers)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from numcodecs import blosc

    # Blosc on one thread, as in a model actor's reader threads (numcodecs runs Blosc on all cores
    # only from the main thread, where this script decompresses)
    blosc.use_threads = False

    cell = DEFAULT_GRID.cell_at(-4.08, 52.41)
    gbox = cell.utm_geobox(DEFAULT_HALO_PX)
    h, w = gbox.shape.y, gbox.shape.x
    if args.synthetic:
        from gum_ray.sources import get_source

        export = get_source("synthetic").fetch(gbox, 2021).export
        scene = None
    else:
        from gum_ray.export_io import open_export  # (rasterio: not needed for the synthetic world)

        with open_export(args.image) as src:
            scene = src.read_rows(0, src.height)
        export = scene_cell(scene, h, w, args.fill)
    tmp = Path(tempfile.mkdtemp(prefix="bench_host_"))
    atexit.register(shutil.rmtree, tmp, True)
    cache = ImageryCache(str(tmp / "cache"))
    compact = bands.encode_compact(export)
    cache.put_compact(2021, cell, compact, gbox, {})
    del export, scene
    path = cache.path(2021, cell)
    files = [fs.join(path, f) for f in fs.find(path)]

    model = NearFree()
    settings = InferenceSettings(stride=args.stride, device="cpu", precision="fp32", batch_size=8)
    best: dict[str, float] = {}
    crops = 0
    per_op = float("inf")
    wanted = InferenceEngine(model, settings).compact_bands()  # GUM 1's: no elevation
    whole, _, _ = cache.get_compact(2021, cell)  # every band, for the per-op path
    for _ in range(args.repeats):
        eng = InferenceEngine(model, settings)
        t = {}
        t0 = time.perf_counter()
        nbytes = sum(len(fs.read_bytes(f)) for f in files)
        t["read"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        parts, _, _ = cache.get_compact(2021, cell, bands=wanted)  # the bands the engine reads only
        t["decompress"] = time.perf_counter() - t0 - t["read"]
        # beside a GPU: the LZ4 streams only, the value parts' unshuffle left to the device
        t0 = time.perf_counter()
        for_gpu, _, _ = cache.get_compact(2021, cell, bands=wanted, for_device=True)
        t["decompress, LZ4 only"] = time.perf_counter() - t0 - t["read"]
        t0 = time.perf_counter()
        staged = {k: np.empty_like(v) for k, v in parts.items()}
        for k, v in parts.items():
            np.copyto(staged[k], v)  # the host side of an upload: a copy into (pinned) staging memory
        t["upload (copy)"] = time.perf_counter() - t0
        eng._code_tables()  # made once per engine (a model actor's lifetime), not per cell
        x, valid, quality = eng.prepare_compact(staged, quality=True)
        t["decode + preprocess"] = eng.stage_s["decode+preprocess"]
        t["input quality"] = eng.stage_s["quality"]
        eng.stage_s.clear()
        # the same through the per-op path (decode_compact, then the model's preprocess: a family
        # whose preprocessing mixes bands, e.g. GUM 2.0's), for comparison; not in the total
        eng._tables = None
        eng.prepare_compact(whole)
        per_op = min(per_op, eng.stage_s["decode+preprocess"])
        eng.stage_s.clear()
        (_, prob, _), = eng.predict_scenes([(0, x, valid, (0, 0))])
        t0 = time.perf_counter()
        prob.half().cpu().numpy()
        t["encode"] = time.perf_counter() - t0 + eng.stage_s["finish"]
        t["crop"] = eng.stage_s["crop"]
        t["network (near-free)"] = eng.stage_s["forward"]
        t["blend"] = eng.stage_s["blend"]
        t["bookkeeping"] = eng.stage_s["scene"]
        crops = eng.crops_run
        for k, v in t.items():
            best[k] = min(best.get(k, float("inf")), v)
        specs = {k: (v.shape, torch.from_numpy(np.empty(0, v.dtype)).dtype) for k, v in parts.items()}
        # the GPU read's own: shuffled value parts, and parts of one value (a fill on the device)
        layouts = {k: v for k, v in for_gpu.items() if isinstance(v, ShuffledPart) or not any(v.strides)}
        # a model actor's steady state: a cell's arrays are freed before the next cell's are made
        # (the process keeps freed memory, inference.retain_freed_memory), so later repeats reuse
        # it rather than fault fresh pages in
        del parts, for_gpu, staged, x, valid, quality, prob, eng

    # bookkeeping alone: the engine on the meta device (shapes only, no arithmetic)
    meta_eng = InferenceEngine(model, InferenceSettings(stride=args.stride, device="meta", precision="fp32",
                                                        batch_size=32))
    xm = torch.empty((10, h, w), device="meta")
    t0 = time.perf_counter()
    list(meta_eng.predict_scenes([(0, xm, None, (0, 0))]))
    book_meta = (time.perf_counter() - t0) / max(meta_eng.crops_run, 1)
    count = LaunchCount()
    book = count.host_s(lambda: list(meta_eng.predict_scenes([(0, xm, None, (0, 0))]))) / crops
    book_launches, book_ops = count.launches, dict(count.ops)
    # and the decode's dispatch on the device (prepare_compact's ops, one block a cell off a CPU)
    meta_parts = {k: torch.empty(shape, dtype=dtype, device="meta") for k, (shape, dtype) in specs.items()}
    for k, v in layouts.items():  # as a GPU actor's reader leaves them: unshuffled, or filled, on the device
        meta_parts[k] = v if isinstance(v, np.ndarray) else \
            dataclasses.replace(v, data=torch.empty(v.data.shape, dtype=torch.uint8, device="meta"))
    meta_eng.prepare_compact(meta_parts, quality=True)  # its tables, made once per actor
    t0 = time.perf_counter()
    meta_eng.prepare_compact(meta_parts, quality=True)
    dispatch_meta = (time.perf_counter() - t0) / crops
    dispatch = count.host_s(lambda: meta_eng.prepare_compact(meta_parts, quality=True)) / crops
    dispatch_launches = count.launches

    # for scale: the launches of GUM 1's own forward (what the near-free network stands in for),
    # a batch of 32 as a GPU engine runs it (BN folded, channels_last, fp32; autocast adds casts)
    from gum_ray.model import GUM_10, Gum1, build_model

    gum1_eng = InferenceEngine(Gum1.from_module(build_model(GUM_10, initialise=False)),
                               InferenceSettings(device="meta", precision="fp32", batch_size=32))
    xb = torch.empty((32, 10, 256, 256), device="meta").contiguous(memory_format=gum1_eng.memory_format)
    with torch.inference_mode():
        gum1_eng._scores(xb)
        gum1_s = count.host_s(lambda: gum1_eng._scores(xb)) / 32
    gum1_launches = count.launches
    del gum1_eng, xb

    # the actor's reader threads: cells read and decompressed at once, aggregate throughput
    import concurrent.futures

    import threading

    from gum_ray.inference import one_malloc_arena

    one_malloc_arena()  # as a model actor beside a GPU does before its reader threads start
    held = threading.local()

    def reused(shape, dtype):
        """A thread's arrays, reused cell after cell, as a GPU actor's pinned memory is (torch's
        caching host allocator hands a freed block to the next read)."""
        arrays = held.__dict__.setdefault("arrays", {})
        if (shape, dtype) not in arrays:
            arrays[(shape, dtype)] = np.empty(shape, dtype)
        return arrays[(shape, dtype)]

    def read_cell(_):
        cache.get_compact(2021, cell, reused, bands=wanted, for_device=True)

    reader_rates = []
    for k in range(1, args.readers + 1):
        with concurrent.futures.ThreadPoolExecutor(k) as pool:
            list(pool.map(read_cell, range(k)))  # a first read per thread: its memory made
            t0 = time.perf_counter()
            list(pool.map(read_cell, range(3 * k)))
            reader_rates.append((k, (time.perf_counter() - t0) / (3 * k * crops)))

    codec_rows = []
    if args.codecs:  # the same arrays through a codec alone: what decompression costs without Zarr
        import numcodecs

        shuffle = numcodecs.Blosc.SHUFFLE
        for name, codec in (("zstd level 1", numcodecs.Zstd(level=1)), ("zstd level 3", numcodecs.Zstd(level=3)),
                            ("blosc lz4 + shuffle", numcodecs.Blosc(cname="lz4", clevel=5, shuffle=shuffle)),
                            ("blosc lz4hc 5 + shuffle (the cache's)",
                             numcodecs.Blosc(cname="lz4hc", clevel=5, shuffle=shuffle))):
            enc = [codec.encode(np.ascontiguousarray(v)) for v in compact.values()]
            t_best = float("inf")
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                for e in enc:
                    codec.decode(e)
                t_best = min(t_best, time.perf_counter() - t0)
            ratio = sum(v.nbytes for v in compact.values()) / sum(len(e) for e in enc)
            codec_rows.append((name, t_best, ratio))
    del compact

    px = h * w
    print(f"# bench_host  {time.strftime('%Y-%m-%d %H:%M')}  cell {cell.id}: {w} x {h} px (0.25 deg + "
          f"{DEFAULT_HALO_PX} px halo, {'synthetic world' if args.synthetic else 'real scene ' + args.fill}), {crops} crops at stride {args.stride}, {nbytes / 1e6:.1f} MB in the cache, "
          f"{torch.get_num_threads()} thread(s)")
    print(f"{'stage':<22} {'ms/cell':>9} {'ms/crop':>8} {'ns/px':>7}")
    total = 0.0
    for k, v in best.items():
        if k in ("upload (copy)", "decompress, LZ4 only"):  # the GPU path's, below
            continue
        total += v
        print(f"{k:<22} {v * 1e3:>9.1f} {v * 1e3 / crops:>8.3f} {v * 1e9 / px:>7.1f}")
    print(f"{'whole path (CPU device)':<22} {total * 1e3:>9.1f} {total * 1e3 / crops:>8.3f} {total * 1e9 / px:>7.1f}")
    rest = total - best["network (near-free)"]
    print(f"{'  without the network':<22} {rest * 1e3:>9.1f} {rest * 1e3 / crops:>8.3f} {rest * 1e9 / px:>7.1f}")
    print(f"# decode + preprocess by table lookup (GUM 1) {best['decode + preprocess'] * 1e9 / px:.1f} ns/px; "
          f"per op (decode_compact, then preprocess) {per_op * 1e9 / px:.1f} ns/px")
    # beside a GPU the model actor decompresses into pinned memory (stages.TensorMemory), which the
    # device reads by DMA: the copy into staging memory measured here is not host work there; its
    # results come back into pinned memory too (InferenceEngine.to_host)
    gpu_host = (best["decompress, LZ4 only"] + best["read"]) / crops + book + dispatch
    print(f"# CPU work per crop when the device is a GPU: read + decompress (into pinned memory) "
          f"{(best['read'] + best['decompress, LZ4 only']) * 1e3 / crops:.3f} ms (of which LZ4 "
          f"{best['decompress, LZ4 only'] * 1e3 / crops:.3f} ms; Blosc's unshuffle too, "
          f"{best['decompress'] * 1e3 / crops:.3f}), bookkeeping {book * 1e3:.3f} ms "
          f"({book_launches / crops:.2f} launches a crop) + unshuffle, decode and input-quality dispatch "
          f"{dispatch * 1e3:.3f} ms "
          f"({dispatch_launches} launches a cell) = {gpu_host * 1e3:.3f} ms per crop per thread (batch 32; the engine's "
          f"Python timed on the meta device, each launch counted at {LAUNCH_S * 1e6:.0f} us; timed on meta as it is, an "
          f"upper bound: {book_meta * 1e3:.3f} + {dispatch_meta * 1e3:.3f} ms; a copy into staging memory, which the "
          f"actor does not make, would add {best['upload (copy)'] * 1e3 / crops:.3f} ms)")
    print(f"# beside it, GUM 1's own forward launches {gum1_launches} kernels a batch of 32: {gum1_s * 1e3:.3f} ms a crop "
          f"of host time at {LAUNCH_S * 1e6:.0f} us a launch, issued while the GPU runs the batch before (CUDA graphs, "
          f"--compile's reduce-overhead mode, would take it to one launch)")
    if args.ops:
        print("# launches of the bookkeeping a cell: " + ", ".join(f"{k} {v}" for k, v in sorted(book_ops.items())))
    for name, t_c, ratio in codec_rows:
        print(f"# numcodecs {name} alone: {t_c * 1e9 / px:.1f} ns/px ({ratio:.1f}x compression)")
    print("# reader threads (read + LZ4 of whole cells at once, as beside a GPU): " + ", ".join(
        f"{k}: {r * 1e3:.3f} ms per crop" for k, r in reader_rates))
    print(f"# an H100 (GUM 1 at {H100_MS_PER_CROP} ms/crop) busy: {min(1.0, H100_MS_PER_CROP / (gpu_host * 1e3)):.0%} "
          f"fed by one host thread; {min(1.0, 4 * H100_MS_PER_CROP / (gpu_host * 1e3)):.0%} by four; the whole path on "
          f"this CPU would keep it {min(1.0, H100_MS_PER_CROP / (total * 1e3 / crops)):.1%} busy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
