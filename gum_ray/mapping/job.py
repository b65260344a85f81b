"""What a mapping job is: AOI, years, source, model, stores and settings, in one picklable record.

The same :class:`MapJob` drives ``gum map`` (CLI), ``pipelines/continental.py`` (``ray job submit``)
and ``gum plan``; every Ray stage receives it once (``ray.put``) and builds what it needs lazily.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Any

from gum_ray.errors import InputError
from gum_ray.grid import AOI, DEFAULT_HALO_PX, Cell, ProductGrid
from gum_ray.tiling import InferenceSettings

DEFAULT_DATA_DIR = "gum-data"


@dataclasses.dataclass(frozen=True)
class MapJob:
    aoi: AOI
    years: tuple[int, ...]
    product: str
    cache: str
    source: str = "synthetic"
    source_options: tuple[tuple[str, Any], ...] = ()
    checkpoint: str | None = None
    model: str | None = None  # model family to insist on ("gum1", "gum2"); None = read from the checkpoint
    inference: InferenceSettings = dataclasses.field(default_factory=InferenceSettings)
    grid: ProductGrid = dataclasses.field(default_factory=ProductGrid)
    halo_px: int = DEFAULT_HALO_PX
    max_attempts: int = 3
    infer_actors: int | None = None  # None: one per GPU, else one CPU actor
    fetch_concurrency: int = 2
    write_concurrency: int = 2
    #: cells per model-actor call, their crops batched together (the actor reads the next cell while
    #: the device runs); None: 4 on GPU actors (a GPU's batch stays full), 1 on CPU actors
    cells_per_call: int | None = None
    threads_per_actor: int | None = None
    lease_ttl_s: float = 60.0
    preview: bool = True
    max_cells: int | None = None  # map at most this many pending cells in this run (rerun to go on)
    max_aoi_cells: int | None = None  # refuse an AOI covering more cells (None/0: no cap)
    keep_cache: bool = False  # keep a cell's cached imagery once it is committed (to map it again)

    def __post_init__(self) -> None:
        if not self.years:
            raise InputError("no year given: years needs one or more, e.g. 2020", param="years")
        if self.max_attempts < 1:
            raise InputError(f"max_attempts {self.max_attempts}: must be at least 1", param="max_attempts")
        if self.halo_px < 0:
            raise InputError(f"halo_px {self.halo_px}: must be >= 0 px", param="halo_px")
        if self.max_aoi_cells is not None and self.max_aoi_cells < 0:
            raise InputError(f"max_aoi_cells {self.max_aoi_cells}: must be >= 0 (0 = no cap)",
                             param="max_aoi_cells")
        if self.max_cells is not None and self.max_cells < 1:
            raise InputError(f"max_cells {self.max_cells}: must be at least 1", param="max_cells")
        for name in ("cells_per_call", "infer_actors", "threads_per_actor"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InputError(f"{name} {value}: must be at least 1", param=name)
        for name in ("fetch_concurrency", "write_concurrency"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be at least 1", param=name)

    def source_kwargs(self) -> dict[str, Any]:
        return dict(self.source_options)

    def make_source(self):
        from gum_ray.sources import get_source

        return get_source(self.source, **self.source_kwargs())

    @functools.cached_property
    def cache_key(self) -> str:
        """The imagery cache key of the job's source (:meth:`ImagerySource.cache_key`)."""
        return self.make_source().cache_key()

    def imagery_cache(self):
        """The job's imagery cache (its source's entries)."""
        from gum_ray.store.cache import ImageryCache

        return ImageryCache(self.cache, self.cache_key)

    def cell(self, row: int, col: int) -> Cell:
        return Cell(row, col, self.grid)

    def resolved_checkpoint(self, source: Any = None) -> str:
        """The checkpoint to use: the given one, or the source's default (the synthetic world's demo
        model of the job's family: GUM 2.0's with ``model="gum2"``, else GUM 1's)."""
        from gum_ray.demo_gum2 import resolve_demo_checkpoint

        return resolve_demo_checkpoint(self.checkpoint, source or self.make_source(), self.model)

    def settings_record(self) -> dict[str, Any]:
        """What decides the output bytes: recorded in every commit marker."""
        return {
            "inference": self.inference.as_dict(),
            "grid": self.grid.to_attrs(),
            "halo_px": self.halo_px,
            "source": self.source,
            "source_options": {k: v for k, v in self.source_options if "credential" not in k.lower()},
        }


def default_paths(data_dir: str | os.PathLike[str] = DEFAULT_DATA_DIR) -> tuple[str, str]:
    """(product, cache) under a data folder: the embedded defaults (local storage)."""
    d = str(data_dir)
    if "://" in d:
        return d.rstrip("/") + "/product.zarr", d.rstrip("/") + "/imagery-cache"
    return str(Path(d) / "product.zarr"), str(Path(d) / "imagery-cache")
