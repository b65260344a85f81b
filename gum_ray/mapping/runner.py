"""Run a mapping job on Ray: fetch (CPU tasks) -> inference (model actors) -> write (CPU tasks).

The three stages run at the same time. Each has a bounded number of items in flight, so memory is
bounded whatever the AOI: at most ``fetch_concurrency`` fetches, ``READY_AHEAD`` fetched cells
waiting (in the imagery cache; only their records are held), two cells queued per inference actor,
``write_concurrency`` writes. Scheduling, placement, data movement and worker failure are
Ray's (remote tasks, actors, ``ray.wait``); the driver only keeps the queues bounded and the books.

Resume is the manifest: committed cells are skipped; a failed cell is retried up to
``max_attempts`` times in this run (each failure recorded with its error and stage), then set aside
while the run goes on. The model actors load and warm up while the first cells are fetched; a lost
actor is replaced, and a try lost to the cluster (actor, node or object gone) is not counted against
the cell. On a cluster of more than one node every path must be ``gs://`` (docs/cluster.md).
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
from gum_ray.mapping.overviews import build_stale_overviews
from gum_ray.mapping.stages import CellPredictor, StageFailed, actor_cpus, fetch_cell, is_cluster_error, write_cell

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ planning


def cell_km2(cell: Cell) -> float:
    ys = cell.y_slice
    return float(pixel_area_rows(ys.start, ys.stop).astype("float64").sum() * cell.grid.cell_px / 1e6)


def plan_cells(job: MapJob, source: Any = None, listed: list[Cell] | None = None) -> list[Cell]:
    """The product cells that touch the AOI and that the source says can hold data (of ``listed``,
    the AOI's cells when the caller has them already)."""
    check_cell_cap(job.aoi, job.grid, job.max_aoi_cells)  # before anything is listed or fetched
    source = source or job.make_source()
    listed = cells_for_aoi(job.aoi, job.grid) if listed is None else listed
    cells = [c for c in listed if source.may_hold_data(c.bounds)]
    if not cells:
        raise InputError(
            f"nothing to map: the AOI {tuple(round(v, 5) for v in job.aoi.bounds)} has no land for "
            f"the {job.source} source (all its cells are ocean); check the coordinates (lon, lat order)"
        )
    return cells


# ------------------------------------------------------------------------------------ progress


@dataclasses.dataclass
class StageRates:
    """What each stage measured over the cells this run committed: the next ``gum plan``'s rates."""

    cells: int = 0
    fetched: int = 0  # cells fetched from the source (the rest were cached)
    fetch_s: float = 0.0
    requests: int = 0
    request_s: float = 0.0  # summed over requests, each from send to answer
    request_bytes: int = 0
    crops: int = 0
    predict_s: float = 0.0  # actor time, all of it (cache read, preprocessing, network, blending)
    read_s: float = 0.0  # of which reading and decompressing the cached imagery (a worker thread)
    write_s: float = 0.0

    def add(self, res: dict[str, Any]) -> None:
        f = res.get("fetch") or {}
        self.cells += 1
        self.fetched += int(bool(f.get("fetched")))
        self.fetch_s += float(f.get("fetch_s") or 0.0)
        self.requests += int(f.get("requests") or 0)
        self.request_s += float(f.get("request_s") or 0.0)
        self.request_bytes += int(f.get("request_bytes") or 0)
        self.crops += int(res.get("crops") or 0)
        self.predict_s += float(res.get("predict_s") or 0.0)
        self.read_s += float(res.get("read_s") or 0.0)
        self.write_s += float(res.get("write_s") or 0.0)

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["s_per_request"] = self.request_s / self.requests if self.requests else None
        d["crops_per_s"] = self.crops / self.predict_s if self.predict_s > 0 else None
        d["cache_read_ms_per_crop"] = 1000 * self.read_s / self.crops if self.crops else None
        d["write_s_per_cell"] = self.write_s / self.cells if self.cells else None
        return d

    def line(self) -> str | None:
        if not self.cells:
            return None
        parts = []
        if self.requests:
            parts.append(f"fetch {self.requests} requests at {self.request_s / self.requests:.2f} s each "
                         f"({self.request_bytes / 1e6:,.1f} MB)")
        elif self.fetched:
            parts.append(f"fetch {self.fetch_s / self.fetched:.2f} s per cell")
        if self.predict_s > 0:
            parts.append(f"inference {self.crops / self.predict_s:.2f} crops/s per actor "
                         f"({1000 * self.predict_s / max(self.crops, 1):.1f} ms per crop; cache "
                         f"read {1000 * self.read_s / max(self.crops, 1):.2f})")
        parts.append(f"write {self.write_s / self.cells:.2f} s per cell")
        return "  measured: " + ", ".join(parts) + " (gum plan --calibrate PRODUCT uses them)"


@dataclasses.dataclass
class Summary:
    planned: int = 0
    skipped: int = 0
    done: int = 0
    empty: int = 0
    set_aside: int = 0
    retried: int = 0
    cluster_retries: int = 0  # tries lost to the cluster (node or actor gone), not counted against cells
    actors_replaced: int = 0
    predict_calls: int = 0  # model-actor calls (each predicts up to cells_per_call cells)
    remaining: int = 0
    overview_shards: int = 0  # overview shards built (stale ones, whichever run committed their cells)
    km2: float = 0.0
    stream_s: float = 0.0
    wall_s: float = 0.0
    driver_peak_mb: float = 0.0
    driver_plan_rss_mb: float = 0.0  # resident memory once the plan and its queue are built
    errors: dict[str, str] = dataclasses.field(default_factory=dict)
    rates: StageRates = dataclasses.field(default_factory=lambda: StageRates())
    written_cells: set[tuple[int, int]] = dataclasses.field(default_factory=set, repr=False)

    @property
    def km2_per_s(self) -> float:
        return self.km2 / self.wall_s if self.wall_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["written_cells"] = len(self.written_cells)
        d["rates"] = self.rates.as_dict()
        d["km2_per_s"] = self.km2_per_s
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
    from gum_ray.quiet import local_ray_env, ray_logging_level, ray_runtime_env

    kwargs: dict[str, Any] = {"log_to_driver": True, "include_dashboard": False,
                              "logging_level": ray_logging_level()}
    where = address or os.environ.get("RAY_ADDRESS")
    if where and where not in ("auto", "local"):
        _check_reachable(where)
    try:
        if address:
            ray.init(address=address, runtime_env=_job_runtime_env(ray_runtime_env()), **kwargs)
        elif os.environ.get("RAY_ADDRESS"):
            ray.init(runtime_env=_job_runtime_env(ray_runtime_env()), **kwargs)
        else:
            # a local Ray keeps idle workers up to its CPU count and kills the rest after a second;
            # the stages' tasks (fetches, writes) and the model actors outnumber 2 CPUs, so workers
            # were killed and restarted (each re-importing gum-ray and re-initialising its source)
            workers = (os.cpu_count() or 1) + job.fetch_concurrency + job.write_concurrency
            # no runtime env: the workers inherit the job's variables, and the first actors and
            # fetches take the workers Ray prestarts (local_ray_env)
            with local_ray_env():
                ray.init(address="local", _system_config={"num_workers_soft_limit": workers}, **kwargs)
            _start_workers(1 + _actor_plan(job)[0] + job.fetch_concurrency)  # limiter, actors, fetches
        return True
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = address or os.environ.get("RAY_ADDRESS")
        raise GumError(
            f"cannot reach the Ray cluster at {where} ({str(exc).splitlines()[0][:160]}); start it "
            "(`ray start --head`) or leave --ray-address out to run on a local Ray"
        ) from None


def _actor_plan(job: MapJob) -> tuple[int, int, float]:
    """(model actors, CPUs each holds, GPUs) on the connected cluster: ``--infer-actors``, else one
    per GPU, else one (a CPU actor); each holds :func:`~gum_ray.mapping.stages.actor_cpus` CPUs."""
    import ray

    resources = ray.cluster_resources()
    n_gpus = float(resources.get("GPU", 0))
    n = job.infer_actors or (int(n_gpus) if n_gpus >= 1 else 1)
    return n, actor_cpus(job.threads_per_actor, n_gpus, float(resources.get("CPU", 1))), n_gpus


def _start_workers(n: int, hold_s: float = 0.5) -> None:
    """Ask a local Ray for ``n`` worker processes now, without waiting for them.

    Ray prestarts one worker per CPU as the driver connects; the request limiter and the model
    actor would take those, and the first fetches then wait for new workers, started on cores
    that the model actor is loading on (the first fetch began 1.8-2.4 s into the stream on 2
    cores). ``n`` tasks that only wait a moment, submitted as Ray starts, make it start the others
    while the driver opens the product; they stay idle until the stream (``num_workers_soft_limit``)
    and the first fetches begin at once. The tasks import nothing: on two cores, imports there ran
    into the stream and the fetches took new workers anyway."""
    import ray

    @ray.remote(num_cpus=0, max_retries=0)
    def gum_worker_start() -> None:
        time.sleep(hold_s)  # held, so that the n tasks take n workers

    for _ in range(n):
        gum_worker_start.remote()


#: node-local settings a driver must not hand to the workers of other nodes
NODE_LOCAL_ENV = ("GUM_CHECKPOINT_CACHE",)


def _job_runtime_env(runtime_env: dict[str, Any]) -> dict[str, Any]:
    """Our runtime env without node-local variables, and without the variables the submitted job's
    own runtime env sets (``ray job submit --runtime-env-json``): Ray refuses to merge the two when
    a key is in both, and the job's value is the one the submitter meant."""
    env_vars = {k: v for k, v in runtime_env.get("env_vars", {}).items() if k not in NODE_LOCAL_ENV}
    try:
        injected = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "") or "{}")
        job_vars = ((injected.get("runtime_env") or {}).get("env_vars") or {})
    except (ValueError, AttributeError):
        job_vars = {}
    return {**runtime_env, "env_vars": {k: v for k, v in env_vars.items() if k not in job_vars}}


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

    # a fetch mostly waits on the source (Earth Engine requests): a quarter CPU, so that on a small
    # node the fetches and the model actor don't hold every CPU and keep the writes waiting
    @ray.remote(num_cpus=0.25, max_retries=0)
    def gum_fetch(job: MapJob, year: int, row: int, col: int) -> dict[str, Any]:
        return fetch_cell(job, year, row, col)

    @ray.remote(num_cpus=0.5, max_retries=0)
    def gum_write(job, year, row, col, boxed, sha, times, run_id, lease_generation):
        # the prediction comes boxed (a list holding its ref), so a failed prediction is reported
        # as the predict stage's, not as this task's
        try:
            predicted = ray.get(boxed[0])
        except Exception as exc:  # noqa: BLE001 - re-raised as the predict stage's failure
            raise _stage_failed("predict", exc) from None
        if isinstance(predicted, StageFailed):  # this cell failed in its actor's call (its mates did not)
            raise predicted
        return write_cell(job, year, row, col, predicted, sha, times, run_id, lease_generation)

    # no automatic restarts: a dead actor leaves the rotation and the driver starts a replacement
    # (which is loaded and warmed up before it is given a cell)
    opts: dict[str, Any] = {"max_restarts": 0, "max_task_retries": 0}
    if n_gpus >= 1:
        opts["num_gpus"] = 1
        opts["num_cpus"] = 1
    else:
        opts["num_cpus"] = 1
    GumInferActor = ray.remote(**opts)(CellPredictor)
    return gum_fetch, gum_write, GumInferActor


