"""The mapping job's fourth stage: the overview pyramid, resumable, as lease-checked Ray tasks.

After the cells are written, every overview shard that is **stale** (no marker, or fewer committed
cells under it than now: :meth:`~gum_ray.store.manifest.Manifest.stale_overviews`) is rebuilt,
level by level (a level-k shard is the 2x2 mean of level k - 1). Each shard is one Ray task that
first checks that the run still holds the product's lease at its generation (the fencing token),
builds the shard for the years that need it, then writes its marker. The driver keeps at most
:data:`IN_FLIGHT` tasks in flight and beats the lease while it waits.

Because the work list comes from the markers, not from what this run wrote, a run that died after
committing its cells and before (or during) its pyramid leaves stale shards that ``gum status``
reports and the next run of the job builds, even when it has no cell left to map.
"""

from __future__ import annotations

import collections
from typing import Any

from gum_ray.mapping.job import MapJob

#: overview tasks in flight at most
IN_FLIGHT = 64


def build_overview_task(job: MapJob, level: int, row: int, col: int, counts: dict[int, int],
                        run_id: str | None = None, lease_generation: int | None = None) -> bool:
    """Build overview shard (level, row, col) for the years in ``counts`` and mark it built.

    ``counts`` maps each year to the committed cells under the shard when the work was planned:
    the marker records it, so a shard is rebuilt once more cells are committed under it. With
    ``run_id`` the task first checks that run still holds the lease at ``lease_generation``.
    """
    from gum_ray.store.manifest import Manifest
    from gum_ray.store.product import ProductStore

    if run_id is not None:
        from gum_ray.mapping.lease import assert_lease_held

        assert_lease_held(job.product, run_id, lease_generation)
    product = ProductStore.open(job.product, writable=True)
    years = sorted(counts)
    any_data = product.build_overview_shard(level, row, col, years)
    manifest = Manifest(job.product, job.grid)
    extra = {"run_id": run_id, "lease_generation": lease_generation} if run_id else None
    for year in years:
        manifest.commit_overview(year, level, row, col, counts[year], extra=extra)
    return any_data


def stale_work(job: MapJob, levels: int) -> dict[int, dict[tuple[int, int], dict[int, int]]]:
    """Per level: shard (row, col) -> {year: committed cells under it} for the stale shards of the job's years."""
    from gum_ray.store.manifest import Manifest

    manifest = Manifest(job.product, job.grid)
    work: dict[int, dict[tuple[int, int], dict[int, int]]] = {lv: {} for lv in range(1, levels + 1)}
    for year in job.years:
        for lv, shards in manifest.stale_overviews(year, levels).items():
            for key, n in shards.items():
                work[lv].setdefault(key, {})[int(year)] = n
    return work


def build_stale_overviews(job: MapJob, job_ref: Any, lease: Any) -> int:
    """Build every stale overview shard of the job's years on Ray; returns the shards built.

    Raises the first task's error (the lease lost, a storage error): the shards not built stay
    stale, and the next run builds them.
    """
    import ray

    from gum_ray.store.product import ProductStore

    levels = ProductStore.open(job.product).settings.overview_levels
    if levels < 1:
        return 0
    task = ray.remote(num_cpus=1, max_retries=2)(build_overview_task)
    built = 0
    for level, shards in stale_work(job, levels).items():
        queue = collections.deque(sorted(shards.items()))
        in_flight: list[Any] = []
        while queue or in_flight:
            while queue and len(in_flight) < IN_FLIGHT:
                (r, c), counts = queue.popleft()
                in_flight.append(task.remote(job_ref, level, r, c, counts, lease.run_id, lease.generation))
            done, in_flight = ray.wait(in_flight, num_returns=1, timeout=1.0)
            for ref in done:
                ray.get(ref)
                built += 1
            lease.beat()
    return built


__all__ = ["IN_FLIGHT", "build_overview_task", "build_stale_overviews", "stale_work"]
