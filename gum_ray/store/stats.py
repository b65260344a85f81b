"""Area statistics: urban km^2 per year over an AOI, with geodesic pixel areas.

Urban area = sum of the pixel area (WGS84, per row) of the pixels whose P(urban) >= threshold
(50 % by default) and whose centre lies in the AOI. The work is one dask task per stored shard
that the AOI touches (all years at once, only the part of the shard inside the AOI's bounds), run
on a bounded thread pool: memory stays at a few shards whatever the AOI's size. Overview levels
(``level`` > 0) give quick continental figures from the pyramid (each overview pixel is the mean
probability of its block, so figures differ slightly from level 0).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

from gum_ray.errors import InputError
from gum_ray.grid import AOI, aoi_windows, cells_for_aoi, window_transform
from gum_ray.store.product import NODATA, URBAN_THRESHOLD, ProductStore


@dataclass(frozen=True)
class YearStats:
    """Areas in km^2 for one year over the AOI."""

    year: int
    urban_km2: float  # P(urban) >= threshold
    mapped_km2: float  # pixels with data
    aoi_km2: float  # all pixels of the AOI (pixel-centre rule)
    mean_probability: float  # mean P(urban) % over mapped pixels (NaN if none)

    @property
    def urban_share(self) -> float:
        """Urban share of the mapped area (0-1; NaN when nothing is mapped)."""
        return self.urban_km2 / self.mapped_km2 if self.mapped_km2 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "urban_share": self.urban_share}


def _block_sums(
    product: ProductStore,
    year_idx: list[int],
    rows: slice,
    cols: slice,
    level: int,
    geoms: list[Any] | None,
    threshold: int,
) -> np.ndarray:
    """(n_years, 4) float64: urban m^2, mapped m^2, AOI m^2, sum of prob x area for one block."""
    from rasterio.features import geometry_mask

    h, w = rows.stop - rows.start, cols.stop - cols.start
    if geoms is not None:
        t = window_transform(rows, cols, 2**level)
        inside = ~geometry_mask(geoms, (h, w), t, all_touched=False)
    else:
        inside = np.ones((h, w), dtype=bool)
    area = product.pixel_area(rows, level)[:, None]  # m^2 per pixel, per row
    aoi_m2 = float((inside * area).sum())
    out = np.zeros((len(year_idx), 4))
    if not inside.any():
        return out
    arr = product._array(level)
    lo, hi = min(year_idx), max(year_idx) + 1
    data = np.asarray(arr[lo:hi, rows, cols])
    for k, yi in enumerate(year_idx):
        d = data[yi - lo]
        valid = (d != NODATA) & inside
        urban = valid & (d >= threshold)
        out[k, 0] = (urban * area).sum()
        out[k, 1] = (valid * area).sum()
        out[k, 2] = aoi_m2
        out[k, 3] = (np.where(valid, d, 0) * area).sum()
    return out


def _blocks(product: ProductStore, aoi: AOI, level: int) -> list[tuple[slice, slice]]:
    """Shard-aligned pixel blocks at ``level`` that the AOI touches, clipped to the AOI's bounds."""
    n = product.grid.cell_px
    shards = sorted({(c.row >> level, c.col >> level) for c in cells_for_aoi(aoi, product.grid)})
    out = []
    for rows, cols in aoi_windows(aoi, 2**level):
        for r, c in shards:
            r0, r1 = max(r * n, rows.start), min((r + 1) * n, rows.stop)
            c0, c1 = max(c * n, cols.start), min((c + 1) * n, cols.stop)
            if r0 < r1 and c0 < c1:
                out.append((slice(r0, r1), slice(c0, c1)))
    return out


def urban_area(
    product: str | ProductStore,
    aoi: AOI,
    *,
    years: Sequence[int] | None = None,
    level: int = 0,
    threshold: int = URBAN_THRESHOLD,
    max_workers: int = 2,
) -> list[YearStats]:
    """Urban, mapped and AOI area (km^2) per year over ``aoi`` (all years of the product by default)."""
    import dask

    p = product if isinstance(product, ProductStore) else ProductStore.open(product)
    p._check_level(level)
    if not 0 < threshold <= 100:
        raise InputError(f"threshold {threshold} %: must be within 1..100")
    years = list(p.years if years is None else years)
    if not years:
        raise InputError(f"the product {p.root} has no years yet; run gum-ray for a year first")
    year_idx = [p.year_index(y) for y in years]
    geoms = None if all(g.equals(g.envelope) for g in aoi.parts) else list(aoi.parts)
    def block(rows: slice, cols: slice) -> np.ndarray:
        return _block_sums(p, year_idx, rows, cols, level, geoms, threshold)

    tasks = [dask.delayed(block, pure=False)(rows, cols) for rows, cols in _blocks(p, aoi, level)]
    total = np.zeros((len(years), 4))
    if tasks:
        # a tree of sums keeps the scheduler's memory flat for many blocks
        while len(tasks) > 1:
            tasks = [dask.delayed(sum, pure=False)(tasks[i : i + 16]) for i in range(0, len(tasks), 16)]
        (total,) = dask.compute(tasks[0], scheduler="threads", num_workers=max(1, max_workers))
    out = []
    for k, y in enumerate(years):
        urban, mapped, aoi_m2, prob_area = total[k]
        out.append(
            YearStats(
                year=int(y),
                urban_km2=float(urban) / 1e6,
                mapped_km2=float(mapped) / 1e6,
                aoi_km2=float(aoi_m2) / 1e6,
                mean_probability=float(prob_area / mapped) if mapped else float("nan"),
            )
        )
    return out