def _unwrap(exc: BaseException) -> BaseException:
    """The error a Ray task raised (its cause), else ``exc`` itself."""
    import ray

    if isinstance(exc, ray.exceptions.RayTaskError) and getattr(exc, "cause", None) is not None:
        return exc.cause
    return exc


def _stage_failed(stage: str, exc: BaseException) -> StageFailed:
    err = _unwrap(exc)
    if isinstance(err, StageFailed):
        return err
    return StageFailed(stage, type(err).__name__, str(err).splitlines()[0][:500] if str(err) else "",
                       is_cluster_error(err))


def cluster_nodes() -> int:
    """The alive nodes of the Ray cluster this process is connected to."""
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive"))


def check_shared_paths(job: MapJob, checkpoint: str, nodes: int) -> None:
    """On a cluster of more than one node every path a task opens must be shared (``gs://``):
    refused before anything runs otherwise, with what to do."""
    from gum_ray.store import fs

    if nodes <= 1:
        return
    paths = [("checkpoint", checkpoint, "--checkpoint"), ("product", job.product, "--product or --data-dir"),
             ("imagery cache", job.cache, "--cache or --data-dir")]
    if job.source == "geotiff":
        paths.append(("geotiff exports", str(job.source_kwargs().get("path", "")), "--source-option path="))
    for what, path, flag in paths:
        if path and not fs.is_remote(path):
            hint = ""
            if what == "checkpoint":
                hint = (f" (upload it once: gcloud storage cp {checkpoint} gs://BUCKET/gum.pth, then "
                        "--checkpoint gs://BUCKET/gum.pth; the synthetic world's demo model too)")
            raise InputError(
                f"{what} {path} is on this node only, but the Ray cluster has {nodes} nodes: give a "
                f"gs:// path with {flag}{hint}", param=what.split()[-1])


