"""``gum plan``: what a mapping job will cost, before anything runs.

Counts are exact where cheap (cells, product pixels, crops per cell from the inference geometry)
and sampled where each cell needs a projection (UTM pixels fetched, Earth Engine requests): up to
``sample`` cells spread over the plan are measured and the totals scaled.
"""

from __future__ import annotations

import dataclasses
import math

from gum_ray.inference import crop_count
from gum_ray.mapping.job import MapJob
from gum_ray.mapping.runner import cell_km2, plan_cells

# Inference rates (crops of 256 x 256 per second) for the GUM network (99.3 GFLOP per crop).
# cpu: measured by tools/bench_infer.py (f) on this project's 2-core machines, bf16 autocast (2.96/s).
# gpu: the H100 goal of issue 2 (35 % of 989 TFLOP/s bf16 dense) -- an estimate until measured.
CROPS_PER_S = {"cpu": 3.0, "gpu": 0.35 * 989e12 / 99.3e9}
# Stored product bytes per km^2 of a typical (synthetic-world) product: tools/bench_store.py.
STORED_BYTES_PER_KM2 = 660.0  # measured 2026-11-24, 3000 px cells around the demo town


@dataclasses.dataclass
class Plan:
    cells: int
    years: int
    km2: float
    product_px: int
    utm_px: int
    ee_requests: int
    ee_bytes: int
    crops: int
    device: str
    crops_per_s: float

    @property
    def device_seconds(self) -> float:
        return self.crops / self.crops_per_s

    @property
    def stored_bytes(self) -> float:
        return self.km2 * STORED_BYTES_PER_KM2

    def lines(self) -> list[str]:
        return [
            f"cells (shards)        {self.cells} x {self.years} year(s) = {self.cells * self.years}",
            f"area                  {self.km2:,.1f} km² per year",
            f"product pixels        {self.product_px:,} per year",
            f"pixels fetched (UTM)  {self.utm_px:,} per year (cells + halo, 10 m)",
            f"Earth Engine          {self.ee_requests:,} requests, {self.ee_bytes / 1e9:,.2f} GB "
            "(compact encodings, mask bytes included)",
            f"inference             {self.crops:,} crops of 256 px = {self.device_seconds:,.0f} "
            f"{self.device}-seconds at {self.crops_per_s:,.1f} crops/s",
            f"stored (product)      about {self.stored_bytes / 1e6:,.1f} MB "
            f"(at {STORED_BYTES_PER_KM2:,.0f} B/km², tools/bench_store.py)",
        ]


def estimate(job: MapJob, *, device: str = "gpu", sample: int = 64) -> Plan:
    from gum_ray.imagery import modalities
    from gum_ray.sources.earthengine import band_codes, plan_tiles, request_bytes_per_pixel

    source = job.make_source()
    cells = plan_cells(job, source)
    n = len(cells)
    step = max(1, n // sample)
    picked = cells[::step]
    mods = modalities(source.with_products)
    utm = crops = reqs = nbytes = 0
    for c in picked:
        g = c.utm_geobox(job.halo_px)
        h, w = g.shape
        utm += h * w
        crops += crop_count(h, w, job.inference.stride)
        for m in mods:
            bpp = request_bytes_per_pixel(band_codes(m))
            reqs += len(plan_tiles(h, w, bpp))
            nbytes += h * w * bpp
    scale = n / len(picked)
    ny = len(job.years)
    return Plan(
        cells=n, years=ny, km2=sum(cell_km2(c) for c in cells),
        product_px=n * job.grid.cell_px**2, utm_px=int(utm * scale),
        ee_requests=int(math.ceil(reqs * scale)) * ny, ee_bytes=int(nbytes * scale) * ny,
        crops=int(crops * scale) * ny, device=device, crops_per_s=CROPS_PER_S[device],
    )
