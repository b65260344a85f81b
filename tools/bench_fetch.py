#!/usr/bin/env python
"""Benchmark the Earth Engine fetcher against the loopback emulator.

One run, an emulator in a child process answering every ``computePixels`` after a fixed latency
(1 s by default, about what a 256 x 256 px request of the GUM recipe costs on Earth Engine):

* requests/s and MB/s at in-flight caps 1, 8 and 40;
* the achieved in-flight count as a share of the cap in steady state (from the emulator's own
  record of when each request started and ended: the time-weighted mean number of requests being
  served between the first and the last request start, while the queue is never empty);
* bytes per pixel on the wire with the compact integer encoding versus the float32 baseline (both
  measured, NPY headers included).

Usage: ``python tools/bench_fetch.py [--latency 1.0] [--tile 256] [--waves 8]``
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from odc.geo.geobox import GeoBox  # noqa: E402

from gum_ray.sources.earthengine import EarthEngineSource  # noqa: E402
from gum_ray.sources.ee_emulator import start_emulator_process  # noqa: E402

ORIGIN = (467190.0, 5246400.0)  # UTM 32N, the synthetic world's demo town


def grid_for(n_tiles: int, tile: int) -> GeoBox:
    """A 10 m UTM grid of about ``n_tiles`` tiles of ``tile`` px (columns x rows)."""
    cols = max(1, math.ceil(math.sqrt(n_tiles)))
    rows = max(1, math.ceil(n_tiles / cols))
    x0, y0 = ORIGIN
    return GeoBox.from_bbox((x0, y0, x0 + cols * tile * 10, y0 + rows * tile * 10), "EPSG:32632", resolution=10)


def mean_in_flight(intervals: list[tuple[float, float]], t_lo: float, t_hi: float) -> float:
    """Time-weighted mean number of requests being served between ``t_lo`` and ``t_hi``."""
    if t_hi <= t_lo:
        return float("nan")
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    level, last, area = 0, t_lo, 0.0
    for t, d in events:
        tc = min(max(t, t_lo), t_hi)
        area += level * (tc - last)
        last = tc
        level += d
    return area / (t_hi - t_lo)


def in_flight_windows(intervals: list[tuple[float, float]], cap: int) -> tuple[float, float]:
    """(steady state, whole run) mean in-flight.

    Steady state: from the moment the emulator first serves ``cap`` requests at once (the ramp-up
    is over) to the last request start (after it the queue is empty and the run drains).
    Whole run: from the first request start to the last request start.
    """
    if not intervals:
        return 0.0, 0.0
    first = min(s for s, _ in intervals)
    last = max(s for s, _ in intervals)
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    level, reached = 0, None
    for t, d in events:
        level += d
        if level >= cap and reached is None:
            reached = t
    steady = mean_in_flight(intervals, reached, last) if reached is not None and reached < last else float("nan")
    return steady, mean_in_flight(intervals, first, last) if last > first else 1.0


def run(emu, cap: int, geobox: GeoBox, tile: int, encoding: str = "compact") -> dict:
    # requests are cut by bytes, as Earth Engine limits them: a compact S2/S1 request of
    # tile x tile px is exactly at the limit; a float32 one needs smaller tiles (more requests)
    limit = tile * tile * 12
    src = EarthEngineSource(project="gum-bench", credentials="anonymous", url=emu.url, max_in_flight=cap,
                            max_request_bytes=limit, encoding=encoding, limiter_scope="process")
    emu.reset_stats()
    t0 = time.perf_counter()
    src.fetch(geobox, 2021)
    dt = time.perf_counter() - t0
    st = emu.stats()
    n = src.last_stats.requests
    steady, whole = in_flight_windows(st["intervals"], cap)
    return {
        "cap": cap, "encoding": encoding, "requests": n, "seconds": dt, "req_s": n / dt,
        "mb_s": st["bytes_sent"] / dt / 1e6, "max_in_flight": st["max_in_flight"], "steady": steady,
        "share": steady / cap, "whole": whole / cap, "bytes": st["bytes_sent"], "payload": src.last_stats.bytes,
        "pixels": geobox.shape[0] * geobox.shape[1],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--latency", type=float, default=1.0, help="emulator seconds per computePixels request")
    p.add_argument("--tile", type=int, default=256, help="request tile side, px")
    p.add_argument("--waves", type=int, default=8, help="requests per cap slot (run length ~ waves x latency)")
    p.add_argument("--caps", default="1,8,40")
    a = p.parse_args(argv)
    caps = [int(c) for c in a.caps.split(",")]
    emu = start_emulator_process(latency_s=a.latency, record_intervals=True, max_seconds=1800)
    try:
        warm = EarthEngineSource(project="gum-bench", credentials="anonymous", url=emu.url, max_in_flight=4)
        warm.fetch(grid_for(1, 32), 2021)  # ee.Initialize, discovery, algorithms: not timed
        rows = []
        for cap in caps:
            n_tiles = max(1, math.ceil(cap * a.waves / 3))  # 3 modalities per tile
            rows.append(run(emu, cap, grid_for(n_tiles, a.tile), a.tile))
        base = run(emu, caps[-1], grid_for(max(1, math.ceil(caps[-1] * a.waves / 3)), a.tile), a.tile, "float32")
    finally:
        emu.stop()

    print(f"Earth Engine fetch through the loopback emulator: {a.latency:g} s latency per request, "
          f"{a.tile} x {a.tile} px tiles, 3 modalities (S2, S1, terrain), compact encoding")
    print()
    hdr = (f"{'cap':>4} {'requests':>9} {'seconds':>8} {'req/s':>7} {'ideal':>6} {'MB/s':>7} {'max in flight':>14} "
           f"{'steady in flight':>17} {'share of cap':>13} {'whole run':>10}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['cap']:>4} {r['requests']:>9} {r['seconds']:>8.2f} {r['req_s']:>7.2f} {r['cap'] / a.latency:>6.1f} "
              f"{r['mb_s']:>7.2f} {r['max_in_flight']:>14} {r['steady']:>17.2f} {r['share']:>12.1%} {r['whole']:>9.1%}")
    print()
    c = rows[-1]
    px_c, px_f = c["pixels"], base["pixels"]
    pay_c, pay_f = c["payload"] / px_c, base["payload"] / px_f
    body_c, body_f = c["bytes"] / px_c, base["bytes"] / px_f
    print("steady state: from the first moment the emulator serves `cap` requests at once to the last request "
          "start; whole run: from the first request start")
    print(f"bytes per pixel fetched, 11 bands: compact {pay_c:.3f} vs float32 baseline {pay_f:.3f} -> "
          f"{pay_c / pay_f:.3f} of the baseline (target <= 0.5)")
    print(f"  with NPY headers (whole response bodies, same {a.tile * a.tile * 12} B request limit): "
          f"{body_c:.4f} vs {body_f:.4f} -> {body_c / body_f:.5f}")
    print(f"float32 baseline at cap {base['cap']}: {base['requests']} requests (vs {c['requests']}), "
          f"{base['mb_s']:.2f} MB/s, share of cap {base['share']:.1%}")
    ok = (all(r["share"] >= 0.95 for r in rows) and pay_c / pay_f <= 0.5
          and all(r["max_in_flight"] <= r["cap"] for r in rows))
    print("targets met" if ok else "TARGETS MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
