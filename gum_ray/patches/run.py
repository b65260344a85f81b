"""Making patches: fetch -> label -> write per point, inline, in a thread pool, or as Ray tasks.

See :mod:`gum_ray.patches` for the format and :func:`run_patches` for the job.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import numpy as np

from gum_ray.errors import GumError, InputError
from gum_ray.grid import centre_offset_px, geobox_to_dict, point_geobox
from gum_ray.imagery import NODATA, Imagery
from gum_ray.patches.dataset import DONE_STATUSES, STATUS_COMPLETE, STATUS_NO_IMAGERY, PatchDataset
from gum_ray.patches.points import Point

log = logging.getLogger(__name__)

PATCH_SIZE = 256
PATCH_RESOLUTION_M = 10.0
#: Default share of the patch that must have Sentinel-2 data, else the point is skipped.
DEFAULT_MIN_VALID = 0.5

Executor = Literal["inline", "local", "ray"]


class Labeler:
    """The model's probability and class on a patch (the pseudo-label); the model loads lazily."""

    def __init__(self, checkpoint: str, settings: Any = None, sha256: str | None = None,
                 family: str | None = None):
        self.checkpoint = str(checkpoint)
        self.family = family
        self.settings = settings
        self.sha256 = sha256  # the driver's: a gs:// checkpoint is fetched once per node, checked
        self._engine = None
        self._lock = threading.Lock()

    @property
    def engine(self):
        with self._lock:
            if self._engine is None:
                from gum_ray.inference import InferenceEngine
                from gum_ray.network import load_model
                from gum_ray.store.checkpoints import local_checkpoint

                # a gs:// checkpoint is fetched once per node into the local cache
                self._engine = InferenceEngine(load_model(local_checkpoint(self.checkpoint, self.sha256),
                                                          family=self.family), self.settings)
        return self._engine

    def mapped(self, imagery: Imagery) -> np.ndarray:
        """The pixels the model maps (its family's rule: GUM 1 needs Sentinel-2, GUM 2.0 either S2 or S1)."""
        return np.asarray(self.engine.model.validity(imagery.export))

    def label(self, imagery: Imagery) -> tuple[np.ndarray, np.ndarray]:
        """Imagery -> (probability uint8 percent, class uint8), 255 (NODATA) = no data."""
        engine = self.engine
        with self._lock:  # one network run at a time; fetches and writes overlap around it
            pred = engine.predict_imagery(imagery)
        return pred.percent(), pred.classes()


# ---------------------------------------------------------------------------------------- the job


@dataclasses.dataclass(frozen=True)
class PatchJob:
    """What ``gum patches`` does: points, year, source, model and where to write (picklable)."""

    points: tuple[Point, ...]
    year: int
    out: str
    source: str = "synthetic"
    source_options: tuple[tuple[str, Any], ...] = ()
    checkpoint: str | None = None
    model: str | None = None  # model family to insist on ("gum1", "gum2"); None = read from the checkpoint
    inference: Any = None  # InferenceSettings (None = defaults)
    size: int = PATCH_SIZE
    resolution: float = PATCH_RESOLUTION_M
    min_valid: float = DEFAULT_MIN_VALID
    geotiff: bool = True
    labels: bool = True  # False: imagery only (for the user's own labels), no model needed

    def __post_init__(self) -> None:
        if not self.points:
            raise InputError("no points given; a points file needs at least one Point feature")
        if not 0.0 <= self.min_valid <= 1.0:
            raise InputError(f"min_valid {self.min_valid}: give a fraction between 0 and 1", param="min_valid")
        if self.size < 16:
            raise InputError(f"patch size {self.size} px: must be at least 16")

    def make_source(self):
        from gum_ray.sources import get_source

        return get_source(self.source, **dict(self.source_options))

    def resolved_checkpoint(self, source: Any = None) -> str | None:
        """The given checkpoint, else the source's default (the synthetic world's demo model); None
        without labels."""
        if not self.labels:
            return None
        from gum_ray.demo_gum2 import resolve_demo_checkpoint

        return resolve_demo_checkpoint(self.checkpoint, source or self.make_source(), self.model)