def run_map(job: MapJob, *, ray_address: str | None = None, live: bool | None = None,
            log_every_s: float = 10.0) -> Summary:
    """Run ``job`` to completion (resuming); returns the summary. See the module docstring."""
    import ray

    from gum_ray.network import check_compatible, load_model
    from gum_ray.store.checkpoints import local_checkpoint

    t0 = time.time()
    source = job.make_source()  # validates the source options before anything is written
    checkpoint = job.resolved_checkpoint(source)  # a local path or a gs:// object
    model = load_model(local_checkpoint(checkpoint), family=job.model)  # a remote one: fetched into this node's cache
    check_compatible(model, source.with_products, what=f"the {job.source} source")
    sha = model.provenance()["checkpoint_sha256"]
    del model
    cells = plan_cells(job, source)
    _check_existing_product(job)
    connected_here = connect_ray(ray_address, job)
    try:
        check_shared_paths(job, checkpoint, cluster_nodes())
        return _run_connected(job, source, cells, checkpoint, sha, t0, live, log_every_s)
    finally:
        if connected_here:  # a local Ray started for this run stops with it
            ray.shutdown()


def _run_connected(job, source, cells, checkpoint, sha, t0, live, log_every_s) -> Summary:
    import ray

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
        ProductStore.open_or_create(job.product, settings=ProductSettings(grid=job.grid), years=job.years)
        manifest = Manifest(job.product, job.grid)
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        _record_run(job, lease, cells, started)
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
        # the pyramid: every stale overview shard of the job's years, whoever committed the cells
        # under it (a run that died before its pyramid leaves them to this one)
        summary.overview_shards = build_stale_overviews(job, ray.put(job), lease)
        lease.beat()  # LeaseLost if a heartbeat was refused while the pyramid was built
        _record_run(job, lease, cells, started, summary)
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


