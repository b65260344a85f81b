"""Web-map tiles of the product: XYZ PNGs in web Mercator (and one PMTiles archive), via mercantile.

Layout written by :func:`write_tiles` (``gum tiles``) under ``OUT`` (a local folder or gs://)::

    OUT/index.html                      the viewer page (:mod:`gum_ray.viewer`)
    OUT/vendor/leaflet/                 Leaflet, copied from the local install (else the page uses a CDN)
    OUT/<year>/{z}/{x}/{y}.png          256 x 256 palette PNGs of P(urban)
    OUT/<year>/tiles.json               TileJSON 3.0 + a ``gum`` member: the written cells, the ramp
    OUT/<year>/quality/{z}/{x}/{y}.png  input-quality codes at the top zoom (only when the product
                                        has the ``input_quality`` variable with data for the year)
    OUT/<year>.pmtiles                  optional: the same PNGs in one PMTiles v3 archive

**Which tiles.** Exactly ``mercantile.tiles(*cell.bounds, z)`` over every *written* cell (a cell
whose shard object exists for the year), for each zoom, restricted to ``--bbox`` when given.

**Pixel values.** The palette index of a tile pixel *is* the stored value (0-100 %, 255 = no
data), so a tile is lossless and a reader can decode values from it (the viewer does). Each tile
pixel takes the value of the product pixel under its centre (nearest), read from the pyramid level
whose pixels are the coarsest that are still no larger than the tile pixel's height in degrees;
above the top overview level the top level is averaged in blocks (valid pixels only, as the
pyramid is built). A zoom-4 tile therefore reads overview level 6 (or the product's top level),
never level 0; a zoom-14 tile reads level 0 (see :func:`tile_source`).

**Colour ramp** (:data:`RAMP_STOPS`, documented in docs/viewer.md): ColorBrewer YlOrRd, linear in
RGB between 0, 25, 50, 75 and 100 %; alpha rises linearly from 40 at 0 % to 255 (opaque) at 50 %
and above, so the mapped footprint shows as a faint veil over a basemap and urban pixels are
opaque. No data (255) is fully transparent.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import threading
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from gum_ray.version import __version__
from gum_ray.errors import InputError
from gum_ray.grid import AOI, PIXELS_PER_DEGREE, Cell, ProductGrid, aoi_sides
from gum_ray.store import fs
from gum_ray.store.product import NODATA, OVERVIEWS, PROBABILITY, URBAN_THRESHOLD, ProductStore

log = logging.getLogger(__name__)

TILE_PX = 256
MAX_ZOOM = 22
METATILE = 8  # tiles are rendered in blocks of up to 8 x 8 sharing one read of the product
QUALITY = "input_quality"  # per-pixel input-quality codes (gum_ray.store.quality)
RAY_MIN_TILES = 20_000  # runs with more tiles than this go to Ray (``backend="auto"``)

# (percent, "#rrggbb") stops of the colour ramp: ColorBrewer YlOrRd (5 classes), linear in RGB
RAMP_STOPS: tuple[tuple[int, str], ...] = (
    (0, "#ffffb2"), (25, "#fecc5c"), (50, "#fd8d3c"), (75, "#f03b20"), (100, "#bd0026"),
)
ALPHA_AT_ZERO = 40  # alpha at 0 %; rises linearly to 255 at URBAN_THRESHOLD (50 %) and stays there

# Input-quality codes (``input_quality``, uint8 bit flags, 255 = no data): which inputs a pixel had
QUALITY_BITS: tuple[tuple[int, str], ...] = ((1, "Sentinel-2"), (2, "Sentinel-1"), (4, "terrain"))


# ------------------------------------------------------------------------------------ colours


def _hex(c: str) -> tuple[int, int, int]:
    return int(c[1:3], 16), int(c[3:5], 16), int(c[5:7], 16)


def ramp_rgba() -> np.ndarray:
    """(256, 4) uint8: the RGBA of each stored value (0-100 on the ramp, 101-255 transparent)."""
    out = np.zeros((256, 4), dtype=np.uint8)
    stops = [(p, _hex(c)) for p, c in RAMP_STOPS]
    for v in range(101):
        for (p0, c0), (p1, c1) in zip(stops, stops[1:]):
            if p0 <= v <= p1:
                t = (v - p0) / (p1 - p0)
                out[v, :3] = [int(round(a + (b - a) * t)) for a, b in zip(c0, c1)]
                break
        out[v, 3] = int(round(ALPHA_AT_ZERO + (255 - ALPHA_AT_ZERO) * min(v, URBAN_THRESHOLD) / URBAN_THRESHOLD))
    return out


def quality_rgba() -> np.ndarray:
    """(256, 4) palette of quality tiles: grey level = code (opaque), 255 transparent."""
    out = np.zeros((256, 4), dtype=np.uint8)
    out[:, 0] = out[:, 1] = out[:, 2] = np.arange(256)
    out[:, 3] = 255
    out[NODATA] = 0
    return out


def encode_png(values: np.ndarray, palette: np.ndarray) -> bytes:
    """A palette PNG (8 bit, colour type 3) whose indices are ``values`` (uint8 2-D)."""
    from PIL import Image

    v = np.ascontiguousarray(values, dtype=np.uint8)
    im = Image.frombytes("P", (v.shape[1], v.shape[0]), v.tobytes())
    im.putpalette(palette[:, :3].tobytes(), "RGB")
    buf = io.BytesIO()
    im.save(buf, format="PNG", transparency=palette[:, 3].tobytes(), optimize=False, compress_level=6)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """The palette indices of a tile PNG (what :func:`encode_png` wrote)."""
    from PIL import Image

    im = Image.open(io.BytesIO(data))
    if im.mode != "P":
        raise InputError(f"not a gum tile: PNG mode {im.mode}, expected a palette PNG")
    return np.asarray(im)


# ------------------------------------------------------------------------------------ geometry


@dataclass(frozen=True)
class TileSource:
    """Where a tile's pixels come from: pyramid ``level``, then ``factor`` x ``factor`` block means."""

    level: int
    factor: int

    @property
    def step(self) -> int:
        """Level-0 pixels per source pixel on a side."""
        return 2**self.level * self.factor


