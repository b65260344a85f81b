"""The three stages of a mapping job, as plain Python (Ray wraps them in :mod:`.runner`).

* :func:`fetch_cell`: cell -> its UTM 10 m GeoBox (+ halo) -> imagery source -> imagery cache.
  Skips the source when the cache already holds the cell (no Earth Engine quota spent twice).
* :class:`CellPredictor`: cached imagery -> band contract -> overlap-blend inference -> P(urban) on
  the UTM grid (float16, NaN = no data). Holds the model; one per GPU (or CPU) as a Ray actor.
* :func:`write_cell`: P(urban) UTM -> warp -> product grid -> one whole shard -> commit marker.

Each returns a small dict (what happened, timings); errors propagate as exceptions and the runner
records them against the cell.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from gum_ray import bands
from gum_ray.mapping.job import MapJob


_SOURCES: dict[tuple, Any] = {}


def source_for(job: MapJob):
    """One source object per worker process and job settings (connections are reused)."""
    key = (job.source, job.source_options)
    if key not in _SOURCES:
        _SOURCES[key] = job.make_source()
    return _SOURCES[key]


def fetch_cell(job: MapJob, year: int, row: int, col: int, source=None) -> dict[str, Any]:
    """Make sure the imagery of (year, cell) is in the cache; returns what was done."""
    from gum_ray.store.cache import ImageryCache

    t0 = time.perf_counter()
    cell = job.cell(row, col)
    cache = ImageryCache(job.cache)
    if cache.has(year, cell):
        return {"fetched": False, "fetch_s": time.perf_counter() - t0}
    source = source or source_for(job)
    geobox = cell.utm_geobox(job.halo_px)
    imagery = source.fetch(geobox, year)
    cache.put(year, cell, imagery.export, geobox, imagery.provenance)
    return {"fetched": True, "fetch_s": time.perf_counter() - t0}


class CellPredictor:
    """The model and the inference engine for one worker; predicts cached cells."""

    def __init__(self, job: MapJob, checkpoint: str, threads: int | None = None):
        import torch

        from gum_ray.inference import InferenceEngine
        from gum_ray.model import load_checkpoint

        if threads:
            torch.set_num_threads(threads)
        self.job = job
        self.loaded = load_checkpoint(checkpoint)
        self.engine = InferenceEngine(self.loaded.model, job.inference)

    def predict(self, year: int, row: int, col: int) -> dict[str, Any]:
        from gum_ray.store.cache import ImageryCache

        t0 = time.perf_counter()
        cell = self.job.cell(row, col)
        cached = ImageryCache(self.job.cache).get(year, cell)
        export = cached.export
        with_products = self.loaded.spec.with_products
        if with_products and export.shape[0] != len(bands.EXPORT_BANDS_WITH_PRODUCTS):
            from gum_ray.errors import InputError

            raise InputError(
                f"cell {cell.id}: the cached imagery has no product bands but the checkpoint is the "
                "13-channel model; map with --products (source with products) or the 10-channel model"
            )
        valid = bands.validity_mask(export)
        if not valid.any():
            prob = np.full(valid.shape, np.nan, np.float16)
        else:
            # crops on the UTM zone's stride lattice: neighbouring cells see the same crops where
            # their halos overlap, so the product has no seams at cell borders
            a = cached.geobox.affine
            origin = (int(round(-a.f / abs(a.e))), int(round(a.c / a.a)))
            pred = self.engine.predict(bands.preprocess(export, with_products=with_products), origin=origin)
            prob = pred.probability.astype(np.float16)
            prob[~valid] = np.nan
        return {
            "probability": prob,
            "geobox": cached.attrs["geobox"],
            "source_dates": (cached.provenance or {}).get("dates"),
            "predict_s": time.perf_counter() - t0,
            "crops": self.engine.crops_run,
        }


def write_cell(job: MapJob, year: int, row: int, col: int, predicted: dict[str, Any],
               checkpoint_sha256: str, extra_times: dict[str, Any] | None = None,
               run_id: str | None = None, lease_generation: int | None = None) -> dict[str, Any]:
    """Warp the cell's P(urban) to the product grid, write its shard, then its commit marker.

    With ``run_id``, the write happens only while that run holds the product's lease at
    ``lease_generation`` (its fencing token): a task left running by a driver that died stops once
    the lease is stale or taken over, so two runs never write one product at once.
    """
    from gum_ray.grid import geobox_from_dict
    from gum_ray.store.manifest import Manifest, write_and_commit
    from gum_ray.store.product import ProductStore
    from gum_ray.warp import warp_probability

    t0 = time.perf_counter()
    cell = job.cell(row, col)
    src_gbox = geobox_from_dict(predicted["geobox"])
    prob = warp_probability(predicted["probability"].astype(np.float32), src_gbox, cell.product_geobox())
    if run_id is not None:
        from gum_ray.mapping.lease import assert_lease_held

        assert_lease_held(job.product, run_id, lease_generation)
    product = ProductStore.open(job.product, writable=True)
    dates = predicted.get("source_dates")
    result, committed = write_and_commit(
        product, Manifest(job.product, job.grid), year, cell, prob,
        checkpoint_sha256=checkpoint_sha256,
        settings=job.settings_record(),
        source=job.source,
        source_dates=list(dates) if isinstance(dates, (list, tuple)) else None,
        times={"write_s": round(time.perf_counter() - t0, 3), **(extra_times or {})},
        extra={"run_id": run_id, "lease_generation": lease_generation} if run_id else None,
    )
    return {"committed": committed, "empty": result.empty, "urban_px": result.urban_px,
            "valid_px": result.valid_px, "write_s": time.perf_counter() - t0}
