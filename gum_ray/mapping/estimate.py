"""``gum plan``: what a mapping job will cost, before anything runs.

Counts are exact where cheap (cells, land cells, product pixels, crops per cell from the inference
geometry) and sampled where each cell needs a projection (UTM pixels fetched, Earth Engine
requests): up to ``sample`` cells spread over the plan are measured and the totals scaled.

Rates turn counts into time and quota. Each has a stated default and is replaced by what a
previous run measured when ``calibrate`` names its product (``gum map`` records its measured rates
in the product's run record, ``_manifest/runs/<run_id>.json``, and prints them):

* **seconds per Earth Engine request** (:data:`S_PER_REQUEST`): wall time at the quota is
  ``requests x s_per_request / max_in_flight`` (the project's concurrent-request quota);
* **EECU-seconds per request** (:data:`EECU_S_PER_REQUEST`): Earth Engine bills interactive
  ``computePixels`` requests in EECU time, which no response reports. The default assumes one EECU
  busy for the request's duration; calibrate it from the project's Cloud Monitoring metric of
  EECU usage (``earthengine.googleapis.com/project/cpu/usage_time``) over a small run divided by the
  requests that run made, and give it with ``--eecu-s-per-request``. It is compared with the
  noncommercial tiers' monthly quotas (:data:`EECU_TIERS`);
* **crops per second** of the model (:data:`CROPS_PER_S`), per device.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from gum_ray.grid import cells_for_aoi, check_cell_cap
from gum_ray.tiling import crop_count
from gum_ray.mapping.job import MapJob
from gum_ray.mapping.runner import cell_km2, plan_cells

# Inference rates (crops of 256 x 256 per second) for the GUM network (99.3 GFLOP per crop).
# cpu: measured by tools/bench_infer.py (f) on this project's 2-core machines, bf16 autocast (2.96/s).
# gpu: 35 % of an H100's 989 TFLOP/s bf16 dense peak -- the goal, an estimate until measured.
CROPS_PER_S = {"cpu": 3.0, "gpu": 0.35 * 989e12 / 99.3e9}
# Stored product bytes per km^2 of a typical (synthetic-world) product: tools/bench_store.py.
STORED_BYTES_PER_KM2 = 660.0  # measured 2026-11-24, 3000 px cells around the demo town
# Imagery cache bytes per km^2 of product (compact encodings, Blosc LZ4HC + shuffle, halo
# included): measured on the synthetic world's cell at 52.4 N (490 km^2 of product), 71.2 MB, about
# 145 kB per km^2 (issue 14; 82.0 MB, 165 kB per km^2, with the zstd of issue 12).
CACHE_BYTES_PER_KM2 = 145e3
#: assumed seconds per computePixels request (replace with a run's measurement: --calibrate)
S_PER_REQUEST = 4.0
#: assumed EECU-seconds per request (one EECU busy for the request's duration; see the docstring)
EECU_S_PER_REQUEST = S_PER_REQUEST
#: Earth Engine noncommercial quota tiers, EECU-hours per month
EECU_TIERS = {"community": 150.0, "contributor": 1_000.0, "partner": 100_000.0}


@dataclasses.dataclass
class Rates:
    """The rates a plan uses, and where each came from."""

    s_per_request: float = S_PER_REQUEST
    eecu_s_per_request: float = EECU_S_PER_REQUEST
    crops_per_s: float = CROPS_PER_S["gpu"]
    max_in_flight: int = 40
    origin: dict[str, str] = dataclasses.field(default_factory=lambda: {
        "s_per_request": "assumed", "eecu_s_per_request": "assumed (one EECU per request-second)",
        "crops_per_s": "goal (35 % of an H100's bf16 peak)"})


@dataclasses.dataclass
class Plan:
    cells: int
    cells_all: int  # cells of the AOI, sea included
    years: int
    km2: float
    product_px: int
    utm_px: int
    ee_requests: int
    ee_bytes: int
    ee_requests_saved: int  # by skipping cells without land
    ee_bytes_saved: int
    crops: int
    device: str
    rates: Rates

    @property
    def device_seconds(self) -> float:
        return self.crops / self.rates.crops_per_s

    @property
    def ee_wall_s(self) -> float:
        return self.ee_requests * self.rates.s_per_request / max(1, self.rates.max_in_flight)

    @property
    def eecu_hours(self) -> float:
        return self.ee_requests * self.rates.eecu_s_per_request / 3600.0

    @property
    def stored_bytes(self) -> float:
        return self.km2 * self.years * STORED_BYTES_PER_KM2

    @property
    def cache_bytes(self) -> float:
        return self.km2 * self.years * CACHE_BYTES_PER_KM2

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(device_seconds=self.device_seconds, ee_wall_s=self.ee_wall_s, eecu_hours=self.eecu_hours,
                 stored_bytes=self.stored_bytes, cache_bytes=self.cache_bytes)
        return d

    def lines(self) -> list[str]:
        r = self.rates
        sea = self.cells_all - self.cells
        tiers = ", ".join(f"{100 * self.eecu_hours / h:,.1f} % of {name}'s {h:,.0f}"
                          for name, h in EECU_TIERS.items())
        return [
            f"cells (shards)        {self.cells} x {self.years} year(s) = {self.cells * self.years}",
            f"land cells            {self.cells} of {self.cells_all} in the AOI ({sea} without land skipped)",
            f"area                  {self.km2:,.1f} km² per year",
            f"product pixels        {self.product_px:,} per year",
            f"pixels fetched (UTM)  {self.utm_px:,} per year (cells + halo, 10 m)",
            f"Earth Engine          {self.ee_requests:,} requests, {self.ee_bytes / 1e9:,.2f} GB "
            "(compact encodings, mask bytes included)",
            f"  saved by the land mask  {self.ee_requests_saved:,} requests, {self.ee_bytes_saved / 1e9:,.2f} GB",
            f"  wall time at quota  {_duration(self.ee_wall_s)} ({r.max_in_flight} requests in flight at "
            f"{r.s_per_request:.2f} s each: {r.origin['s_per_request']})",
            f"  EECU                {self.eecu_hours:,.1f} EECU-hours ({r.eecu_s_per_request:.2f} EECU-s per "
            f"request: {r.origin['eecu_s_per_request']})",
            f"  of a month's quota  {tiers} EECU-hours (noncommercial tiers)",
            f"inference             {self.crops:,} crops of 256 px = {self.device_seconds:,.0f} "
            f"{self.device}-seconds = {self.device_seconds / 3600:,.2f} {self.device}-hours at "
            f"{r.crops_per_s:,.1f} crops/s ({r.origin['crops_per_s']})",
            f"stored (product)      about {self.stored_bytes / 1e6:,.1f} MB "
            f"(at {STORED_BYTES_PER_KM2:,.0f} B/km², tools/bench_store.py)",
            f"imagery cache         about {self.cache_bytes / 1e9:,.2f} GB if kept (--keep-cache; by default "
            f"an entry is deleted once its cell is committed)",
            "calibrate: map a small area with the same settings, then gum plan --calibrate PRODUCT "
            "(uses its measured s/request and crops/s)",
        ]


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:,.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:,.0f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:,.1f} h"
    return f"{seconds / 86400:,.1f} days"


def measured_rates(product: str) -> dict[str, Any]:
    """The rates of the latest finished run of ``product`` that measured them (its run record).

    Raises:
        InputError: the product has no finished run with measured rates.
    """
    from gum_ray.errors import InputError
    from gum_ray.store import fs

    runs_dir = fs.join(fs.normalize(product), "_manifest", "runs")
    names = fs.list_names(runs_dir) if fs.exists(runs_dir) else []
    recs = []
    for name in names:
        try:
            rec = json.loads(fs.read_bytes(fs.join(runs_dir, name)))
        except (ValueError, OSError):
            continue
        if isinstance(rec, dict) and isinstance(rec.get("rates"), dict) and rec["rates"].get("cells"):
            recs.append(rec)
    if not recs:
        raise InputError(f"--calibrate {product}: no finished gum map run with measured rates there; "
                         "map a small area into it first", param="calibrate")
    return max(recs, key=lambda r: r.get("finished", ""))["rates"]


def rates_for(job: MapJob, *, device: str = "gpu", calibrate: str | None = None,
              eecu_s_per_request: float | None = None, max_in_flight: int | None = None) -> Rates:
    """The plan's rates: defaults, then a previous run's measurements, then explicit values."""
    rates = Rates(crops_per_s=CROPS_PER_S[device])
    rates.origin["crops_per_s"] = ("measured by tools/bench_infer.py on a 2-core CPU" if device == "cpu"
                                   else "goal: 35 % of an H100's bf16 peak")
    if max_in_flight is None:
        max_in_flight = int(dict(job.source_options).get("max_in_flight", 40))
    rates.max_in_flight = int(max_in_flight)
    if calibrate:
        m = measured_rates(calibrate)
        if m.get("s_per_request"):
            rates.s_per_request = float(m["s_per_request"])
            rates.origin["s_per_request"] = f"measured by a run of {calibrate}"
            if eecu_s_per_request is None:
                rates.eecu_s_per_request = rates.s_per_request
                rates.origin["eecu_s_per_request"] = "assumed one EECU per measured request-second"
        if m.get("crops_per_s"):
            rates.crops_per_s = float(m["crops_per_s"])
            rates.origin["crops_per_s"] = f"measured per actor by a run of {calibrate}"
    if eecu_s_per_request is not None:
        rates.eecu_s_per_request = float(eecu_s_per_request)
        rates.origin["eecu_s_per_request"] = "given"
    return rates


def estimate(job: MapJob, *, device: str = "gpu", sample: int = 64, calibrate: str | None = None,
             eecu_s_per_request: float | None = None) -> Plan:
    from gum_ray.imagery import modalities
    from gum_ray.sources.earthengine import band_codes, plan_tiles, request_bytes_per_pixel

    source = job.make_source()
    rates = rates_for(job, device=device, calibrate=calibrate, eecu_s_per_request=eecu_s_per_request)
    check_cell_cap(job.aoi, job.grid, job.max_aoi_cells)
    listed = cells_for_aoi(job.aoi, job.grid)  # listed once: all of them, then those with land
    cells_all = len(listed)
    cells = plan_cells(job, source, listed)
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
    per_cell_reqs, per_cell_bytes = reqs / len(picked), nbytes / len(picked)
    sea = cells_all - n
    return Plan(
        cells=n, cells_all=cells_all, years=ny, km2=sum(cell_km2(c) for c in cells),
        product_px=n * job.grid.cell_px**2, utm_px=int(utm * scale),
        ee_requests=int(math.ceil(reqs * scale)) * ny, ee_bytes=int(nbytes * scale) * ny,
        ee_requests_saved=int(round(per_cell_reqs * sea)) * ny, ee_bytes_saved=int(per_cell_bytes * sea) * ny,
        crops=int(crops * scale) * ny, device=device, rates=rates,
    )
