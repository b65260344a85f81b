"""Run a mapping job on Ray: fetch (CPU tasks) -> inference (model actors) -> write (CPU tasks).

The three stages run at the same time. Each has a bounded number of items in flight, so memory is
bounded whatever the AOI: at most ``fetch_concurrency`` fetches, ``READY_AHEAD`` fetched cells
waiting (in the imagery cache; only their records are held), two cells queued per inference actor,
``write_concurrency`` writes. Scheduling, placement, data movement and worker failure are
Ray's (remote tasks, actors, ``ray.wait``); the driver only keeps the queues bounded and the books.

Resume is the manifest: committed cells are skipped; a failed cell is retried up to
``max_attempts`` times (each failure recorded with its error), then set aside while the run goes on.
One run at a time changes a product: a fenced lease (:mod:`.lease`) taken before the product is
created or a year added, with a heartbeat, keeps a second run out while the first is alive; a
killed run's lease expires after ``lease_ttl_s`` (at once on the same host).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import resource
import socket
import sys
import time
from collections.abc import Iterator
from typing import Any

from gum_ray.errors import GumError, InputError
from gum_ray.grid import Cell, cells_for_aoi, check_cell_cap, pixel_area_rows
from gum_ray.mapping.job import MapJob
from gum_ray.mapping.lease import RunLease
from gum_ray.mapping.stages import CellPredictor, fetch_cell, write_cell

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ planning


def cell_km2(cell: Cell) -> float:
    ys = cell.y_slice
    return float(pixel_area_rows(ys.start, ys.stop).astype("float64").sum() * cell.grid.cell_px / 1e6)


def plan_cells(job: MapJob, source: Any = None) -> list[Cell]:
    """The product cells that touch the AOI and that the source says can hold data."""
    check_cell_cap(job.aoi, job.grid, job.max_aoi_cells)  # before anything is listed or fetched
    source = source or job.make_source()
    cells = [c for c in cells_for_aoi(job.aoi, job.grid) if source.may_hold_data(c.bounds)]
    if not cells:
        raise InputError(
            f"nothing to map: the AOI {tuple(round(v, 5) for v in job.aoi.bounds)} has no land for "
            f"the {job.source} source (all its cells are ocean); check the coordinates (lon, lat order)"
        )
    return cells


# ------------------------------------------------------------------------------------ progress


@dataclasses.dataclass
class Summary:
    planned: int = 0
    skipped: int = 0
    done: int = 0
    empty: int = 0
    set_aside: int = 0
    retried: int = 0
    remaining: int = 0
    km2: float = 0.0
    stream_s: float = 0.0
    wall_s: float = 0.0
    driver_peak_mb: float = 0.0
    driver_plan_rss_mb: float = 0.0  # resident memory once the plan and its queue are built
    errors: dict[str, str] = dataclasses.field(default_factory=dict)
    #: measured work of the cells written (seconds summed over cells, crops run, cells fetched):
    #: what the next plan's cost estimate can be calibrated with (:meth:`stage_rates`)
    stage_totals: dict[str, float] = dataclasses.field(default_factory=dict)
    written_cells: set[tuple[int, int]] = dataclasses.field(default_factory=set, repr=False)

    @property
    def km2_per_s(self) -> float:
        return self.km2 / self.wall_s if self.wall_s > 0 else 0.0

    def stage_rates(self) -> dict[str, float]:
        """Per-stage rates measured in this run: seconds per fetched cell, crops per second and ms
        per crop of one model actor (cache read and decompression included), seconds per write."""
        t = self.stage_totals
        out: dict[str, float] = {}
        if t.get("fetched"):
            out["fetch_s_per_cell"] = t["fetch_s"] / t["fetched"]
        if t.get("crops"):
            out["infer_crops_per_s"] = t["crops"] / max(t["predict_s"], 1e-9)
            out["infer_ms_per_crop"] = 1e3 * t["predict_s"] / t["crops"]
            out["cache_read_ms_per_crop"] = 1e3 * t.get("read_s", 0.0) / t["crops"]
        if t.get("cells"):
            out["write_s_per_cell"] = t["write_s"] / t["cells"]
        return out

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["written_cells"] = len(self.written_cells)
        d["km2_per_s"] = self.km2_per_s
        d["stage_rates"] = self.stage_rates()
        return d


class Progress:
    """A live line for humans (stderr, when a terminal) and JSON lines for job logs (stdout)."""

    def __init__(self, total: int, *, live: bool | None = None, log_every_s: float = 10.0):
        self.total = total
        self.live = sys.stderr.isatty() if live is None else live
        self.log_every_s = log_every_s
        self.t0 = time.time()
        self.last_log = 0.0
        self.bar = None
        if self.live:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="cell", file=sys.stderr, dynamic_ncols=True)

    def update(self, s: Summary, in_flight: dict[str, int], force: bool = False) -> None:
        elapsed = max(time.time() - self.t0, 1e-9)
        finished = s.done + s.set_aside
        rate = s.km2 / elapsed
        eta = (self.total - finished) * elapsed / finished if finished else float("nan")
        if self.bar is not None:
            self.bar.n = finished
            self.bar.set_postfix_str(
                f"{rate:.2f} km²/s, fetch {in_flight['fetch']} infer {in_flight['infer']} "
                f"write {in_flight['write']}, failures {s.retried + s.set_aside}", refresh=True)
        if force or time.time() - self.last_log >= self.log_every_s:
            self.last_log = time.time()
            print(json.dumps({"event": "progress", "cells_total": self.total, "cells_done": s.done,
                              "cells_set_aside": s.set_aside, "retries": s.retried,
                              "km2": round(s.km2, 3), "km2_per_s": round(rate, 4),
                              "eta_s": None if eta != eta else round(eta, 1),
                              "in_flight": in_flight, "elapsed_s": round(elapsed, 1)}), flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ------------------------------------------------------------------------------------ Ray


def connect_ray(address: str | None, job: MapJob) -> bool:
    """Join the Ray cluster at ``address`` (or the job's, under ``ray job submit``), else start one.

    Returns True when this call connected (the caller then disconnects when done), False when this
    process was already connected.
    """
    import ray

    if ray.is_initialized():
        return False
    from gum_ray.quiet import ray_logging_level, ray_runtime_env

    kwargs: dict[str, Any] = {"log_to_driver": True, "include_dashboard": False,
                              "runtime_env": ray_runtime_env(), "logging_level": ray_logging_level()}
    where = address or os.environ.get("RAY_ADDRESS")
    if where and where not in ("auto", "local"):
        _check_reachable(where)
    try:
        if address:
            ray.init(address=address, **kwargs)
        elif os.environ.get("RAY_ADDRESS"):
            ray.init(**kwargs)
        else:
            ray.init(address="local", **kwargs)
        return True
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = address or os.environ.get("RAY_ADDRESS")
        raise GumError(
            f"cannot reach the Ray cluster at {where} ({str(exc).splitlines()[0][:160]}); start it "
            "(`ray start --head`) or leave --ray-address out to run on a local Ray"
        ) from None


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast on a Ray address nobody answers at (ray.init would retry for many minutes)."""
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as exc:
        raise GumError(
            f"cannot reach the Ray cluster at {address} ({exc}); start it (`ray start --head`), "
            "check the address (host:port of the head's GCS, e.g. 10.0.0.2:6379), or leave "
            "--ray-address out to run on a local Ray"
        ) from None


def _remote_stages(job: MapJob, n_gpus: float):
    import ray

    @ray.remote(num_cpus=0.5, max_retries=0)
    def gum_fetch(job: MapJob, year: int, row: int, col: int) -> dict[str, Any]:
        return fetch_cell(job, year, row, col)

    @ray.remote(num_cpus=0.5, max_retries=0)
    def gum_write(job, year, row, col, predicted, sha, times, run_id, lease_generation):
        return write_cell(job, year, row, col, predicted, sha, times, run_id, lease_generation)

    opts: dict[str, Any] = {"max_restarts": 1, "max_task_retries": 0}
    if n_gpus >= 1:
        opts["num_gpus"] = 1
        opts["num_cpus"] = 1
    else:
        opts["num_cpus"] = 1
    GumInferActor = ray.remote(**opts)(CellPredictor)
    return gum_fetch, gum_write, GumInferActor


def run_map(job: MapJob, *, ray_address: str | None = None, live: bool | None = None,
            log_every_s: float = 10.0) -> Summary:
    """Run ``job`` to completion (resuming); returns the summary. See the module docstring."""
    import ray

    from gum_ray.network import check_compatible, load_model

    t0 = time.time()
    source = job.make_source()  # validates the source options before anything is written
    checkpoint = job.resolved_checkpoint(source)
    model = load_model(checkpoint)
    check_compatible(model, source.with_products, what=f"the {job.source} source")
    sha = model.provenance()["checkpoint_sha256"]
    del model
    cells = plan_cells(job, source)
    _check_existing_product(job)
    connected_here = connect_ray(ray_address, job)
    try:
        return _run_connected(job, source, cells, checkpoint, sha, t0, live, log_every_s)
    finally:
        if connected_here:  # a local Ray started for this run stops with it
            ray.shutdown()


def _run_connected(job, source, cells, checkpoint, sha, t0, live, log_every_s) -> Summary:
    from gum_ray.store.manifest import Manifest
    from gum_ray.store.product import ProductSettings, ProductStore

    # A cluster-wide resource of the source (Earth Engine's in-flight cap, a named Ray actor) is
    # created here, so the driver owns it for the whole run; the workers find it by name.
    from gum_ray.mapping.limits import limiter_for

    limit = source.request_limit()
    cluster_limiter = None if limit is None else limiter_for(limit)
    lease = RunLease(job.product, job.lease_ttl_s)
    lease.acquire()  # first: the product is created or a year added only under the lease
    summary = Summary()
    try:
        lease.start_heartbeat()  # beats through long waits and the overview build
        product = ProductStore.open_or_create(job.product, settings=ProductSettings(grid=job.grid), years=job.years)
        manifest = Manifest(job.product, job.grid)
        _record_run(job, lease, cells)
        todo: collections.deque[tuple[int, Cell]] = collections.deque()
        for year in job.years:
            pending = manifest.pending(year, cells)
            summary.skipped += len(cells) - len(pending)
            todo.extend((year, c) for c in pending)
        if job.max_cells is not None and len(todo) > job.max_cells:
            summary.remaining = len(todo) - job.max_cells
            todo = collections.deque(list(todo)[: job.max_cells])
        summary.planned = len(todo)
        summary.driver_plan_rss_mb = _rss_mb()
        progress = Progress(len(todo), live=live, log_every_s=log_every_s)
        if todo:
            t_stream = time.time()
            _stream(job, todo, checkpoint, sha, summary, progress, lease, manifest)
            summary.stream_s = time.time() - t_stream
        progress.update(summary, {"fetch": 0, "infer": 0, "write": 0}, force=True)
        progress.close()
        if summary.written_cells:  # the pyramid above the cells this run wrote
            written = [job.cell(r, c) for r, c in sorted(summary.written_cells)]
            product.build_overviews(written, years=list(job.years), check=lease.beat)
        lease.beat()  # LeaseLost if a heartbeat was refused while the pyramid was built
    finally:
        lease.release()
    del cluster_limiter  # held by the driver until here
    summary.wall_s = time.time() - t0
    summary.driver_peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return summary


def _rss_mb() -> float:
    """This process's resident memory now (MB), from /proc where there is one."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _check_existing_product(job: MapJob) -> None:
    """A product already at the path must have this job's grid (checked before anything runs)."""
    from gum_ray.store import fs
    from gum_ray.store.product import ProductStore

    if fs.exists(fs.join(fs.normalize(job.product), "zarr.json")):
        grid = ProductStore.open(job.product).grid
        if grid != job.grid:
            raise InputError(
                f"{job.product}: the product was created with {grid.cell_deg} degree cells and "
                f"{grid.chunk_px} px chunks, not {job.grid.cell_deg} / {job.grid.chunk_px}; give "
                f"cell_deg {grid.cell_deg} and chunk_px {grid.chunk_px}, or a new product path",
                param=("cell_deg", "chunk_px"),
            )


def _record_run(job: MapJob, lease: RunLease, cells: list[Cell]) -> None:
    from gum_ray.store import fs

    record = {"run_id": lease.run_id, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "aoi": job.aoi.to_geojson(), "years": list(job.years), "cells": len(cells),
              "source": job.source, "settings": job.settings_record(), "max_attempts": job.max_attempts}
    fs.write_bytes(fs.join(job.product, "_manifest", "runs", f"{lease.run_id}.json"),
                   json.dumps(record, indent=1, default=str).encode())


READY_AHEAD = 32


def _stream(job, todo, checkpoint, sha, summary, progress, lease, manifest) -> None:
    import ray

    n_gpus = float(ray.cluster_resources().get("GPU", 0))
    n_actors = job.infer_actors or (int(n_gpus) if n_gpus >= 1 else 1)
    gum_fetch, gum_write, GumInferActor = _remote_stages(job, n_gpus)
    job_ref = ray.put(job)
    # torch threads = the CPUs the actor holds: more would oversubscribe the cores that the fetch
    # and write tasks run on (OpenMP spin-waits make that far slower than it looks)
    threads = job.threads_per_actor or 1
    actors = [GumInferActor.options(num_cpus=threads).remote(job, checkpoint, threads)
              for _ in range(n_actors)]
    actor_load = [0] * n_actors
    fetching: dict[Any, tuple[int, Cell, float]] = {}
    ready: collections.deque[tuple[int, Cell, dict]] = collections.deque()
    inferring: dict[Any, tuple[int, Cell, int, dict]] = {}
    writing: dict[Any, tuple[int, Cell]] = {}

    def fail(year: int, cell: Cell, exc: BaseException) -> None:
        err = exc.cause if isinstance(exc, ray.exceptions.RayTaskError) and exc.cause else exc
        attempt = manifest.record_failure(year, cell, err)
        if attempt < job.max_attempts:
            summary.retried += 1
            todo.append((year, cell))
        else:
            summary.set_aside += 1
            summary.errors[f"{year}/{cell.id}"] = f"{type(err).__name__}: {str(err)[:300]}"
        log.warning("cell %s year %s failed (attempt %d of %d): %s", cell.id, year, attempt,
                    job.max_attempts, str(err).splitlines()[0][:200] if str(err) else type(err).__name__)

    while todo or fetching or ready or inferring or writing:
        # feed each stage while its queue has room
        # fetched cells wait in the cache; only their small records queue here, so fetching may
        # run ahead of inference (bounded: READY_AHEAD cells)
        while todo and len(fetching) < job.fetch_concurrency and len(ready) < READY_AHEAD:
            year, cell = todo.popleft()
            fetching[gum_fetch.remote(job_ref, year, cell.row, cell.col)] = (year, cell, time.time())
        while ready and min(actor_load) < 2:
            i = actor_load.index(min(actor_load))
            year, cell, info = ready.popleft()
            ref = actors[i].predict.remote(year, cell.row, cell.col)
            inferring[ref] = (year, cell, i, info)
            actor_load[i] += 1
        waitable = list(fetching) + list(inferring) + list(writing)
        done_refs, _ = ray.wait(waitable, num_returns=1, timeout=1.0)
        for ref in done_refs:
            if ref in fetching:
                year, cell, _ = fetching.pop(ref)
                try:
                    ready.append((year, cell, ray.get(ref)))
                except Exception as exc:  # noqa: BLE001 - recorded against the cell
                    fail(year, cell, exc)
            elif ref in inferring:
                year, cell, i, info = inferring.pop(ref)
                actor_load[i] -= 1
                if len(writing) >= job.write_concurrency:
                    # writes are the bottleneck: wait for one before queueing another
                    w_done: list = []
                    while not w_done:  # the lease is checked while waiting
                        w_done, _ = ray.wait(list(writing), num_returns=1, timeout=1.0)
                        lease.beat()
                    _finish_write(w_done[0], writing, summary, fail)
                times = {"fetch_s": round(info.get("fetch_s", 0), 3), "fetched": info.get("fetched")}
                writing[gum_write.remote(job_ref, year, cell.row, cell.col, ref, sha, times,
                                         lease.run_id, lease.generation)] = (year, cell)
            elif ref in writing:
                _finish_write(ref, writing, summary, fail)
        lease.beat()
        progress.update(summary, {"fetch": len(fetching), "infer": len(inferring) + len(ready),
                                  "write": len(writing)})


def _finish_write(ref, writing, summary: Summary, fail) -> None:
    import ray

    year, cell = writing.pop(ref)
    try:
        res = ray.get(ref)
    except Exception as exc:  # noqa: BLE001 - recorded against the cell
        fail(year, cell, exc)
        return
    summary.done += 1
    summary.empty += int(res["empty"])
    tot = summary.stage_totals
    for key in ("predict_s", "read_s", "crops", "write_s"):
        tot[key] = tot.get(key, 0.0) + float(res.get(key) or 0.0)
    tot["cells"] = tot.get("cells", 0.0) + 1
    if res.get("fetched"):
        tot["fetched"] = tot.get("fetched", 0.0) + 1
        tot["fetch_s"] = tot.get("fetch_s", 0.0) + float(res.get("fetch_s") or 0.0)
    summary.written_cells.add((cell.row, cell.col))
    summary.km2 += cell_km2(cell)


def iter_summary_lines(s: Summary, job: MapJob) -> Iterator[str]:
    yield (f"gum map: {s.done} cells mapped, {s.skipped} already done (skipped), {s.set_aside} set aside, "
           f"{s.retried} retried; {s.km2:.1f} km² in {s.wall_s:.1f} s ({s.km2_per_s:.2f} km²/s)")
    r = s.stage_rates()
    if "infer_crops_per_s" in r:
        fetch = f"fetch {r['fetch_s_per_cell']:.2f} s/cell, " if "fetch_s_per_cell" in r else ""
        yield (f"  measured: {fetch}inference {r['infer_crops_per_s']:.2f} crops/s per model actor "
               f"({r['infer_ms_per_crop']:.1f} ms/crop, of which cache read {r['cache_read_ms_per_crop']:.2f}), "
               f"write {r['write_s_per_cell']:.2f} s/cell")
    if s.remaining:
        yield f"  {s.remaining} cells left for later runs (--max-cells {job.max_cells}); run again to go on"
    for key, err in sorted(s.errors.items()):
        yield f"  set aside {key}: {err}"
