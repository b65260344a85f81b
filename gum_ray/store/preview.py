"""Quick-look PNG maps of the product: people would rather look at a map than read numbers.

The map shows P(urban) on a yellow-to-red ramp with a colour-bar legend, no data in grey, a
scale bar in km and longitude/latitude axes. It reads the coarsest pyramid level that still has
about ``max_px`` pixels across the AOI; where the overviews were not built there (all no data)
it falls back to level 0, averaged block by block (bounded memory either way).
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gum_ray.errors import InputError
from gum_ray.grid import AOI, PIXEL_DEG, aoi_windows, col_lon, row_lat
from gum_ray.store import fs
from gum_ray.store.product import NODATA, URBAN_THRESHOLD, ProductStore

NODATA_COLOUR = "#d0d0d0"
DEFAULT_MAX_PX = 1200


@dataclass(frozen=True)
class PreviewResult:
    path: str
    level: int
    factor: int
    shape: tuple[int, int]
    urban_km2: float


def mean_factor(data: np.ndarray, f: int) -> np.ndarray:
    """Reduce a (h, w) uint8 by ``f`` with the mean of valid (non-255) values per f x f block."""
    if f == 1:
        return data
    h, w = data.shape
    ph, pw = -h % f, -w % f
    if ph or pw:
        data = np.pad(data, ((0, ph), (0, pw)), constant_values=NODATA)
    blk = data.reshape(data.shape[0] // f, f, data.shape[1] // f, f)
    valid = blk != NODATA
    s = np.where(valid, blk, 0).astype(np.uint32).sum(axis=(1, 3))
    n = valid.sum(axis=(1, 3), dtype=np.uint32)
    out = np.full(s.shape, NODATA, dtype=np.uint8)
    ok = n > 0
    out[ok] = ((2 * s[ok] + n[ok]) // (2 * n[ok])).astype(np.uint8)
    return out


def read_coarse(
    product: ProductStore, year: int, aoi: AOI, level: int, factor: int
) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """The AOI at ``level`` reduced by ``factor`` (block means), and its (W, S, E, N) extent.

    Reads blocks of a few thousand pixels at a time, so memory stays bounded. Across the
    antimeridian E is beyond 180.
    """
    step = 2**level
    pieces = []
    first = None
    for rows, cols in aoi_windows(aoi, step):
        r0 = rows.start - rows.start % factor
        c0 = cols.start - cols.start % factor
        r1 = rows.stop + (-rows.stop % factor)
        c1 = cols.stop + (-cols.stop % factor)
        out = np.full(((r1 - r0) // factor, (c1 - c0) // factor), NODATA, dtype=np.uint8)
        blk = factor * max(1, 4096 // factor)
        arr = product._array(level)
        height, width = arr.shape[1], arr.shape[2]
        for r in range(r0, r1, blk):
            for c in range(c0, c1, blk):
                rr = slice(r, min(r + blk, r1, height))
                cc = slice(c, min(c + blk, c1, width))
                if rr.start >= rr.stop or cc.start >= cc.stop:
                    continue
                d = mean_factor(product.read_window(year, rr, cc, level), factor)
                i, j = (r - r0) // factor, (c - c0) // factor
                out[i : i + d.shape[0], j : j + d.shape[1]] = d
        pieces.append(out)
        if first is None:
            first = (r0, c0, r1)
    data = pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=1)
    r0, c0, r1 = first  # type: ignore[misc]
    west, north = col_lon(c0, step), row_lat(r0, step)
    east = col_lon(c0 + data.shape[1] * factor, step)
    south = row_lat(r0 + data.shape[0] * factor, step)
    return data, (west, south, east, north)


def _nice_km(max_km: float) -> float:
    """A 1-2-5 length not above ``max_km``."""
    if max_km <= 0:
        return 1.0
    e = 10 ** math.floor(math.log10(max_km))
    for m in (5, 2, 1):
        if m * e <= max_km:
            return m * e
    return e


def _lon_fmt(v: float, _pos: Any = None) -> str:
    v = ((v + 180.0) % 360.0) - 180.0
    return f"{abs(v):.6g}°{'E' if v >= 0 else 'W'}"


def _lat_fmt(v: float, _pos: Any = None) -> str:
    return f"{abs(v):.6g}°{'N' if v >= 0 else 'S'}"


def render_preview(
    product: str | ProductStore,
    out: str | os.PathLike[str],
    *,
    year: int,
    aoi: AOI,
    level: int | None = None,
    max_px: int = DEFAULT_MAX_PX,
    dpi: int = 120,
) -> PreviewResult:
    """Render a quick-look PNG of ``year`` over ``aoi``; ``level`` None picks one automatically."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

    p = product if isinstance(product, ProductStore) else ProductStore.open(product)
    p.year_index(year)
    if not str(out).lower().endswith(".png"):
        raise InputError(f"output {out}: a preview is a PNG; name it .png")
    if max_px < 16:
        raise InputError(f"max_px {max_px}: give at least 16 pixels", param="max_px")
    rows, cols = aoi_windows(aoi, 1)[0]
    h0 = rows.stop - rows.start
    w0 = sum(c.stop - c.start for _, c in aoi_windows(aoi, 1))
    need = max(0, math.ceil(math.log2(max(h0, w0) / max_px))) if max(h0, w0) > max_px else 0
    if level is None:
        lvl = min(need, p.settings.overview_levels)
        data, extent = read_coarse(p, year, aoi, lvl, 2 ** (need - lvl))
        if lvl > 0 and not (data != NODATA).any():  # overviews not built here: average level 0
            lvl = 0
            data, extent = read_coarse(p, year, aoi, 0, 2**need)
    else:
        p._check_level(level)
        lvl = level
        data, extent = read_coarse(p, year, aoi, lvl, 2 ** max(0, need - lvl))
    factor = 2 ** max(0, need - lvl)
    west, south, east, north = extent

    # approximate urban area from what is drawn (pixel areas at the drawn resolution)
    from gum_ray.grid import pixel_area_rows

    step = 2**lvl * factor
    r0 = int(round((90.0 - north) / (PIXEL_DEG * step)))
    area = pixel_area_rows(r0, r0 + data.shape[0], step)[:, None]
    urban_km2 = float((((data != NODATA) & (data >= URBAN_THRESHOLD)) * area).sum() / 1e6)

    lat_c = (south + north) / 2.0
    aspect = 1.0 / max(math.cos(math.radians(lat_c)), 0.05)
    map_w = east - west
    map_h = (north - south) * aspect
    fig_w = 8.0
    fig_h = float(np.clip(fig_w * 0.8 * map_h / map_w + 1.0, 3.0, 12.0))
    fig = Figure(figsize=(fig_w, fig_h), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_facecolor(NODATA_COLOUR)
    cmap = colormaps["YlOrRd"].with_extremes(bad=(0.0, 0.0, 0.0, 0.0))
    im = ax.imshow(
        np.ma.masked_equal(data, NODATA), extent=(west, east, south, north), cmap=cmap, vmin=0, vmax=100,
        interpolation="nearest", origin="upper",
    )
    ax.set_aspect(aspect)
    ax.xaxis.set_major_formatter(FuncFormatter(_lon_fmt))
    ax.yaxis.set_major_formatter(FuncFormatter(_lat_fmt))
    ax.set_xlabel("longitude")
    ax.set_ylabel("latitude")
    ax.tick_params(axis="x", labelrotation=30)
    cax = ax.inset_axes((1.03, 0.0, 0.035, 1.0))  # exactly as tall as the map
    cb = fig.colorbar(im, cax=cax)
    cb.set_label("P(urban) [%]")
    cb.ax.axhline(URBAN_THRESHOLD, color="black", linewidth=1.0)
    ax.legend(
        handles=[Patch(facecolor=NODATA_COLOUR, edgecolor="0.4", label="no data")],
        loc="upper right", fontsize=8, framealpha=0.85,
    )
    km_per_deg = 111.32 * math.cos(math.radians(lat_c))
    width_km = map_w * km_per_deg
    bar_km = _nice_km(width_km / 4.0)
    label = f"{bar_km:g} km" if bar_km >= 1 else f"{bar_km * 1000:g} m"
    ax.add_artist(
        AnchoredSizeBar(
            ax.transData, bar_km / km_per_deg, label, loc="lower left", pad=0.4, borderpad=0.6,
            sep=4, frameon=True, size_vertical=(north - south) / 150.0, color="black",
        )
    )
    res_m = PIXEL_DEG * step * 111320.0
    ax.set_title(
        f"GUM urban probability {year}   ({_lon_fmt(west)} - {_lon_fmt(east)}, "
        f"{_lat_fmt(south)} - {_lat_fmt(north)})",
        fontsize=10,
    )
    ax.text(
        0.0, -0.16,
        f"urban (P >= {URBAN_THRESHOLD} %): {urban_km2:,.2f} km2 at this resolution   |   "
        f"pixel ~{res_m:,.0f} m (level {lvl}{f', x{factor} mean' if factor > 1 else ''})   |   "
        f"{Path(str(p.root)).name}",
        fontsize=7, color="0.3", transform=ax.transAxes, va="top",
    )

    out = str(out)
    workdir = Path(out).parent if not fs.is_remote(out) else Path(tempfile.gettempdir())
    workdir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".gum-preview-", suffix=".png", dir=workdir)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", bbox_inches="tight", pad_inches=0.15)
        fs.put_file(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return PreviewResult(path=out, level=lvl, factor=factor, shape=data.shape, urban_km2=urban_km2)