def tile_source(tile: Any, overview_levels: int) -> TileSource:
    """The pyramid level (and block-mean factor above the top level) for a tile.

    The source pixel is the coarsest power-of-two multiple of the product pixel that is no larger
    than the tile pixel's height in degrees of latitude (its smaller side in degrees).
    """
    import mercantile

    b = mercantile.bounds(tile)
    px_deg = (b.north - b.south) / TILE_PX
    step = 1
    while 2 * step / PIXELS_PER_DEGREE <= px_deg:
        step *= 2
    level = min(int(math.log2(step)), overview_levels)
    return TileSource(level, step // 2**level)


def parse_zoom_range(text: str) -> tuple[int, int]:
    """``"A-B"`` or ``"Z"`` -> (A, B) with 0 <= A <= B <= 22; :class:`InputError` otherwise."""
    s = str(text).strip()
    parts = s.split("-")
    try:
        if len(parts) == 1:
            a = b = int(parts[0])
        elif len(parts) == 2:
            a, b = int(parts[0]), int(parts[1])
        else:
            raise ValueError
    except ValueError:
        raise InputError(f"--zoom {text!r}: give a zoom range such as 0-14 (or one zoom such as 12)") from None
    if not 0 <= a <= b <= MAX_ZOOM:
        raise InputError(f"--zoom {text!r}: zooms must satisfy 0 <= A <= B <= {MAX_ZOOM} (e.g. 4-14)")
    return a, b


def written_cells(product: ProductStore, year: int) -> list[Cell]:
    """Cells of ``year`` that hold data (their level-0 shard object exists), in (row, col) order."""
    yi = product.year_index(year)
    prefix = fs.join(product.root, PROBABILITY, "c", str(yi))
    cells = []
    for key in fs.find(prefix):
        parts = key.split("/")
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            cells.append(product.grid.cell(int(parts[0]), int(parts[1])))
    return sorted(cells, key=lambda c: (c.row, c.col))


def _clip_bounds(cell: Cell, aoi: AOI | None) -> list[tuple[float, float, float, float]]:
    """The cell's bounds, or its intersections with the AOI's bounding boxes (none if disjoint)."""
    if aoi is None:
        return [cell.bounds]
    w, s, e, n = cell.bounds
    out = []
    for aw, as_, ae, an in aoi_sides(aoi):
        cw, cs, ce, cn = max(w, aw), max(s, as_), min(e, ae), min(n, an)
        if cw < ce and cs < cn:
            out.append((cw, cs, ce, cn))
    return out


def tiles_for_cells(cells: Iterable[Cell], zoom: int, aoi: AOI | None = None) -> set[tuple[int, int]]:
    """The (x, y) tiles at ``zoom`` over the cells: mercantile's list, cell by cell, united."""
    import mercantile

    out: set[tuple[int, int]] = set()
    for c in cells:
        for w, s, e, n in _clip_bounds(c, aoi):
            if s >= 85.051129 or n <= -85.051129:
                continue  # beyond web Mercator
            ul = mercantile.tile(max(w, -180.0), min(n, 85.051129), zoom)
            lr = mercantile.tile(min(e, 180.0) - mercantile.LL_EPSILON, max(s, -85.051129) + mercantile.LL_EPSILON, zoom)
            for x in range(ul.x, lr.x + 1):
                for y in range(ul.y, lr.y + 1):
                    out.add((x, y))
    return out


# ------------------------------------------------------------------------------------ rendering


def _has_array(product: ProductStore, name: str, level: int = 0) -> bool:
    try:
        product._array(level, name)
    except Exception:  # noqa: BLE001 - zarr raises KeyError / its own NodeNotFound
        return False
    return True


class TileRenderer:
    """Renders tiles of one year of a product; thread-safe; used by ``gum tiles`` and ``gum serve``.

    Only shards that hold written cells are read (a bounded window of each), so memory stays at a
    few shards whatever the zoom.
    """

    def __init__(self, product: ProductStore | str, year: int, cells: Sequence[Cell] | None = None):
        self.product = product if isinstance(product, ProductStore) else ProductStore.open(product)
        self.year = int(year)
        self.year_idx = self.product.year_index(self.year)
        self.cells = list(written_cells(self.product, self.year) if cells is None else cells)
        self.cell_set = {(c.row, c.col) for c in self.cells}
        self.levels = self.product.settings.overview_levels
        # recorded = the variable exists (products before it lack it) and holds this year's data
        self.has_quality = _has_array(self.product, QUALITY) and bool(
            fs.find(fs.join(self.product.root, QUALITY, "c", str(self.year_idx))))
        self._shards: dict[int, set[tuple[int, int]]] = {}
        self._lock = threading.Lock()

    @property
    def grid(self) -> ProductGrid:
        return self.product.grid

    def shards(self, level: int) -> set[tuple[int, int]]:
        """(row, col) shards at ``level`` that hold written cells."""
        with self._lock:
            if level not in self._shards:
                self._shards[level] = {(r >> level, c >> level) for r, c in self.cell_set}
            return self._shards[level]

    def missing_overviews(self, levels: Iterable[int]) -> list[tuple[int, int, int]]:
        """(level, row, col) overview shards over written cells that have no object (not built)."""
        missing = []
        for level in sorted(set(levels)):
            if level == 0:
                continue
            prefix = fs.join(self.product.root, OVERVIEWS, str(level), PROBABILITY, "c", str(self.year_idx))
            have = set()
            for key in fs.find(prefix):
                parts = key.split("/")
                if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
                    have.add((int(parts[0]), int(parts[1])))
            missing += [(level, r, c) for r, c in sorted(self.shards(level) - have)]
        return missing

    def _canvas(self, src: TileSource, rows: slice, cols: slice, name: str) -> np.ndarray:
        """Source pixels (at ``src.step``) over a global window, NODATA where nothing is written."""
        k, f = src.level, src.factor
        n = self.grid.cell_px
        out = np.full((rows.stop - rows.start, cols.stop - cols.start), NODATA, dtype=np.uint8)
        arr = self.product._array(k, name)
        height, width = arr.shape[1], arr.shape[2]
        lr0, lr1 = rows.start * f, rows.stop * f  # the window at level k
        lc0, lc1 = cols.start * f, cols.stop * f
        from gum_ray.store.preview import mean_factor

        shards = self.shards(k)
        sr0, sr1, sc0, sc1 = lr0 // n, (lr1 - 1) // n, lc0 // n, (lc1 - 1) // n
        if (sr1 - sr0 + 1) * (sc1 - sc0 + 1) <= len(shards):  # look up the shards under the window
            under = [(r, c) for r in range(sr0, sr1 + 1) for c in range(sc0, sc1 + 1) if (r, c) in shards]
        else:  # or go through the few written ones
            under = [(r, c) for r, c in shards if sr0 <= r <= sr1 and sc0 <= c <= sc1]
        for sr, sc in under:
            r0, r1 = max(sr * n, lr0), min((sr + 1) * n, lr1, height)
            c0, c1 = max(sc * n, lc0), min((sc + 1) * n, lc1, width)
            if r0 >= r1 or c0 >= c1:
                continue
            # align to whole f x f blocks (a block may reach into a neighbouring shard)
            r0, c0 = r0 - r0 % f, c0 - c0 % f
            r1, c1 = min(r1 + (-r1 % f), height), min(c1 + (-c1 % f), width)
            block = np.asarray(arr[self.year_idx, r0:r1, c0:c1])
            if f > 1:
                block = mean_factor(block, f)
            i, j = r0 // f - rows.start, c0 // f - cols.start
            out[i : i + block.shape[0], j : j + block.shape[1]] = block
        return out

    def render(
        self, z: int, tiles: Sequence[tuple[int, int]], *, name: str = PROBABILITY,
        source: TileSource | None = None,
    ) -> dict[tuple[int, int], np.ndarray]:
        """Values (uint8 256 x 256) of the tiles ``(x, y)`` at zoom ``z``, read together.

        Tiles with the same source share one read of the product over their union.
        """
        import mercantile

        groups: dict[TileSource, list[tuple[int, int]]] = defaultdict(list)
        for x, y in tiles:
            groups[source or tile_source(mercantile.Tile(x, y, z), self.levels)].append((x, y))
        out: dict[tuple[int, int], np.ndarray] = {}
        n2 = 2.0**z
        centres = (np.arange(TILE_PX) + 0.5) / TILE_PX
        for src, group in groups.items():
            s = src.step
            idx = {}
            for x, y in group:
                lon = (x + centres) / n2 * 360.0 - 180.0
                lat = np.degrees(np.arctan(np.sinh(np.pi * (1.0 - 2.0 * (y + centres) / n2))))
                cols = np.floor((lon + 180.0) * PIXELS_PER_DEGREE / s).astype(np.int64)
                rows = np.floor((90.0 - lat) * PIXELS_PER_DEGREE / s).astype(np.int64)
                idx[(x, y)] = (rows, cols)
            rmin = min(int(r.min()) for r, _ in idx.values())
            rmax = max(int(r.max()) for r, _ in idx.values())
            cmin = min(int(c.min()) for _, c in idx.values())
            cmax = max(int(c.max()) for _, c in idx.values())
            canvas = self._canvas(src, slice(rmin, rmax + 1), slice(cmin, cmax + 1), name)
            for key, (rows, cols) in idx.items():
                out[key] = canvas[np.ix_(rows - rmin, cols - cmin)]
        return out

    def render_png(self, z: int, x: int, y: int) -> bytes:
        """One P(urban) tile as PNG bytes (a transparent tile where nothing is written)."""
        return encode_png(self.render(z, [(x, y)])[(x, y)], _RAMP)

    def value_at(self, lon: float, lat: float) -> dict[str, Any]:
        """The level-0 values of the product pixel holding (lon, lat): P(urban) and input quality."""
        from gum_ray.grid import pixel_index, pixel_center

        iy, ix = pixel_index(lon, lat)
        prob = int(self.product.read_window(self.year, slice(iy, iy + 1), slice(ix, ix + 1))[0, 0])
        out: dict[str, Any] = {
            "year": self.year, "lon": pixel_center(iy, ix)[0], "lat": pixel_center(iy, ix)[1],
            "probability": None if prob == NODATA else prob, "input_quality": None,
            "input_quality_recorded": self.has_quality,
        }
        if self.has_quality:
            q = int(np.asarray(self.product._array(0, QUALITY)[self.year_idx, iy, ix]))
            out["input_quality"] = None if q == NODATA else quality_names(q)
            out["input_quality_code"] = None if q == NODATA else q
        return out


def quality_names(code: int) -> dict[str, bool]:
    """The input-quality bit flags as {input: present}."""
    return {name: bool(code & bit) for bit, name in QUALITY_BITS}


_RAMP = ramp_rgba()
_QUALITY_PALETTE = quality_rgba()


# ------------------------------------------------------------------------------------ writing


@dataclass
class TilesResult:
    out: str
    year: int
    zooms: tuple[int, int]
    planned: int  # tiles over written cells in the zoom range
    written: int
    skipped: int  # already there (resume)
    quality_written: int
    seconds: float
    pmtiles: str | None = None

    @property
    def tiles_per_s(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else float("nan")


def _existing(out_year: str) -> set[str]:
    """Relative paths of the tiles already under ``OUT/<year>`` (one listing)."""
    return {p for p in fs.find(out_year) if p.endswith(".png")}


def _metatiles(tiles: Iterable[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    blocks: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)
    for x, y in tiles:
        blocks[(x // METATILE, y // METATILE)].append((x, y))
    return [sorted(v) for _, v in sorted(blocks.items())]


def _render_job(renderer: TileRenderer, out_year: str, z: int, block: list[tuple[int, int]],
                quality: bool) -> tuple[int, int]:
    """Render and write one block of tiles; returns (P tiles written, quality tiles written)."""
    values = renderer.render(z, block)
    for (x, y), v in values.items():
        fs.write_bytes(fs.join(out_year, str(z), str(x), f"{y}.png"), encode_png(v, _RAMP))
    nq = 0
    if quality:
        qv = renderer.render(z, block, name=QUALITY, source=TileSource(0, 1))
        for (x, y), v in qv.items():
            fs.write_bytes(fs.join(out_year, "quality", str(z), str(x), f"{y}.png"), encode_png(v, _QUALITY_PALETTE))
            nq += 1
    return len(values), nq


def _ray_render(product_root: str, year: int, cells: list[tuple[int, int]], cell_deg: float, chunk_px: int,
                out_year: str, z: int, blocks: list[list[tuple[int, int]]], quality: bool) -> tuple[int, int]:
    grid = ProductGrid(cell_deg, chunk_px)
    renderer = TileRenderer(product_root, year, [grid.cell(r, c) for r, c in cells])
    done = [0, 0]
    for block in blocks:
        a, b = _render_job(renderer, out_year, z, block, quality)
        done[0] += a
        done[1] += b
    return done[0], done[1]


def plan_tiles(renderer: TileRenderer, zooms: tuple[int, int], aoi: AOI | None = None) -> dict[int, set[tuple[int, int]]]:
    """{zoom: tiles over the written cells (within ``aoi``)}."""
    return {z: tiles_for_cells(renderer.cells, z, aoi) for z in range(zooms[0], zooms[1] + 1)}


def check_overviews(renderer: TileRenderer, zooms: tuple[int, int], plan: dict[int, set[tuple[int, int]]]) -> None:
    """:class:`InputError` if a zoom needs overview shards that were never built."""
    import mercantile

    need: dict[int, int] = {}
    for z, tiles in plan.items():
        for y in {y for _, y in tiles}:  # the source depends on the tile row only
            lvl = tile_source(mercantile.Tile(0, y, z), renderer.levels).level
            need[lvl] = min(need.get(lvl, z), z)
    missing = renderer.missing_overviews(need)
    if missing:
        lvl, r, c = missing[0]
        raise InputError(
            f"the product's overviews are not built over {len(missing)} shard(s) that zooms down to "
            f"{need[lvl]} need (first: level {lvl}, shard row {r} col {c}); build them with "
            f"ProductStore.build_overviews (gum map does it after writing) or raise the lowest zoom"
        )


def write_tiles(
    product: str | ProductStore,
    out: str,
    *,
    years: Sequence[int],
    zooms: tuple[int, int],
    aoi: AOI | None = None,
    workers: int = 2,
    backend: str = "auto",
    ray_address: str | None = None,
    pmtiles: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] = lambda m: None,
) -> list[TilesResult]:
    """Write XYZ tiles of ``years`` over the written cells into ``out`` (the viewer page beside
    them is :func:`gum_ray.viewer.write_viewer`'s, which ``gum tiles`` calls after this).

    Resumable: tiles already there are skipped. ``backend``: ``threads``, ``ray`` or ``auto`` (Ray
    when a run has more than :data:`RAY_MIN_TILES` tiles or ``ray_address`` is given). Raises
    :class:`InputError` (before anything is written) for a missing product, a year not in it,
    a bad zoom range, or missing overviews.
    """
    import time

    from tqdm import tqdm

    if not (isinstance(zooms, tuple) and len(zooms) == 2 and 0 <= zooms[0] <= zooms[1] <= MAX_ZOOM):
        raise InputError(f"zoom range {zooms}: zooms must satisfy 0 <= A <= B <= {MAX_ZOOM}")
    if backend not in ("auto", "threads", "ray"):
        raise InputError(f"backend {backend!r}: use auto, threads or ray")
    p = product if isinstance(product, ProductStore) else ProductStore.open(product)
    years = [int(y) for y in years]
    if not years:
        raise InputError("give at least one --year")
    for y in years:
        p.year_index(y)
    out = fs.normalize(out)
    if not fs.is_remote(out) and os.path.exists(out) and not os.path.isdir(out):
        raise InputError(f"output {out} is a file; give a folder for the tiles")
    # plan and check everything before writing anything
    plans = []
    for y in years:
        r = TileRenderer(p, y)
        if not r.cells:
            raise InputError(f"the product {p.root} has no written cells for {y}: nothing to tile")
        plan = plan_tiles(r, zooms, aoi)
        if not any(plan.values()):
            raise InputError(f"no written cells of {y} within the bbox: nothing to tile")
        check_overviews(r, zooms, plan)
        plans.append((y, r, plan))

    results = []
    for y, renderer, plan in plans:
        t0 = time.perf_counter()
        out_year = fs.join(out, str(y))
        have = _existing(out_year)
        quality = renderer.has_quality and tile_source(_centre_tile(renderer, zooms[1]), renderer.levels).level == 0
        jobs = []
        planned = skipped = 0
        for z, tiles in plan.items():
            todo = []
            for x, yy in tiles:
                planned += 1
                done = f"{z}/{x}/{yy}.png" in have and (
                    not (quality and z == zooms[1]) or f"quality/{z}/{x}/{yy}.png" in have
                )
                if done:
                    skipped += 1
                else:
                    todo.append((x, yy))
            for block in _metatiles(todo):
                jobs.append((z, block))
        ntodo = sum(len(b) for _, b in jobs)
        use_ray = backend == "ray" or (backend == "auto" and (ntodo > RAY_MIN_TILES or ray_address))
        echo(
            f"{y}: {planned:,} tiles over {len(renderer.cells):,} written cells at zooms "
            f"{zooms[0]}-{zooms[1]}; {skipped:,} already there, {ntodo:,} to write "
            f"({'Ray' if use_ray else f'{workers} threads'})"
        )
        written = qwritten = 0
        bar = tqdm(total=ntodo, unit="tile", desc=f"tiles {y}", disable=not progress or ntodo == 0,
                   dynamic_ncols=True, leave=False)
        try:
            if use_ray and ntodo:
                written, qwritten = _run_ray(renderer, out_year, jobs, zooms, quality, bar, ray_address)
            else:
                with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
                    futs = {
                        pool.submit(_render_job, renderer, out_year, z, block, quality and z == zooms[1]): len(block)
                        for z, block in jobs
                    }
                    for fut in as_completed(futs):
                        a, b = fut.result()
                        written += a
                        qwritten += b
                        bar.update(futs[fut])
        finally:
            bar.close()
        meta = tilejson(renderer, zooms, plan, quality=quality, aoi=aoi)
        fs.write_bytes(fs.join(out_year, "tiles.json"), json.dumps(meta, indent=1).encode())
        pm = None
        if pmtiles:
            pm = write_pmtiles(out, y, plan, meta)
        results.append(
            TilesResult(out=out, year=y, zooms=zooms, planned=planned, written=written, skipped=skipped,
                        quality_written=qwritten, seconds=time.perf_counter() - t0, pmtiles=pm)
        )
    return results


def _centre_tile(renderer: TileRenderer, z: int) -> Any:
    import mercantile

    c = renderer.cells[len(renderer.cells) // 2]
    w, s, e, n = c.bounds
    return mercantile.tile((w + e) / 2, max(min((s + n) / 2, 85.0), -85.0), z)


def _run_ray(renderer: TileRenderer, out_year: str, jobs: list[tuple[int, list[tuple[int, int]]]],
             zooms: tuple[int, int], quality: bool, bar: Any, address: str | None) -> tuple[int, int]:
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    try:
        return _run_ray_tasks(ray, renderer, out_year, jobs, zooms, quality, bar)
    finally:
        if started:
            ray.shutdown()


def _run_ray_tasks(ray: Any, renderer: TileRenderer, out_year: str, jobs: list[tuple[int, list[tuple[int, int]]]],
                   zooms: tuple[int, int], quality: bool, bar: Any) -> tuple[int, int]:
    task = ray.remote(num_cpus=1)(_ray_render)
    cells_ref = ray.put([(c.row, c.col) for c in renderer.cells])
    grid = renderer.grid
    # batches of about 64 tiles (8 metatiles at high zoom) per task
    pending = {}
    by_zoom: dict[int, list[list[tuple[int, int]]]] = defaultdict(list)
    for z, block in jobs:
        by_zoom[z].append(block)
    for z, blocks in by_zoom.items():
        batch: list[list[tuple[int, int]]] = []
        size = 0
        for block in blocks + [[]]:
            if block:
                batch.append(block)
                size += len(block)
            if batch and (size >= 256 or not block):
                ref = task.remote(renderer.product.root, renderer.year, cells_ref, grid.cell_deg, grid.chunk_px,
                                  out_year, z, batch, quality and z == zooms[1])
                pending[ref] = size
                batch, size = [], 0
    written = qwritten = 0
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            a, b = ray.get(ref)
            written += a
            qwritten += b
            bar.update(pending.pop(ref))
    return written, qwritten


def tilejson(renderer: TileRenderer, zooms: tuple[int, int], plan: dict[int, set[tuple[int, int]]],
             *, quality: bool, aoi: AOI | None = None) -> dict[str, Any]:
    """TileJSON 3.0.0 of one year's tiles, with a ``gum`` member the viewer reads."""
    boxes = [b for c in renderer.cells for b in _clip_bounds(c, aoi)] or [c.bounds for c in renderer.cells]
    w, s = min(b[0] for b in boxes), min(b[1] for b in boxes)
    e, n = max(b[2] for b in boxes), max(b[3] for b in boxes)
    return {
        "tilejson": "3.0.0",
        "name": f"GUM P(urban) {renderer.year}",
        "description": "probability of urban land cover (GlobalUrbanMapper), percent; palette index = value, 255 = no data",
        "version": "1.0.0",
        "attribution": "GUM urban map produced with gum-ray",
        "scheme": "xyz",
        "tiles": ["{z}/{x}/{y}.png"],
        "minzoom": zooms[0],
        "maxzoom": zooms[1],
        "bounds": [w, max(s, -85.051129), e, min(n, 85.051129)],
        "gum": {
            "year": renderer.year,
            "product": renderer.product.root,
            "software": f"gum-ray {__version__}",
            "cell_deg": renderer.grid.cell_deg,
            "cells": [[c.row, c.col] for c in renderer.cells],
            "clip": None if aoi is None else [list(b) for b in aoi_sides(aoi)],
            "tiles_per_zoom": {str(z): len(t) for z, t in plan.items()},
            "quality_tiles": "quality/{z}/{x}/{y}.png" if quality else None,
            "ramp_stops": [list(s) for s in RAMP_STOPS],
            "alpha_at_zero": ALPHA_AT_ZERO,
            "urban_threshold": URBAN_THRESHOLD,
        },
    }


def write_pmtiles(out: str, year: int, plan: dict[int, set[tuple[int, int]]], meta: dict[str, Any]) -> str:
    """Pack the year's PNG tiles (already written) into ``OUT/<year>.pmtiles`` (PMTiles v3)."""
    import tempfile

    from pmtiles.tile import Compression, TileType, zxy_to_tileid
    from pmtiles.writer import Writer

    out_year = fs.join(out, str(year))
    ids = sorted((zxy_to_tileid(z, x, y), z, x, y) for z, tiles in plan.items() for x, y in tiles)
    target = fs.join(out, f"{year}.pmtiles")
    fd, tmp = tempfile.mkstemp(prefix=".gum-tiles-", suffix=".pmtiles",
                               dir=None if fs.is_remote(out) else out)
    os.close(fd)
    try:
        with open(tmp, "wb") as f:
            writer = Writer(f)
            for tid, z, x, y in ids:
                writer.write_tile(tid, fs.read_bytes(fs.join(out_year, str(z), str(x), f"{y}.png")))
            w, s, e, n = meta["bounds"]
            writer.finalize(
                {
                    "tile_type": TileType.PNG, "tile_compression": Compression.NONE,
                    "min_zoom": meta["minzoom"], "max_zoom": meta["maxzoom"],
                    "min_lon_e7": int(w * 1e7), "min_lat_e7": int(s * 1e7),
                    "max_lon_e7": int(e * 1e7), "max_lat_e7": int(n * 1e7),
                    "center_zoom": meta["maxzoom"], "center_lon_e7": int((w + e) / 2 * 1e7),
                    "center_lat_e7": int((s + n) / 2 * 1e7),
                },
                {k: v for k, v in meta.items() if k not in ("tiles", "gum")},
            )
        os.chmod(tmp, 0o644)  # mkstemp makes 0600
        fs.put_file(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target