@dataclasses.dataclass
class PatchOutcome:
    """What happened to one point."""

    id: str
    key: str
    status: str  # complete | no_imagery | done_before | failed
    message: str = ""
    seconds: float = 0.0


@dataclasses.dataclass
class PatchReport:
    """The run's summary; ``outcomes`` has one entry per point."""

    out: str
    outcomes: list[PatchOutcome]
    seconds: float

    def by_status(self, status: str) -> list[PatchOutcome]:
        return [o for o in self.outcomes if o.status == status]

    @property
    def written(self) -> int:
        return len(self.by_status(STATUS_COMPLETE))

    @property
    def no_imagery(self) -> list[PatchOutcome]:
        return self.by_status(STATUS_NO_IMAGERY)

    @property
    def done_before(self) -> int:
        return len(self.by_status("done_before"))

    @property
    def failed(self) -> list[PatchOutcome]:
        return self.by_status("failed")


class _Context:
    """What a worker needs, built once per process (the source, the labeller, the dataset)."""

    def __init__(self, job: PatchJob, checkpoint: str | None, limiter: Any = None,
                 sha256: str | None = None):
        self.job = job
        self.source = job.make_source()
        if limiter is not None:
            self.source.use_limiter(limiter)
        self.labeler = Labeler(checkpoint, job.inference, sha256, job.model) if checkpoint else None
        self.dataset = PatchDataset(job.out)


_CONTEXTS: dict[tuple[str, str | None], _Context] = {}
_CONTEXTS_LOCK = threading.Lock()


def _context(job: PatchJob, checkpoint: str | None, limiter: Any = None,
             sha256: str | None = None) -> _Context:
    key = (repr(dataclasses.replace(job, points=job.points[:1])), checkpoint)  # all but the points
    with _CONTEXTS_LOCK:
        ctx = _CONTEXTS.get(key)
        if ctx is None:
            _CONTEXTS.clear()  # one job per worker process at a time
            ctx = _CONTEXTS[key] = _Context(job, checkpoint, limiter, sha256)
        return ctx


def make_patch(point: Point, ctx: _Context, checkpoint_sha256: str | None) -> PatchOutcome:
    """Fetch, label and store the patch of one point; a missing-imagery point is recorded, not fatal."""
    t0 = time.perf_counter()
    job = ctx.job
    geobox = point_geobox(point.lon, point.lat, job.size, job.resolution)
    dx, dy = centre_offset_px(geobox, point.lon, point.lat)
    attrs: dict[str, Any] = {
        "id": point.id, "key": point.key, "index": point.index, "lon": point.lon, "lat": point.lat,
        "year": job.year, "geobox": geobox_to_dict(geobox), "centre_offset_px": [dx, dy],
        "checkpoint_sha256": checkpoint_sha256,
    }
    # a source error (network, quota, credentials) is a failure, retried by a rerun; missing
    # imagery comes back as NaN and is recorded below as "no imagery"
    imagery = ctx.source.fetch(geobox, job.year)
    # what the labelling model can map (GUM 2.0 maps clouded pixels from Sentinel-1); without a
    # model, what GUM 1 needs (Sentinel-2)
    valid = ctx.labeler.mapped(imagery) if ctx.labeler is not None else imagery.valid
    frac = float(valid.mean())
    attrs |= {"provenance": imagery.provenance, "valid_fraction": frac,
              "band_names": list(imagery.band_names)}
    if frac <= 0.0 or frac < job.min_valid:
        gum2 = ctx.labeler is not None and ctx.labeler.engine.model.family == "gum2"
        what = "Sentinel-2 or Sentinel-1 data" if gum2 else "Sentinel-2 data"
        why = (f"no {what} in the patch for {job.year}" if frac <= 0.0 else
               f"{what} on {frac:.0%} of the patch, less than --min-valid {job.min_valid:.0%}")
        ctx.dataset.write_no_imagery(point, attrs | {"reason": why})
        return PatchOutcome(point.id, point.key, STATUS_NO_IMAGERY, why, time.perf_counter() - t0)
    prob = cls = None
    if ctx.labeler is not None:
        prob, cls = ctx.labeler.label(imagery)
        ok = cls != NODATA
        attrs |= {"urban_fraction": float((cls[ok] == 1).mean()) if ok.any() else 0.0}
    ctx.dataset.write_entry(point, imagery, prob, cls, attrs, geotiff=job.geotiff)
    return PatchOutcome(point.id, point.key, STATUS_COMPLETE, "", time.perf_counter() - t0)


