"""The three stages of a mapping job, as plain Python (Ray wraps them in :mod:`.runner`).

* :func:`fetch_cell`: cell -> its UTM 10 m GeoBox (+ halo) -> imagery source -> imagery cache.
  Skips the source when the cache already holds the cell (no Earth Engine quota spent twice) under
  the source's key (:meth:`~gum_ray.sources.base.ImagerySource.cache_key`: name, recipe version,
  bands and the settings that decide the pixels, such as the synthetic world's clouds). The cache
  does not depend on the model: with ``--keep-cache``, a new checkpoint (any family) re-maps cached
  cells into a new product without fetching.
* :class:`CellPredictor`: cached :class:`~gum_ray.imagery.Imagery` -> the model's preprocessing ->
  overlap-blend inference -> a :class:`~gum_ray.imagery.Prediction` on the UTM grid (P(urban) as
  float16, NaN = no data where the model's ``validity`` says so, and the input quality). Holds the
  model; one per GPU (or CPU) as a Ray actor.
* :func:`write_cell`: the Prediction -> warp (bilinear P(urban), nearest input quality) -> product
  grid -> one whole shard per variable -> commit marker.

Fetch and write return a small dict (what happened, timings); errors propagate as exceptions and
the runner records them against the cell. A source with a shared request cap gets the job's limiter
(:mod:`gum_ray.mapping.limits`) wherever it runs.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import time
from typing import Any

import numpy as np

from gum_ray.imagery import Prediction
from gum_ray.mapping.job import MapJob
from gum_ray.network import check_compatible
from gum_ray.shuffled import ShuffledPart

_SOURCES: dict[tuple, Any] = {}


def source_for(job: MapJob):
    """One source object per worker process and job settings (connections are reused).

    A source with a shared request cap gets the job's limiter: cluster-wide inside Ray (a named
    actor the driver created), else per process.
    """
    key = (job.source, job.source_options)
    if key not in _SOURCES:
        source = job.make_source()
        limit = source.request_limit()
        if limit is not None:
            from gum_ray.mapping.limits import limiter_for

            source.use_limiter(limiter_for(limit))
        _SOURCES[key] = source
    return _SOURCES[key]


def fetch_cell(job: MapJob, year: int, row: int, col: int, source=None) -> dict[str, Any]:
    """Make sure the imagery of (year, cell) is in the cache; returns what was done."""
    t0 = time.perf_counter()
    cell = job.cell(row, col)
    cache = job.imagery_cache()
    if cache.has(year, cell):
        return {"fetched": False, "fetch_s": time.perf_counter() - t0}
    source = source or source_for(job)
    geobox = cell.utm_geobox(job.halo_px)
    imagery = source.fetch(geobox, year)
    cache.put(year, cell, imagery)
    req = imagery.provenance.get("requests") or {}  # what the fetch cost (sources that make requests)
    return {"fetched": True, "fetch_s": time.perf_counter() - t0, "requests": int(req.get("attempts", 0)),
            "request_s": float(req.get("request_seconds", 0.0)), "request_bytes": int(req.get("bytes", 0))}


class StageFailed(Exception):
    """A cell's failure in a stage before the one that reports it (the write task reports a
    prediction that failed): ``stage`` (fetch / predict / write), ``cluster`` (the cluster's fault:
    an actor or node lost, not the cell's), and the original error's type and message."""

    def __init__(self, stage: str, error_type: str, message: str, cluster: bool):
        super().__init__(stage, error_type, message, cluster)
        self.stage, self.error_type, self.message, self.cluster = stage, error_type, message, cluster

    def __str__(self) -> str:
        return f"{self.error_type}: {self.message}"


#: Ray's errors that are the cluster's, not the cell's: a worker, actor, node or object lost
CLUSTER_ERRORS = ("ActorDiedError", "ActorUnavailableError", "RayActorError", "NodeDiedError",
                  "WorkerCrashedError", "LocalRayletDiedError", "OwnerDiedError", "ObjectLostError",
                  "ObjectFetchTimedOutError", "ObjectReconstructionFailedError",
                  "ObjectReconstructionFailedMaxAttemptsExceededError",
                  "ObjectReconstructionFailedLineageEvictedError", "ReferenceCountingAssertionError",
                  "TaskUnschedulableError", "ActorUnschedulableError", "RaySystemError",
                  "LeaseLost")


def is_cluster_error(exc: BaseException) -> bool:
    """Whether ``exc`` is the cluster's fault (see :data:`CLUSTER_ERRORS`), not the cell's."""
    if isinstance(exc, StageFailed):
        return exc.cluster
    return any(t.__name__ in CLUSTER_ERRORS for t in type(exc).__mro__)


class CellPredictor:
    """The model and the inference engine for one worker; predicts cached cells.

    The device path (DESIGN decision 13): a cell's compact integers are read from the cache and
    decompressed on reader threads (the next cells' while this one runs: one thread on a CPU
    device, whose cores run the network; beside a GPU one per CPU it holds, :func:`actor_cpus`,
    decompressing straight into pinned memory), uploaded once, and decoded, preprocessed, cut,
    blended and thresholded on the engine's device; only P(urban) as float16 comes back. Crops of
    several cells share batches (:meth:`predict_cells`).

    The checkpoint may be a ``gs://`` object: it is fetched once per node into the local cache and
    checked against ``sha256`` (the driver's). A checkpoint that cannot be loaded does not kill the
    actor: :meth:`ready` raises the loading error, so the driver stops the run with its one line.
    """

    def __init__(self, job: MapJob, checkpoint: str, threads: int | None = None,
                 sha256: str | None = None):
        self.job = job
        self.error: BaseException | None = None
        self.readers = 1
        self._pin = False  # beside a GPU: parts read into pinned memory, their unshuffle left to it
        self._bands = None
        try:
            import torch

            from gum_ray.inference import InferenceEngine
            from gum_ray.network import load_model
            from gum_ray.store.checkpoints import local_checkpoint

            if threads:
                torch.set_num_threads(threads)
            # the engine keeps what it runs (a folded copy at the defaults): the loaded weights go
            self.engine = InferenceEngine(load_model(local_checkpoint(checkpoint, sha256), family=job.model),
                                          job.inference)
            self.model = self.engine.model
            self._bands = self.engine.compact_bands()  # the bands it reads: no others decompressed
            if self.engine.device.type == "cuda":  # the host only decompresses: several cells at once
                import os

                from gum_ray.inference import one_malloc_arena

                self.readers = max(1, min(threads or GPU_READERS, os.cpu_count() or 1))
                self._pin = True
                one_malloc_arena()  # before the reader threads start: no page faults per cell
        except Exception as exc:  # noqa: BLE001 - reported by ready()
            self.error = exc
        self._reader = concurrent.futures.ThreadPoolExecutor(self.readers, thread_name_prefix="gum-cache-read")

    def ready(self) -> dict[str, Any]:
        """Raise the loading error, if any; else run the network once (a warm-up) and say so."""
        if self.error is not None:
            raise self.error
        import os
        import socket

        t0 = time.perf_counter()
        x = np.zeros((self.engine.in_channels, 256, 256), np.float32)
        self.engine.predict(x)
        return {"host": socket.gethostname(), "pid": os.getpid(), "warmup_s": time.perf_counter() - t0}

    def predict(self, year: int, row: int, col: int) -> Prediction:
        """P(urban) of the cached imagery of (year, cell) on its UTM grid, float16, NaN = no data."""
        return self.predict_cells(year, [(row, col)])[0]

    def predict_cells(self, year: int, cells: list[tuple[int, int]], *, errors_as_values: bool = False
                      ) -> list[Prediction | StageFailed]:
        """:meth:`predict` for several cells (row, col) of one year, their crops batched together.

        With ``errors_as_values``, a cell whose imagery cannot be read or used gets a
        :class:`StageFailed` in its place and the other cells go on (a model actor's call for
        several cells: one bad cell does not fail its neighbours); else its error is raised.
        """
        if self.error is not None:
            raise self.error
        cache = self.job.imagery_cache()
        todo = [self.job.cell(r, c) for r, c in cells]
        # the first cells' reads start now; each cell taken starts the read of the next one not asked
        reads = collections.deque(self._reader.submit(self._read, cache, year, c, self._pin, self._bands)
                                  for c in todo[: self.readers])
        meta: dict[int, tuple] = {}
        out: list[Prediction | StageFailed] = [None] * len(todo)  # type: ignore[list-item]

        def scenes():
            for i, cell in enumerate(todo):
                t0 = time.perf_counter()
                read = reads.popleft()
                if i + self.readers < len(todo):  # decompress the next cells while this one runs
                    reads.append(self._reader.submit(self._read, cache, year, todo[i + self.readers], self._pin,
                                                     self._bands))
                try:
                    parts, tensors, geobox, provenance, read_s = read.result()
                    check_compatible(self.model, "products" in parts, what=f"the cached imagery of cell {cell.id}")
                    # and which inputs each pixel had, whatever the model maps (from the masks, on
                    # the device: the host only downloads the result)
                    x, valid, quality = self.engine.prepare_compact(tensors, quality=True)
                    del tensors
                except Exception as exc:  # noqa: BLE001 - this cell's failure, reported as its value
                    if not errors_as_values:
                        raise
                    out[i] = StageFailed("predict", type(exc).__name__, str(exc).splitlines()[0][:500]
                                         if str(exc) else "", is_cluster_error(exc))
                    continue
                del parts
                # crops on the UTM zone's stride lattice: neighbouring cells see the same crops where
                # their halos overlap, so the product has no seams at cell borders
                a = geobox.affine
                origin = (int(round(-a.f / abs(a.e))), int(round(a.c / a.a)))
                meta[i] = (geobox, provenance, quality, t0, read_s, self.engine.crops_run)
                yield i, x, valid, origin

        for i, prob, _ in self.engine.predict_scenes(scenes()):
            geobox, provenance, quality, t0, read_s, crops0 = meta.pop(i)
            out[i] = Prediction(
                self.engine.to_host(prob.half()), None, geobox,
                {"source_dates": provenance.get("dates"), "predict_s": time.perf_counter() - t0,
                 "read_s": read_s, "crops": self.engine.crops_run - crops0,
                 "model_family": self.model.family},
                quality=self.engine.to_host(quality),
            )
        return out

    def predict_group(self, year: int, cells: list[tuple[int, int]]) -> Any:
        """The model actor's call: :meth:`predict_cells` with errors as values, one result per cell
        (a tuple for several cells, so that Ray hands each to its own write task)."""
        res = self.predict_cells(year, cells, errors_as_values=True)
        return res[0] if len(res) == 1 else tuple(res)

    @staticmethod
    def _read(cache, year: int, cell, pin: bool = False, bands: dict | None = None,
              for_device: bool | None = None) -> tuple:
        """The cell's compact parts (the value bands in ``bands`` only, where given: the engine's
        ``compact_bands``) as numpy arrays and as the torch tensors that own their memory (pinned
        with ``pin``: the engine uploads those by DMA, no staging copy), GeoBox, provenance and the
        seconds it took. ``for_device`` (default: with ``pin``, i.e. beside a GPU): the device
        finishes the decoding (value parts still byte-shuffled, :class:`~gum_ray.shuffled.ShuffledPart`;
        a part of only its fill value a broadcast of it: ``ImageryCache.get_compact``)."""
        t = time.perf_counter()
        memory = TensorMemory(pin)
        parts, geobox, provenance = cache.get_compact(year, cell, memory, bands,
                                                      pin if for_device is None else for_device)
        return parts, {k: memory.tensor_of(v) for k, v in parts.items()}, geobox, provenance, time.perf_counter() - t


#: reader threads of a model actor beside a GPU, by default (each decompresses one cell at a time;
#: one keeps an H100 about 40 % busy, docs/performance.md)
GPU_READERS = 4


def actor_cpus(threads: int | None, gpus: float, cpus: float) -> int:
    """The CPUs a model actor holds: ``threads`` (``--actor-threads``) if given; else on a CPU one
    (its torch threads; the other cores fetch and write); beside a GPU one per cache reader thread,
    which run flat out while the GPU is fed: :data:`GPU_READERS`, at most the cluster's ``cpus``
    per GPU less one, so that fetches and writes still find a CPU on a node of one GPU."""
    if threads:
        return threads
    if gpus < 1:
        return 1
    return max(1, min(GPU_READERS, int(cpus // gpus) - 1))


class TensorMemory:
    """An ``alloc`` for :meth:`~gum_ray.store.cache.ImageryCache.get_compact` whose arrays live in
    torch tensors (page-locked with ``pin``), and the tensor behind each.

    The engine must be given the tensor, not ``torch.from_numpy`` of the array: an asynchronous
    upload from pinned memory records an event on the tensor's own allocation, so that the
    caching host allocator does not hand the memory to the next cell's read before the copy has
    run; a tensor made from the numpy array would not carry that allocation, and the memory could
    be overwritten mid-copy.
    """

    def __init__(self, pin: bool = False):
        self.pin = pin
        self._made: list[tuple[np.ndarray, Any]] = []

    def __call__(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        import torch

        t = torch.empty(shape, dtype=torch.from_numpy(np.empty(0, dtype)).dtype, pin_memory=self.pin)
        a = t.numpy()
        self._made.append((a, t))
        return a

    def tensor_of(self, a: np.ndarray | ShuffledPart) -> Any:
        """The tensor that owns ``a`` (a shuffled part: the part with that tensor as its data);
        ``a`` itself if it was not made here (a part Zarr read)."""
        if isinstance(a, ShuffledPart):
            return dataclasses.replace(a, data=self.tensor_of(a.data))
        return next((t for made, t in self._made if made is a), a)


def write_cell(job: MapJob, year: int, row: int, col: int, predicted: Prediction,
               checkpoint_sha256: str, extra_times: dict[str, Any] | None = None,
               run_id: str | None = None, lease_generation: int | None = None) -> dict[str, Any]:
    """Warp the cell's P(urban) to the product grid, write its shard, then its commit marker.

    With ``run_id``, the write happens only while that run holds the product's lease at
    ``lease_generation`` (its fencing token): a task left running by a driver that died stops once
    the lease is stale or taken over, so two runs never write one product at once.
    """
    from gum_ray.store.manifest import Manifest, write_and_commit
    from gum_ray.store.product import ProductStore
    from gum_ray.warp import warp_codes, warp_probability

    t0 = time.perf_counter()
    cell = job.cell(row, col)
    prob = warp_probability(predicted.probability.astype(np.float32), predicted.geobox, cell.product_geobox())
    quality = None
    if predicted.quality is not None:
        quality = warp_codes(predicted.quality, predicted.geobox, cell.product_geobox())
    if run_id is not None:
        from gum_ray.mapping.lease import assert_lease_held

        assert_lease_held(job.product, run_id, lease_generation)
    product = ProductStore.open(job.product, writable=True)
    dates = predicted.provenance.get("source_dates")
    extra: dict[str, Any] = {"run_id": run_id, "lease_generation": lease_generation} if run_id else {}
    if predicted.provenance.get("model_family"):
        extra["model_family"] = predicted.provenance["model_family"]
    result, committed = write_and_commit(
        product, Manifest(job.product, job.grid), year, cell, prob, quality=quality,
        checkpoint_sha256=checkpoint_sha256,
        settings=job.settings_record(),
        source=job.source,
        source_dates=list(dates) if isinstance(dates, (list, tuple)) else None,
        times={"write_s": round(time.perf_counter() - t0, 3), **(extra_times or {})},
        extra=extra or None,
    )
    if not job.keep_cache:  # committed: its imagery is not needed again (unless kept to map again)
        job.imagery_cache().delete(year, cell)
    prov = predicted.provenance
    return {"committed": committed, "empty": result.empty, "urban_px": result.urban_px,
            "valid_px": result.valid_px, "write_s": time.perf_counter() - t0,
            "predict_s": float(prov.get("predict_s") or 0.0), "crops": int(prov.get("crops") or 0),
            "read_s": float(prov.get("read_s") or 0.0),
            "fetch": dict(extra_times or {})}
