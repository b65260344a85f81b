"""`gum tiles`: web-map tiles of the demo town checked pixel by pixel against the product, the set of
tiles against mercantile's list, overviews for low zooms, resume, PMTiles and clear errors."""

from __future__ import annotations

import io
import json
from pathlib import Path

import mercantile
import numpy as np
import pytest
from PIL import Image

from gum_ray.cli import main
from gum_ray.grid import pixel_index
from gum_ray.store.product import NODATA, ProductStore
from gum_ray.store.tiles import (
    TileRenderer,
    decode_png,
    parse_zoom_range,
    ramp_rgba,
    tile_source,
    written_cells,
)
from tests.town import HOLE, TOWN_LONLAT, make_town_product, town_cells
from tests.helpers import one_error_line

ZOOMS = (4, 16)


@pytest.fixture(scope="module")
def town(tmp_path_factory):
    root = tmp_path_factory.mktemp("town") / "product.zarr"
    make_town_product(str(root))
    return str(root)


@pytest.fixture(scope="module")
def tiles_out(town, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiles") / "web"
    assert main(["tiles", "--product", town, "--year", "2020", "--year", "2021", "--zoom", "4-16",
                 "--quiet", "--basemap", "none", str(out)]) == 0
    return out


def written_tiles(folder: Path) -> set[tuple[int, int, int]]:
    out = set()
    for p in folder.rglob("*.png"):
        rel = p.relative_to(folder).parts
        if rel[0] == "quality":
            continue
        z, x, y = int(rel[0]), int(rel[1]), int(rel[2][:-4])
        out.add((z, x, y))
    return out


def expected_tile(product: ProductStore, year: int, tile) -> np.ndarray:
    """The product pixel under each tile pixel's centre (mercantile's inverse projection)."""
    xb = mercantile.xy_bounds(tile)
    step = (xb.right - xb.left) / 256
    xs = xb.left + (np.arange(256) + 0.5) * step
    ys = xb.top - (np.arange(256) + 0.5) * step
    lon = np.array([mercantile.lnglat(x, ys[0]).lng for x in xs])
    lat = np.array([mercantile.lnglat(xs[0], y).lat for y in ys])
    iy = np.array([pixel_index(lon[0], v)[0] for v in lat])
    ix = np.array([pixel_index(v, lat[0])[1] for v in lon])
    window = product.read_window(year, slice(iy.min(), iy.max() + 1), slice(ix.min(), ix.max() + 1))
    return window[np.ix_(iy - iy.min(), ix - ix.min())]


def test_zoom14_tile_over_the_town_is_the_product_in_colour(town, tiles_out):
    product = ProductStore.open(town)
    t = mercantile.tile(*TOWN_LONLAT, 14)
    path = tiles_out / "2020" / "14" / str(t.x) / f"{t.y}.png"
    data = path.read_bytes()
    values = decode_png(data)
    expect = expected_tile(product, 2020, t)
    assert values.shape == (256, 256)
    np.testing.assert_array_equal(values, expect)
    rgba = np.asarray(Image.open(io.BytesIO(data)).convert("RGBA"))
    urban, nodata = (expect >= 50) & (expect <= 100), expect == NODATA
    assert urban.sum() > 5000 and nodata.sum() > 5000  # the town, and the unwritten cell beside it
    ramp = ramp_rgba()
    assert (rgba[urban][:, 3] == 255).all(), "urban pixels are opaque"
    np.testing.assert_array_equal(rgba[urban], ramp[expect[urban]])
    assert (rgba[nodata][:, 3] == 0).all(), "no data is transparent"
    low = (expect < 50) & ~nodata
    assert (rgba[low][:, 3] < 255).all()
    # the colours of the ramp: red for the town's core, pale yellow for 0 %
    assert tuple(ramp[100][:3]) == (0xBD, 0x00, 0x26) and tuple(ramp[0][:3]) == (0xFF, 0xFF, 0xB2)


def test_the_tiles_written_are_mercantiles_list_over_the_written_cells(town, tiles_out):
    cells = [c for c in town_cells() if c != HOLE]
    assert {(c.row, c.col) for c in written_cells(ProductStore.open(town), 2020)} == {(c.row, c.col) for c in cells}
    expect = {(t.z, t.x, t.y) for c in cells for t in mercantile.tiles(*c.bounds, zooms=list(range(4, 17)))}
    for year in ("2020", "2021"):
        assert written_tiles(tiles_out / year) == expect
    meta = json.loads((tiles_out / "2020" / "tiles.json").read_text())
    assert meta["tilejson"] == "3.0.0" and meta["minzoom"] == 4 and meta["maxzoom"] == 16
    assert sorted(map(tuple, meta["gum"]["cells"])) == sorted((c.row, c.col) for c in cells)
    page = (tiles_out / "index.html").read_text()
    assert "vendor/leaflet/leaflet.js" in page or "unpkg.com/leaflet@1.9.4" in page
    assert '"years":[2020,2021]' in page


def test_low_zooms_read_the_overviews_never_level_0(tmp_path):
    root = str(tmp_path / "product.zarr")
    p = make_town_product(root, years=(2020,))
    t4 = mercantile.tile(*TOWN_LONLAT, 4)
    assert tile_source(t4, 6).level == 6 and tile_source(mercantile.tile(*TOWN_LONLAT, 14), 6).level == 0
    before4 = TileRenderer(root, 2020).render_png(4, t4.x, t4.y)
    t14 = mercantile.tile(*TOWN_LONLAT, 14)
    before14 = TileRenderer(root, 2020).render_png(14, t14.x, t14.y)
    assert (decode_png(before4) != NODATA).any()
    # change level 0 (overviews not rebuilt): the zoom-4 tile cannot see it, the zoom-14 tile does
    for c in written_cells(p, 2020):
        p.write_cell(2020, c, np.full(c.shape, 7, np.uint8))
    assert TileRenderer(root, 2020).render_png(4, t4.x, t4.y) == before4
    after14 = decode_png(TileRenderer(root, 2020).render_png(14, t14.x, t14.y))
    assert set(np.unique(after14)) <= {7, NODATA} and TileRenderer(root, 2020).render_png(14, t14.x, t14.y) != before14


def test_resume_skips_existing_tiles_and_redoes_missing_ones(town, tmp_path, capsys):
    out = tmp_path / "web"
    args = ["tiles", "--product", town, "--year", "2020", "--zoom", "10-15", "--quiet", str(out)]
    assert main(args) == 0
    first = capsys.readouterr().out
    tiles = sorted(out.rglob("2020/**/*.png"))
    n = len(tiles)
    assert f"wrote {n:,} tiles, 0 already there" in first
    gone = tiles[::7]
    for f in gone:
        f.unlink()
    keep = tiles[1]
    mtime = keep.stat().st_mtime_ns
    assert main(args) == 0
    assert f"wrote {len(gone):,} tiles, {n - len(gone):,} already there" in capsys.readouterr().out
    assert keep.stat().st_mtime_ns == mtime and all(f.exists() for f in gone)


def test_bbox_limits_tiles_and_pmtiles_holds_the_same_tiles(town, tmp_path):
    from pmtiles.reader import MmapSource, Reader
    from pmtiles.tile import zxy_to_tileid  # noqa: F401 - the reader's id scheme

    out = tmp_path / "web"
    bbox = ["8.575", "47.375", "8.59", "47.39"]
    assert main(["tiles", "--product", town, "--year", "2021", "--zoom", "12-15", "--bbox", *bbox,
                 "--pmtiles", "--quiet", str(out)]) == 0
    got = written_tiles(out / "2021")
    cells = [c for c in town_cells() if c != HOLE]
    w, s, e, n = map(float, bbox)
    expect = set()
    for c in cells:
        cw, cs, ce, cn = c.bounds
        b = (max(cw, w), max(cs, s), min(ce, e), min(cn, n))
        if b[0] < b[2] and b[1] < b[3]:
            expect |= {(t.z, t.x, t.y) for t in mercantile.tiles(*b, zooms=[12, 13, 14, 15])}
    assert got == expect
    with open(out / "2021.pmtiles", "rb") as f:
        reader = Reader(MmapSource(f))
        header = reader.header()
        assert header["min_zoom"] == 12 and header["max_zoom"] == 15
        for z, x, y in sorted(got)[:: max(1, len(got) // 10)]:
            assert reader.get(z, x, y) == (out / "2021" / str(z) / str(x) / f"{y}.png").read_bytes()



@pytest.mark.parametrize(
    "case, extra, expect",
    [
        ("reversed zooms", ["--year", "2020", "--zoom", "14-4"], "0 <= A <= B <= 22"),
        ("zoom past 22", ["--year", "2020", "--zoom", "0-23"], "0 <= A <= B <= 22"),
        ("not a zoom", ["--year", "2020", "--zoom", "high"], "zoom range such as 0-14"),
        ("unknown year", ["--year", "2019", "--zoom", "4-8"], "years there: 2020, 2021"),
        ("missing product", ["--year", "2020", "--zoom", "4-8", "--product", "/nonexistent/p.zarr"], "no product at"),
        ("bbox off the map", ["--year", "2020", "--zoom", "4-8", "--bbox", "0", "0", "1", "1"], "nothing to tile"),
    ],
)
def test_bad_input_is_one_clear_line_and_nothing_is_written(town, tmp_path, capsys, case, extra, expect):
    out = tmp_path / "web"
    args = ["tiles", "--product", town, *extra, "--quiet", str(out)]
    assert main(args) == 2
    assert expect in one_error_line(capsys)
    assert not out.exists()


def test_missing_overviews_are_a_clear_error(tmp_path, capsys):
    from tests.town import GRID, SETTINGS, town_probability

    root = str(tmp_path / "product.zarr")
    p = ProductStore.create(root, settings=SETTINGS, years=[2020])
    c = GRID.cell_at(*TOWN_LONLAT)
    p.write_cell(2020, c, town_probability(c, 2020))
    out = tmp_path / "web"
    assert main(["tiles", "--product", root, "--year", "2020", "--zoom", "4-14", "--quiet", str(out)]) == 2
    assert "overviews are not built" in one_error_line(capsys)
    assert not out.exists()
    # zooms that read level 0 only need no overviews
    assert main(["tiles", "--product", root, "--year", "2020", "--zoom", "15-16", "--quiet", str(out)]) == 0


def test_parse_zoom_range():
    assert parse_zoom_range("4-14") == (4, 14) and parse_zoom_range("12") == (12, 12)


@pytest.mark.slow
def test_ray_backend_writes_the_same_tiles_as_threads(town, tmp_path):
    from gum_ray.store.tiles import write_tiles

    a, b = tmp_path / "threads", tmp_path / "ray"
    write_tiles(town, str(a), years=[2020], zooms=(12, 15), backend="threads", progress=False)
    res = write_tiles(town, str(b), years=[2020], zooms=(12, 15), backend="ray", progress=False)
    assert res[0].written == res[0].planned > 0
    files = sorted(p.relative_to(a) for p in (a / "2020").rglob("*.png"))
    assert files == sorted(p.relative_to(b) for p in (b / "2020").rglob("*.png"))
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


@pytest.mark.slow
def test_tiles_of_a_product_made_by_gum_map(tmp_path, capsys):
    """The whole way: `gum map` (local Ray, synthetic source, a small GUM network) writes the
    product and its overviews; `gum tiles` tiles it, from zoom 4 (overviews) to 15 (level 0)."""
    from gum_ray.model import ModelSpec, random_checkpoint

    ckpt = tmp_path / "tiny.pth"
    random_checkpoint(ckpt, ModelSpec(10, 8, 4), seed=1)
    data = tmp_path / "data"
    assert main(["map", "--bbox", "8.571", "47.371", "8.589", "47.379", "--year", "2020", "--data-dir", str(data),
                 "--checkpoint", str(ckpt), "--cell-deg", "0.01", "--chunk-px", "40", "--halo", "32",
                 "--quiet", "--no-preview"]) == 0
    root = str(data / "product.zarr")
    out = tmp_path / "web"
    assert main(["tiles", "--product", root, "--year", "2020", "--zoom", "4-15", "--quiet", str(out)]) == 0
    product = ProductStore.open(root)
    cells = written_cells(product, 2020)
    assert len(cells) == 2
    expect = {(t.z, t.x, t.y) for c in cells for t in mercantile.tiles(*c.bounds, zooms=list(range(4, 16)))}
    assert written_tiles(out / "2020") == expect
    for z, x, y in sorted(expect):
        if z == 15:
            values = decode_png((out / "2020" / str(z) / str(x) / f"{y}.png").read_bytes())
            np.testing.assert_array_equal(values, expected_tile(product, 2020, mercantile.Tile(x, y, z)))
    z4 = [t for t in expect if t[0] == 4]
    assert len(z4) == 1 and (decode_png((out / "2020" / "4" / str(z4[0][1]) / f"{z4[0][2]}.png").read_bytes()) != NODATA).any()


def test_tiles_to_gcs_equal_local_tiles_and_resume_there(town, tmp_path, gcs_emulator):
    import uuid

    from gum_ray.store import fs
    from gum_ray.store.tiles import write_tiles

    local = tmp_path / "web"
    remote = f"gs://gum-test/tiles-{uuid.uuid4().hex[:8]}"
    a = write_tiles(town, str(local), years=[2020], zooms=(14, 15), progress=False)[0]
    b = write_tiles(town, remote, years=[2020], zooms=(14, 15), progress=False)[0]
    assert a.written == b.written > 0
    names = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file() and "vendor" not in p.parts)
    assert sorted(n for n in fs.find(remote) if not n.startswith("vendor/")) == names
    for n in names:
        if n.endswith(".png"):
            assert fs.read_bytes(f"{remote}/{n}") == (local / n).read_bytes()
    again = write_tiles(town, remote, years=[2020], zooms=(14, 15), progress=False)[0]
    assert again.written == 0 and again.skipped == a.written