def _record_run(job: MapJob, lease: RunLease, cells: list[Cell], started: str,
                summary: Summary | None = None) -> None:
    """Write the run's record (``_manifest/runs/<run_id>.json``); with ``summary``, as finished."""
    from gum_ray.store import fs

    record = {"run_id": lease.run_id, "started": started,
              "aoi": job.aoi.to_geojson(), "years": list(job.years), "cells": len(cells),
              "source": job.source, "settings": job.settings_record(), "max_attempts": job.max_attempts,
              "cache": job.cache, "cache_key": job.cache_key, "keep_cache": job.keep_cache}
    if summary is not None:
        record.update({"finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                       "cells_done": summary.done, "set_aside": summary.set_aside,
                       "stream_s": round(summary.stream_s, 3), "rates": summary.rates.as_dict()})
    fs.write_bytes(fs.join(job.product, "_manifest", "runs", f"{lease.run_id}.json"),
                   json.dumps(record, indent=1, default=str).encode())


READY_AHEAD = 32
#: tries of a cell lost to the cluster (a node or actor gone) in one run before they count against it
MAX_CLUSTER_RETRIES = 10
ACTOR_START_TIMEOUT_S = 900.0


class _ModelActors:
    """The model actors: created, loaded and warmed up before use; a dead one leaves the rotation
    and a new one takes its place (once it is loaded)."""

    def __init__(self, actor_cls, n: int, threads: int, job: MapJob, checkpoint: str, sha: str):
        self.make = lambda: actor_cls.options(num_cpus=threads).remote(job, checkpoint, threads, sha)
        self.actors: list[Any] = [None] * n
        self.gen = [0] * n  # bumped on each replacement: results of an old actor are told apart
        self.load = [0] * n
        self.ready = [False] * n
        self.starting: dict[Any, int] = {}  # ready() ref -> slot
        self.replaced = 0
        self.deadline = 0.0  # by when some actor must be ready (each start extends it)
        for i in range(n):
            self._start(i)

    def _start(self, i: int) -> None:
        self.deadline = max(self.deadline, time.time() + ACTOR_START_TIMEOUT_S)
        self.actors[i] = self.make()
        self.ready[i] = False
        self.load[i] = 0
        self.starting[self.actors[i].ready.remote()] = i

    def replace(self, i: int, gen: int) -> None:
        """Replace the actor of slot ``i`` if it is still the one of generation ``gen``."""
        import ray

        if self.gen[i] != gen:
            return  # replaced already
        try:
            ray.kill(self.actors[i], no_restart=True)
        except Exception:  # noqa: BLE001 - it is gone already
            pass
        self.gen[i] += 1
        self.replaced += 1
        log.warning("model actor %d lost; starting a replacement", i)
        self._start(i)

    def started(self, ref) -> None:
        """A ready() ref finished: the slot joins the rotation, or (lost at start) is restarted;
        a loading error stops the run."""
        import ray

        i = self.starting.pop(ref)
        try:
            ray.get(ref)
        except Exception as exc:  # noqa: BLE001 - a loading error or a lost actor
            err = _unwrap(exc)
            if is_cluster_error(err):
                self.gen[i] += 1
                self.replaced += 1
                self._start(i)
                return
            raise GumError(f"the model cannot be loaded on the cluster: {str(err).splitlines()[0][:400]}") from None
        self.ready[i] = True

    def pick(self, room: int = 2) -> int | None:
        """The least loaded ready actor with room (``room`` cells queued at most), or None."""
        best = None
        for i in range(len(self.actors)):
            if self.ready[i] and self.load[i] < room and (best is None or self.load[i] < self.load[best]):
                best = i
        return best

    def wait_all_ready(self, lease: RunLease) -> None:
        import ray

        while self.starting:
            done, _ = ray.wait(list(self.starting), num_returns=1, timeout=1.0)
            for ref in done:
                self.started(ref)
            lease.beat()
            self.check_start_deadline()

    def check_start_deadline(self) -> None:
        """A :class:`GumError` once no actor is ready ``ACTOR_START_TIMEOUT_S`` after the last start
        (the first ones, or a replacement of the last actor lost mid-run)."""
        if not any(self.ready) and time.time() > self.deadline:
            raise GumError(
                f"the model actors did not start within {ACTOR_START_TIMEOUT_S:.0f} s: the cluster "
                "has no free CPU/GPU for them (see `ray status`); add nodes or lower --infer-actors")