def _safe_make_patch(point: Point, job: PatchJob, checkpoint: str | None, sha: str | None,
                     limiter: Any = None) -> PatchOutcome:
    t0 = time.perf_counter()
    try:
        return make_patch(point, _context(job, checkpoint, limiter, sha), sha)
    except Exception as exc:  # noqa: BLE001 - one failing point must not stop the run
        log.debug("patch %s failed", point.id, exc_info=True)
        msg = str(exc) if isinstance(exc, GumError) else f"{type(exc).__name__}: {exc}"
        return PatchOutcome(point.id, point.key, "failed", msg[:500], time.perf_counter() - t0)


def plan_patches(job: PatchJob, dataset: PatchDataset) -> tuple[list[Point], list[PatchOutcome]]:
    """Points still to do, and outcomes for those already done (status says so)."""
    todo, done = [], []
    existing = set(dataset.keys())
    wanted = [p.key for p in job.points if p.key in existing]
    if len(wanted) > 32:  # many small reads (one per entry): overlap them (object stores)
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=16) as pool:
            found = dict(zip(wanted, pool.map(dataset.entry_attrs, wanted)))
    else:
        found = {k: dataset.entry_attrs(k) for k in wanted}
    for p in job.points:
        attrs = found.get(p.key)
        if attrs and attrs.get("status") in DONE_STATUSES:
            if abs(float(attrs.get("lon", p.lon)) - p.lon) > 1e-9 or abs(float(attrs.get("lat", p.lat)) - p.lat) > 1e-9:
                raise InputError(
                    f"{dataset.root}: point {p.id!r} is stored at ({attrs.get('lon')}, {attrs.get('lat')}) "
                    f"but the points file puts it at ({p.lon}, {p.lat}); give it a new id or use a new out",
                    param="out",
                )
            done.append(PatchOutcome(p.id, p.key, "done_before", str(attrs.get("status"))))
        else:
            todo.append(p)
    return todo, done


