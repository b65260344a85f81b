"""A small product over the synthetic world's demo town, written with the real product writer.

P(urban) is the synthetic ground truth (towns and roads) smoothed into a probability field
(Gaussian, sigma 1.5 px): a real, known map whose values span 0-100 %. The cells are 0.01 degree
(120 px) with the default 6 overview levels, built as `gum map` builds them. One cell (``HOLE``)
is left unwritten, so tiles over the town also show no data.
"""

from __future__ import annotations

import numpy as np
from odc.geo.geobox import GeoBox

from gum_ray.grid import ProductGrid
from gum_ray.sources import synthetic
from gum_ray.store.product import ProductSettings, ProductStore

GRID = ProductGrid(cell_deg=0.01, chunk_px=40)
SETTINGS = ProductSettings(grid=GRID)
# cells of the demo town: 0.01-degree cells over lon 8.56-8.61, lat 47.36-47.41 (5 x 5)
TOWN_BBOX = (8.56, 47.36, 8.61, 47.41)
TOWN_LONLAT = synthetic.DEMO_LONLAT
HOLE = GRID.cell_at(8.5735, 47.3735)  # near the town, inside the zoom-14 tile over its centre
YEARS = (2020, 2021)


def town_cells(bbox=TOWN_BBOX, grid: ProductGrid = GRID) -> list:
    w, s, e, n = bbox
    top, left = grid.cell_at(w + 1e-6, n - 1e-6), grid.cell_at(e - 1e-6, s + 1e-6)
    return [grid.cell(r, c) for r in range(top.row, left.row + 1) for c in range(top.col, left.col + 1)]


def town_probability(cell, year: int) -> np.ndarray:
    """uint8 percent on the cell's product grid: smoothed ground truth."""
    from scipy.ndimage import gaussian_filter

    gb = cell.product_geobox()
    pad = GeoBox.from_bbox(
        (gb.boundingbox.left - 10 / 12000, gb.boundingbox.bottom - 10 / 12000,
         gb.boundingbox.right + 10 / 12000, gb.boundingbox.top + 10 / 12000),
        "EPSG:4326", resolution=1 / 12000,
    )
    truth = synthetic.ground_truth(pad, year).astype(np.float32)
    p = gaussian_filter(truth, 1.5)[10:-10, 10:-10]
    return np.clip(np.round(p * 100), 0, 100).astype(np.uint8)


def make_town_product(root: str, years=YEARS, *, hole: bool = True, bbox=TOWN_BBOX,
                      settings: ProductSettings = SETTINGS) -> ProductStore:
    """The product over ``bbox`` (default: the 5 x 5 cells of the demo town, less ``HOLE``)."""
    p = ProductStore.create(root, settings=settings, years=list(years))
    cells = [c for c in town_cells(bbox, settings.grid) if not (hole and c == HOLE)]
    for y in years:
        for c in cells:
            p.write_cell(y, c, town_probability(c, y))
    p.build_overviews(cells, years=list(years))
    return p


def add_input_quality(root: str, year: int, cell, codes: np.ndarray) -> None:
    """Give the product an ``input_quality`` variable (the contract in docs/viewer.md: uint8 bit
    flags 1 = Sentinel-2, 2 = Sentinel-1, 4 = terrain, 255 = no data, on the probability's grid and
    shards) and write one cell of it, as the writer of a later product version will."""
    import zarr

    from gum_ray.store import fs

    p = ProductStore.open(root, writable=True)
    prob = p._array(0)
    g = zarr.open_group(fs.zarr_store(p.root), mode="r+")
    if "input_quality" not in g:
        arr = g.create_array(
            "input_quality", shape=prob.shape, dtype="uint8", fill_value=255, chunks=prob.chunks,
            shards=prob.shards, dimension_names=("year", "y", "x"),
            attributes={"long_name": "inputs present (bit flags: 1 Sentinel-2, 2 Sentinel-1, 4 terrain)",
                        "_FillValue": 255},
        )
        p.consolidate()
    else:
        arr = g["input_quality"]
    yi = p.year_index(year)
    arr[yi : yi + 1, cell.y_slice, cell.x_slice] = codes[None].astype(np.uint8)
    p.consolidate()