def _stream(job, todo, checkpoint, sha, summary, progress, lease, manifest) -> None:
    import ray

    # the CPUs an actor holds = its torch threads (beside a GPU, its cache reader threads too): more
    # would oversubscribe the cores that the fetch and write tasks run on (OpenMP spin-waits make
    # that far slower than it looks)
    n_actors, threads, n_gpus = _actor_plan(job)
    gum_fetch, gum_write, GumInferActor = _remote_stages(job, n_gpus)
    job_ref = ray.put(job)
    # cells per actor call: on a GPU, full batches across cells and the next cell read ahead
    per_call = job.cells_per_call or (4 if n_gpus >= 1 else 1)
    actors = _ModelActors(GumInferActor, n_actors, threads, job, checkpoint, sha)
    # the actors load and warm up while the first cells are fetched (they are given cells once
    # ready); a checkpoint that cannot load stops the run with its one line, and what was fetched
    # meanwhile stays in the imagery cache for the next run (no Earth Engine quota lost)
    fetching: dict[Any, tuple[int, Cell, float]] = {}
    ready: collections.deque[tuple[int, Cell, dict]] = collections.deque()
    inferring: dict[Any, tuple[int, Cell, int, int, dict]] = {}
    predicted: collections.deque[tuple[int, Cell, int, int, dict, Any]] = collections.deque()
    write_ahead = 2 * per_call * n_actors
    t_stream = time.time()
    writing: dict[Any, tuple[int, Cell, int, int]] = {}
    attempts: collections.Counter = collections.Counter()  # this run's failures per (year, cell)
    cluster_fails: collections.Counter = collections.Counter()

    def fail(year: int, cell: Cell, stage: str, exc: BaseException) -> None:
        err = _stage_failed(stage, exc)
        key = (year, cell.id)
        if err.cluster and cluster_fails[key] < MAX_CLUSTER_RETRIES:
            # the cluster's fault (a node or actor lost): tried again, not counted against the cell
            cluster_fails[key] += 1
            summary.cluster_retries += 1
            todo.append((year, cell))
            log.warning("cell %s year %s: %s lost to the cluster (%s); queued again", cell.id, year,
                        err.stage, err)
            return
        attempts[key] += 1
        manifest.record_failure(year, cell, f"{err.error_type}: {err.message}",
                                extra={"stage": err.stage, "cluster": err.cluster}, run_id=lease.run_id)
        attempt = attempts[key]
        if attempt < job.max_attempts:
            summary.retried += 1
            todo.append((year, cell))
        else:
            summary.set_aside += 1
            summary.errors[f"{year}/{cell.id}"] = f"{err.stage}: {err.error_type}: {err.message[:300]}"
        log.warning("cell %s year %s failed in %s (attempt %d of %d): %s", cell.id, year, err.stage,
                    attempt, job.max_attempts, err.message[:200] or err.error_type)

    def finish_write(ref) -> None:
        year, cell, i, gen = writing.pop(ref)
        try:
            res = ray.get(ref)
        except Exception as exc:  # noqa: BLE001 - recorded against the cell, or the cluster's
            err = _stage_failed("write", exc)
            if err.stage == "predict" and err.cluster and err.error_type != "LeaseLost":
                actors.replace(i, gen)  # its actor is gone: out of the rotation, replaced
            fail(year, cell, "write", err)
            return
        summary.done += 1
        summary.rates.add(res)
        summary.empty += int(res["empty"])
        summary.written_cells.add((cell.row, cell.col))
        summary.km2 += cell_km2(cell)

    while todo or fetching or ready or inferring or predicted or writing:
        # feed each stage while its queue has room; the driver never blocks on one stage (a full
        # write queue must not stop fetches from being submitted)
        while predicted and len(writing) < job.write_concurrency:
            year, cell, i, gen, info, ref = predicted.popleft()
            times = {"fetch_s": round(info.get("fetch_s", 0), 3), "fetched": info.get("fetched"),
                     **{k: info[k] for k in ("requests", "request_s", "request_bytes") if k in info}}
            writing[gum_write.remote(job_ref, year, cell.row, cell.col, [ref], sha, times,
                                     lease.run_id, lease.generation)] = (year, cell, i, gen)
        # fetched cells wait in the cache; only their small records queue here, so fetching may
        # run ahead of inference (bounded: READY_AHEAD cells)
        while todo and len(fetching) < job.fetch_concurrency and len(ready) < READY_AHEAD:
            year, cell = todo.popleft()
            fetching[gum_fetch.remote(job_ref, year, cell.row, cell.col)] = (year, cell, time.time())
        # a call predicts up to per_call cells of one year, their crops batched together; a busy
        # actor waits for a full call while more cells are coming, an idle one takes what is ready
        # (bounded: predictions waiting for a write slot hold memory in the object store)
        while ready and len(predicted) < write_ahead and (i := actors.pick(2 * per_call)) is not None:
            if len(ready) < per_call and actors.load[i] > 0 and (todo or fetching):
                break
            group = [ready.popleft()]
            while len(group) < per_call and ready and ready[0][0] == group[0][0]:
                group.append(ready.popleft())
            refs = actors.actors[i].predict_group.options(num_returns=len(group)).remote(
                group[0][0], [(cell.row, cell.col) for _, cell, _ in group])
            summary.predict_calls += 1
            for ref, (year, cell, info) in zip(refs if len(group) > 1 else [refs], group):
                inferring[ref] = (year, cell, i, actors.gen[i], info)
                actors.load[i] += 1
        waitable = list(fetching) + list(inferring) + list(writing) + list(actors.starting)
        done_refs, _ = ray.wait(waitable, num_returns=1, timeout=1.0)
        for ref in done_refs:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("t=%.2f s: %s done", time.time() - t_stream, "fetch" if ref in fetching else
                          "actor start" if ref in actors.starting else "predict" if ref in inferring else "write")
            if ref in fetching:
                year, cell, _ = fetching.pop(ref)
                try:
                    ready.append((year, cell, ray.get(ref)))
                except Exception as exc:  # noqa: BLE001 - recorded against the cell
                    fail(year, cell, "fetch", exc)
            elif ref in actors.starting:
                actors.started(ref)
            elif ref in inferring:
                year, cell, i, gen, info = inferring.pop(ref)
                if actors.gen[i] == gen:
                    actors.load[i] -= 1
                predicted.append((year, cell, i, gen, info, ref))  # written once a write slot is free
            elif ref in writing:
                finish_write(ref)
        lease.beat()
        actors.check_start_deadline()
        progress.update(summary, {"fetch": len(fetching), "infer": len(inferring) + len(ready),
                                  "write": len(writing) + len(predicted)})
    summary.actors_replaced = actors.replaced


def iter_summary_lines(s: Summary, job: MapJob) -> Iterator[str]:
    yield (f"gum map: {s.done} cells mapped, {s.skipped} already done (skipped), {s.set_aside} set aside, "
           f"{s.retried} retried; {s.km2:.1f} km² in {s.wall_s:.1f} s ({s.km2_per_s:.2f} km²/s)")
    if s.overview_shards:
        yield f"  {s.overview_shards} overview shards built"
    rates = s.rates.line()
    if rates:
        yield rates
    if s.cluster_retries or s.actors_replaced:
        yield (f"  {s.cluster_retries} tries lost to the cluster (a node or model actor gone; not counted "
               f"against the cells), {s.actors_replaced} model actors replaced")
    if s.remaining:
        yield f"  {s.remaining} cells left for later runs (--max-cells {job.max_cells}); run again to go on"
    for key, err in sorted(s.errors.items()):
        yield f"  set aside {key}: {err}"