def run_patches(
    job: PatchJob,
    *,
    executor: Executor = "local",
    workers: int | None = None,
    ray_address: str | None = None,
    progress: Callable[[PatchOutcome], None] | None = None,
    limiter_for: Callable[[Any], Any] | None = None,
) -> PatchReport:
    """Make the patches of ``job``: resumable, in this process, a thread pool, or Ray tasks.

    ``limiter_for(limit)`` makes the limiter that every fetch shares when the source has a request
    limit (:meth:`~gum_ray.sources.base.ImagerySource.request_limit`; ``gum patches`` passes
    :func:`gum_ray.mapping.limits.limiter_for`); it is called once, on this process (after Ray is
    up for ``executor="ray"``). Without it, each fetch caps only its own requests.
    """
    t0 = time.perf_counter()
    from gum_ray.inference import InferenceSettings
    from gum_ray.network import check_compatible, load_model
    from gum_ray.sources import check_year

    check_year(job.year, source="patches")
    source = job.make_source()
    checkpoint = job.resolved_checkpoint(source)
    sha = spec = family = None
    if checkpoint is not None:
        from gum_ray.store.checkpoints import local_checkpoint

        model = load_model(local_checkpoint(checkpoint), family=job.model)  # validate before any fetch (clear error, once)
        check_compatible(model, source.with_products, what=f"the {job.source} source")
        prov = model.provenance()
        sha, spec, family = prov["checkpoint_sha256"], prov["spec"], prov["family"]
        del model
    settings = job.inference or InferenceSettings()
    job = dataclasses.replace(job, inference=settings)
    dataset = PatchDataset(job.out)
    dataset.create({
        "year": job.year, "patch_size": job.size, "resolution_m": job.resolution,
        "source": source.describe(), "with_products": bool(source.with_products),
        "checkpoint_sha256": sha, "checkpoint": os.path.basename(checkpoint) if checkpoint else None,
        "model_spec": spec, "model_family": family, "inference": settings.as_dict() if checkpoint else None,
        "min_valid": job.min_valid,
        "labels": ("class = the model's argmax (pseudo-label); label = the user's, where added"
                   if checkpoint else "imagery only: add labels with PatchDataset.set_label"),
    })
    todo, outcomes = plan_patches(job, dataset)
    for o in outcomes:
        if progress:
            progress(o)

    def note(o: PatchOutcome) -> None:
        outcomes.append(o)
        if progress:
            progress(o)

    limit = source.request_limit() if limiter_for is not None else None

    def shared_limiter() -> Any:
        return limiter_for(limit) if limit is not None else None

    if executor == "inline" or (executor == "local" and (workers or 1) <= 1) or not todo:
        limiter = shared_limiter()
        for p in todo:
            note(_safe_make_patch(p, job, checkpoint, sha, limiter))
    elif executor == "local":
        from concurrent.futures import ThreadPoolExecutor, as_completed

        limiter = shared_limiter()
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gum-patch") as pool:
            futures = [pool.submit(_safe_make_patch, p, job, checkpoint, sha, limiter) for p in todo]
            for f in as_completed(futures):
                note(f.result())
    elif executor == "ray":
        for o in _run_ray(todo, job, checkpoint, sha, ray_address, workers, shared_limiter):
            note(o)
    else:
        raise InputError(f"executor {executor!r}: use inline, local or ray")
    order = {p.key: i for i, p in enumerate(job.points)}
    outcomes.sort(key=lambda o: order.get(o.key, 0))
    return PatchReport(dataset.root, outcomes, time.perf_counter() - t0)


def _run_ray(todo: Sequence[Point], job: PatchJob, checkpoint: str | None, sha: str | None,
             address: str | None, workers: int | None,
             make_limiter: Callable[[], Any] = lambda: None) -> Iterable[PatchOutcome]:
    """Ray tasks, one per point, at most ``workers`` (default: 2 x cluster CPUs) in flight."""
    import ray

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS") or "local"
        from gum_ray.quiet import local_ray_env, ray_logging_level, ray_runtime_env

        if address == "local":  # its workers inherit the job's variables (prestarted workers serve it)
            with local_ray_env():
                ray.init(address=address, log_to_driver=False, logging_level=ray_logging_level(),
                         include_dashboard=False)
        else:
            ray.init(address=address, log_to_driver=False, runtime_env=ray_runtime_env(),
                     logging_level=ray_logging_level())
    remote = ray.remote(num_cpus=1, max_retries=2)(_safe_make_patch)
    job_ref = ray.put(job)
    limiter = make_limiter()  # cluster-wide now that Ray is up; held here for the whole run
    cap = workers or max(2, int(2 * ray.cluster_resources().get("CPU", 1)))
    pending: list[Any] = []
    it = iter(todo)
    for p in it:
        pending.append(remote.remote(p, job_ref, checkpoint, sha, limiter))
        if len(pending) >= cap:
            ready, pending = ray.wait(pending, num_returns=1)
            yield from ray.get(ready)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        yield from ray.get(ready)
