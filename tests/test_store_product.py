"""The global product store, on a local folder and on gs:// (fake-gcs-server), with tiny cells.

Concurrency, idempotency, crash-between-data-and-marker, georeferencing (plain xarray + rioxarray),
year growth, overviews and area statistics.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from gum_ray.errors import GumError, InputError
from gum_ray.grid import AOI, GLOBAL_WIDTH, ProductGrid, pixel_area_rows, pixel_index
from gum_ray.store import fs
from gum_ray.store.manifest import Manifest, write_and_commit
from gum_ray.store.product import (
    NODATA,
    ProductSettings,
    ProductStore,
    encode_probability,
    mean_2x2,
    open_product,
)

GRID = ProductGrid(cell_deg=0.01, chunk_px=40)  # 120 px cells, 40 px inner chunks
SETTINGS = ProductSettings(grid=GRID, overview_levels=2)
BERLIN = (13.4123, 52.5123)


def pattern(row: int, col: int, year: int) -> np.ndarray:
    """A deterministic uint8 cell: percent values with a band of no data, different per cell."""
    rng = np.random.default_rng([row, col, year])
    a = rng.integers(0, 101, size=GRID.cell_px**2, dtype=np.uint8).reshape(GRID.cell_px, GRID.cell_px)
    a[(row + col) % 100 : (row + col) % 100 + 7, :] = NODATA
    return a


def make(root: str, years=(2020,)) -> ProductStore:
    return ProductStore.create(root, settings=SETTINGS, years=years)


def xr_open_plain(root: str):
    """Plain xarray.open_zarr on the product (no gum-ray code), lazily without dask."""
    import xarray as xr

    opts = {"storage_options": fs.gcs_storage_options()} if fs.is_remote(root) else {}
    return xr.open_zarr(root, chunks=None, **opts)


# ----------------------------------------------------------------------------- create / open


def test_create_open_and_metadata(store_root):
    make(store_root)
    p = ProductStore.open(store_root)
    assert p.years == [2020]
    assert p.grid == GRID and p.settings.prob_floor == 2
    meta = p.attrs["gum_product"]
    assert meta["format"] == "gum-ray-product" and meta["cell_px"] == 120
    assert p.attrs["Conventions"].startswith("CF-")
    assert [lvl["asset"] for lvl in p.attrs["multiscales"]["layout"]] == [".", "overviews/1", "overviews/2"]
    with pytest.raises(InputError, match="already holds"):
        make(store_root)
    ds = xr_open_plain(store_root)
    assert ds.probability.dims == ("year", "y", "x")
    assert ds.probability.shape == (1, 2_160_000, GLOBAL_WIDTH)
    assert ds.probability.encoding["_FillValue"] == NODATA
    assert ds.probability.encoding["shards"] == (1, 120, 120)
    assert ds.probability.encoding["chunks"] == (1, 40, 40)
    assert float(ds.y[0]) > float(ds.y[1])  # north-up
    assert ds.pixel_area.attrs["units"] == "m2"
    assert "crs_wkt" in ds.spatial_ref.attrs and "GeoTransform" in ds.spatial_ref.attrs


def test_not_a_product_is_a_clear_error(store_root, tmp_path):
    with pytest.raises(GumError, match="does not exist"):
        ProductStore.open(store_root)
    with pytest.raises(GumError, match="no product"):
        open_product(store_root)
    # a Zarr group that is not ours
    import zarr

    zarr.open_group(fs.zarr_store(store_root), mode="w", attributes={"title": "something else"})
    with pytest.raises(GumError, match="not a gum product"):
        open_product(store_root)
    # a folder of other files
    other = tmp_path / "other"
    other.mkdir()
    (other / "readme.txt").write_text("hello")
    with pytest.raises(GumError, match="not a gum product"):
        ProductStore.open(str(other))


# ----------------------------------------------------------------------------- write / read


def test_write_read_floor_nodata_and_empty_cells(store_root):
    p = make(store_root)
    cell = GRID.cell_at(*BERLIN)
    prob = np.linspace(0, 1, GRID.cell_px**2, dtype=np.float32).reshape(GRID.cell_px, GRID.cell_px)
    prob[:10] = np.nan
    prob[10, :5] = 0.015  # below the 2 % floor -> 0
    res = p.write_cell(2020, cell, prob)
    back = p.read_cell(2020, cell)
    assert back.dtype == np.uint8
    assert (back[:10] == NODATA).all()
    assert (back[10, :5] == 0).all()
    assert np.array_equal(back, encode_probability(prob, 2))
    assert res.valid_px == 110 * 120 and res.nodata_px == 1200 and not res.empty
    assert res.urban_px == int((back[10:] >= 50).sum())
    shard = fs.join(store_root, *p.shard_key(2020, cell).split("/"))
    assert fs.exists(shard)
    # an all-no-data cell stores nothing, and removes what was there
    empty = p.write_cell(2020, cell, np.full(cell.shape, np.nan, np.float32))
    assert empty.empty and not fs.exists(shard)
    assert (p.read_cell(2020, cell) == NODATA).all()
    other = GRID.cell(cell.row + 1, cell.col)
    p.write_cell(2020, other, np.full(other.shape, NODATA, np.uint8))
    assert not fs.exists(fs.join(store_root, *p.shard_key(2020, other).split("/")))
    # bad inputs
    with pytest.raises(InputError, match="shape"):
        p.write_cell(2020, cell, np.zeros((5, 5), np.float32))
    with pytest.raises(InputError, match="must lie in"):
        p.write_cell(2020, cell, np.full(cell.shape, 50.0, np.float32))
    with pytest.raises(InputError, match="neither 0-100"):
        p.write_cell(2020, cell, np.full(cell.shape, 150, np.uint8))
    with pytest.raises(InputError, match="0.25 degree grid"):
        p.write_cell(2020, ProductGrid().cell_at(*BERLIN), np.zeros((3000, 3000), np.float32))


def test_same_input_same_bytes(store_root):
    p = make(store_root)
    cell = GRID.cell_at(*BERLIN)
    data = pattern(cell.row, cell.col, 2020)
    p.write_cell(2020, cell, data)
    first = p.shard_sha256(2020, cell)
    ProductStore.open(store_root, writable=True).write_cell(2020, cell, data.copy())
    assert p.shard_sha256(2020, cell) == first
    p.write_cell(2020, cell, pattern(cell.row, cell.col, 2021))
    assert p.shard_sha256(2020, cell) != first


# ----------------------------------------------------------------------------- georeferencing


POINTS = [
    BERLIN,
    (179.99512, -16.80123),  # east of the antimeridian
    (-179.99512, -16.80123),  # west of it
    (25.12345, 70.45678),  # above 60 N
    (-68.30123, -54.80123),  # far south
]


def test_pixel_lands_at_its_lon_lat(store_root):
    p = make(store_root)
    for i, (lon, lat) in enumerate(POINTS):
        cell = GRID.cell_at(lon, lat)
        data = np.full(cell.shape, 10, np.uint8)
        iy, ix = pixel_index(lon, lat)
        data[iy - cell.y_slice.start, ix - cell.x_slice.start] = 60 + i
        p.write_cell(2020, cell, data)
    import rioxarray  # noqa: F401

    da = xr_open_plain(store_root).probability
    assert da.rio.crs.to_epsg() == 4326
    ds = open_product(store_root)
    assert ds.rio.crs.to_epsg() == 4326
    import xarray as xr

    lons = xr.DataArray([lon for lon, _ in POINTS], dims="point")
    lats = xr.DataArray([lat for _, lat in POINTS], dims="point")
    got = ds.probability.sel(year=2020, y=lats, x=lons, method="nearest").values  # one dask compute
    assert got.tolist() == [60.0 + i for i in range(len(POINTS))]
    for i, (lon, lat) in enumerate(POINTS):
        assert float(da.sel(year=2020, y=lat, x=lon, method="nearest")) == 60 + i
        # one pixel off is the background
        d = 1.0 / 12000
        assert float(da.sel(year=2020, y=lat + d, x=lon, method="nearest")) == 10
        assert float(da.sel(year=2020, y=lat, x=lon - d, method="nearest")) == 10
        # the cell's subset has the cell's GeoBox transform
        cell = GRID.cell_at(lon, lat)
        sub = da.isel(year=0, y=cell.y_slice, x=cell.x_slice)
        assert sub.rio.transform().almost_equals(cell.product_geobox().affine, precision=1e-9)


# ----------------------------------------------------------------------------- years


def test_year_dimension_grows(store_root):
    p = make(store_root)
    cell = GRID.cell_at(*BERLIN)
    p.write_cell(2020, cell, pattern(cell.row, cell.col, 2020))
    with pytest.raises(InputError, match=r"year 2021 is not in the product .*years there: 2020"):
        p.write_cell(2021, cell, pattern(cell.row, cell.col, 2021))
    writer = ProductStore.open(store_root, writable=True)  # opened before the driver adds the year
    writer.years
    assert p.add_year(2021) == 1
    assert p.add_year(2021) == 1  # no-op
    writer.write_cell(2021, cell, pattern(cell.row, cell.col, 2021))
    ds = xr_open_plain(store_root)
    assert ds.year.values.tolist() == [2020, 2021]
    for y in (2020, 2021):
        got = ProductStore.open(store_root).read_cell(y, cell)
        assert np.array_equal(got, encode_probability(pattern(cell.row, cell.col, y)))
    with pytest.raises(InputError, match="2019 is not in the product"):
        ProductStore.open(store_root).year_index(2019)


# ----------------------------------------------------------------------------- concurrency


def _writer(root: str, cells: list[tuple[int, int]], barrier) -> None:
    product = ProductStore.open(root, writable=True)
    manifest = Manifest(root)
    barrier.wait(timeout=120)
    for r, c in cells:
        write_and_commit(
            product, manifest, 2020, GRID.cell(r, c), pattern(r, c, 2020),
            checkpoint_sha256="0" * 64, settings={"stride": 192}, source="test", source_dates=None,
        )


def test_eight_processes_sixty_four_cells_lose_nothing(store_root):
    make(store_root)
    r0, c0 = GRID.cell_at(*BERLIN).row, GRID.cell_at(*BERLIN).col
    cells = [(r0 + i, c0 + j) for i in range(8) for j in range(8)]
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(8)
    procs = [ctx.Process(target=_writer, args=(store_root, cells[k::8], barrier)) for k in range(8)]
    for pr in procs:
        pr.start()
    for pr in procs:
        pr.join(timeout=240)
    assert [pr.exitcode for pr in procs] == [0] * 8
    p = ProductStore.open(store_root)
    n = GRID.cell_px
    block = p.read_window(2020, slice(r0 * n, (r0 + 8) * n), slice(c0 * n, (c0 + 8) * n))
    for r, c in cells:
        got = block[(r - r0) * n : (r - r0 + 1) * n, (c - c0) * n : (c - c0 + 1) * n]
        assert np.array_equal(got, encode_probability(pattern(r, c, 2020))), (r, c)
    assert Manifest(store_root).done(2020) == {GRID.cell(r, c).id for r, c in cells}


# ----------------------------------------------------------------------------- crash between data and marker

_CRASH = """
import os, signal, sys
from tests.test_store_product import GRID, pattern
from gum_ray.store.product import ProductStore
root, r, c = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ProductStore.open(root, writable=True).write_cell(2020, GRID.cell(r, c), pattern(r, c, 2020))
os.kill(os.getpid(), signal.SIGKILL)  # dies after the data, before the marker
"""


def test_killed_between_data_and_marker_is_completed_by_rerun(store_root):
    p = make(store_root)
    cell = GRID.cell_at(*BERLIN)
    proc = subprocess.run(
        [sys.executable, "-c", _CRASH, store_root, str(cell.row), str(cell.col)],
        cwd=os.path.dirname(os.path.dirname(__file__)), timeout=120, capture_output=True,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    m = Manifest(store_root)
    assert not m.is_done(2020, cell)
    assert m.pending(2020, [cell]) == [cell]
    after_crash = p.shard_sha256(2020, cell)
    assert after_crash is not None
    # the rerun: same data, then the marker
    _, committed = write_and_commit(
        p, m, 2020, cell, pattern(cell.row, cell.col, 2020), checkpoint_sha256="0" * 64,
        settings={}, source="test", source_dates=("2020-01-01", "2021-01-01"),
    )
    assert committed and m.is_done(2020, cell) and m.pending(2020, [cell]) == []
    assert p.shard_sha256(2020, cell) == after_crash
    # a second rerun finds the marker: not an error, nothing changes
    _, again = write_and_commit(
        p, m, 2020, cell, pattern(cell.row, cell.col, 2020), checkpoint_sha256="0" * 64,
        settings={}, source="test", source_dates=None,
    )
    assert not again and p.shard_sha256(2020, cell) == after_crash


# ----------------------------------------------------------------------------- overviews


def test_overviews_are_2x2_means(store_root):
    p = make(store_root, years=(2020, 2021))
    base = GRID.cell_at(*BERLIN)
    r0, c0 = base.row - base.row % 4, base.col - base.col % 4  # a level-2 shard's 4 x 4 cells
    cells = [GRID.cell(r0 + i, c0 + j) for i in range(4) for j in range(3)]
    for c in cells:
        p.write_cell(2020, c, pattern(c.row, c.col, 2020))
    assert p.build_overviews(cells) == 4 + 1  # 2 x 2 shards of 2 x 2 cells at level 1, one at level 2
    n = GRID.cell_px
    lvl0 = p.read_window(2020, slice(r0 * n, (r0 + 4) * n), slice(c0 * n, (c0 + 4) * n))
    lvl1 = p.read_window(2020, slice(r0 * n // 2, (r0 + 4) * n // 2), slice(c0 * n // 2, (c0 + 4) * n // 2), level=1)
    lvl2 = p.read_window(2020, slice(r0 * n // 4, (r0 + 4) * n // 4), slice(c0 * n // 4, (c0 + 4) * n // 4), level=2)
    assert np.array_equal(lvl1, mean_2x2(lvl0))
    assert np.array_equal(lvl2, mean_2x2(lvl1))
    assert (lvl1[:, 3 * n // 2 :] == NODATA).all()  # the fourth column of cells is empty
    # a 2x2 block by hand
    blk = lvl0[:2, :2].astype(float)
    v = blk[blk != NODATA]
    assert lvl1[0, 0] == (NODATA if v.size == 0 else int(np.floor(v.mean() + 0.5)))
    # the other year has nothing
    assert (p.read_window(2021, slice(r0 * n // 2, (r0 + 4) * n // 2), slice(c0 * n // 2, (c0 + 4) * n // 2), level=1) == NODATA).all()
    # georeferenced levels
    ds1 = open_product(store_root, level=1, mask_and_scale=False)
    lon, lat = GRID.cell(r0, c0).bounds[0] + 0.00312, GRID.cell(r0, c0).bounds[3] - 0.00213
    iy, ix = pixel_index(lon, lat)
    val = int(ds1.probability.sel(year=2020, y=lat, x=lon, method="nearest"))
    assert val == lvl1[(iy - r0 * n) // 2, (ix - c0 * n) // 2]
    assert ds1.rio.resolution()[0] == pytest.approx(2 / 12000)


# ----------------------------------------------------------------------------- statistics


def test_urban_area_statistics(store_root):
    from gum_ray.store.stats import urban_area

    p = make(store_root, years=(2020, 2021))
    a = GRID.cell_at(*BERLIN)
    b = GRID.cell(a.row, a.col + 1)
    p.write_cell(2020, a, np.full(a.shape, 80, np.uint8))  # urban
    p.write_cell(2020, b, np.full(b.shape, 30, np.uint8))  # mapped, not urban
    row_area = pixel_area_rows(a.y_slice.start, a.y_slice.stop)  # m^2 per pixel per row
    cell_km2 = row_area.sum() * GRID.cell_px / 1e6
    w, s, _, n = a.bounds
    stats = urban_area(store_root, AOI.from_bbox(w, s, b.bounds[2], n))
    y2020, y2021 = stats
    assert y2020.urban_km2 == pytest.approx(cell_km2, rel=1e-9)
    assert y2020.mapped_km2 == pytest.approx(2 * cell_km2, rel=1e-9)
    assert y2020.aoi_km2 == pytest.approx(2 * cell_km2, rel=1e-9)
    assert y2020.mean_probability == pytest.approx(55.0)
    assert y2021.urban_km2 == 0 and y2021.mapped_km2 == 0
    assert cell_km2 == pytest.approx(AOI.from_bbox(*a.bounds).area_km2(), rel=1e-5)
    # a GeoJSON polygon over the west half of cell a (pixel-centre rule)
    half = {"type": "Polygon", "coordinates": [[[w, s], [w + 0.005, s], [w + 0.005, n], [w, n], [w, s]]]}
    (h2020,) = urban_area(p, AOI.from_geojson(half), years=[2020])
    assert h2020.urban_km2 == pytest.approx(cell_km2 / 2, rel=1e-9)
    # coarse level gives nearly the same (overviews built)
    p.build_overviews([a, b])
    (l1,) = urban_area(p, AOI.from_bbox(w, s, b.bounds[2], n), years=[2020], level=1)
    assert l1.urban_km2 == pytest.approx(cell_km2, rel=1e-6)
    with pytest.raises(InputError, match="1999 is not in the product"):
        urban_area(p, AOI.from_bbox(w, s, b.bounds[2], n), years=[1999])


def test_urban_area_across_the_antimeridian(store_root):
    from gum_ray.store.stats import urban_area

    p = make(store_root)
    east = GRID.cell_at(179.995, -16.805)
    west = GRID.cell_at(-179.995, -16.805)
    assert (east.col, west.col) == (GRID.n_cols - 1, 0)
    p.write_cell(2020, east, np.full(east.shape, 90, np.uint8))
    p.write_cell(2020, west, np.full(west.shape, 90, np.uint8))
    aoi = AOI.from_bbox(179.99, -16.81, -179.99, -16.80, crosses_antimeridian=True)
    (st,) = urban_area(p, aoi)
    cell_km2 = pixel_area_rows(east.y_slice.start, east.y_slice.stop).sum() * GRID.cell_px / 1e6
    assert st.urban_km2 == pytest.approx(2 * cell_km2, rel=1e-9)


def test_stats_cli(store_root, capsys, tmp_path):
    from gum_ray.cli import main

    p = make(store_root)
    a = GRID.cell_at(*BERLIN)
    p.write_cell(2020, a, np.full(a.shape, 80, np.uint8))
    w, s, e, n = a.bounds
    aoi = tmp_path / "aoi.geojson"
    aoi.write_text(
        '{"type": "Polygon", "coordinates": [[[%r, %r], [%r, %r], [%r, %r], [%r, %r], [%r, %r]]]}'
        % (w, s, e, s, e, n, w, n, w, s)
    )
    assert main(["stats", "--product", store_root, "--aoi", str(aoi)]) == 0
    out = capsys.readouterr().out
    cell_km2 = pixel_area_rows(a.y_slice.start, a.y_slice.stop).sum() * GRID.cell_px / 1e6
    assert "2020" in out and f"{cell_km2:,.3f}" in out
    assert main(["stats", "--product", store_root, "--bbox", str(w), str(s), str(e), str(n), "--year", "2030"]) == 2
    assert "year 2030 is not in the product" in capsys.readouterr().err
    assert main(["stats", "--product", store_root, "--bbox", str(e), str(s), str(w), str(n)]) == 2
    assert "--antimeridian" in capsys.readouterr().err
    assert main(["stats", "--product", str(tmp_path), "--bbox", "0", "0", "1", "1"]) == 2
    assert "not a gum product" in capsys.readouterr().err
