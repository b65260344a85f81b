"""The input-quality band (which of Sentinel-2 / Sentinel-1 / terrain each pixel had) and the
synthetic world's clouds: bits match the imagery's masks in the prediction, the product (and its
overviews) and the COGs; products written before the variable stay readable everywhere; clouds are
deterministic; GUM 2.0 maps the cloud pixels that GUM 1 leaves as no data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio

from gum_ray.grid import AOI, ProductGrid, point_geobox
from gum_ray.imagery import NODATA, QUALITY_S1, QUALITY_S2, QUALITY_TERRAIN, Imagery, input_quality
from gum_ray.sources import synthetic
from gum_ray.store.product import ProductSettings, ProductStore
from gum_ray.store.quality import QUALITY, and_2x2

GRID = ProductGrid(cell_deg=0.01, chunk_px=40)
CLOUDY_YEAR = 2022  # the demo town's cell r04262c18857 is 40 % under cloud in 2022, town pixels too
CLOUDY_LONLAT = (8.575, 47.375)
TINY_GUM1 = Path(__file__).parent / "data" / "tiny_gum1.pth"


def quality_of(masks: dict[str, np.ndarray]) -> np.ndarray:
    """The bits written out by hand, to check :func:`input_quality` against."""
    return (masks["s2"] * 1 + masks["s1"] * 2 + masks["terrain"] * 4).astype(np.uint8)


# ------------------------------------------------------------------------------------- clouds


def test_clouds_are_deterministic_per_year_and_place_and_only_hide_sentinel2():
    gb = point_geobox(*CLOUDY_LONLAT, size=300)
    a, cls = synthetic.render(gb, CLOUDY_YEAR, clouds=True)
    b, _ = synthetic.render(gb, CLOUDY_YEAR, clouds=True)
    clear, _ = synthetic.render(gb, CLOUDY_YEAR)
    np.testing.assert_array_equal(a.export, b.export)  # NaN in the same places, same values elsewhere
    cloud = synthetic.cloud_cover(gb, CLOUDY_YEAR)
    assert 0.1 < cloud.mean() < 0.9 and (cloud & synthetic.urban(cls)).any()
    np.testing.assert_array_equal(~a.masks["s2"], cloud)
    assert a.masks["s1"].all() and a.masks["terrain"].all()
    np.testing.assert_array_equal(a.export[4:], clear.export[4:])  # radar and terrain untouched
    np.testing.assert_array_equal(a.export[:4, :, ~cloud.any(axis=0)], clear.export[:4, :, ~cloud.any(axis=0)])
    # another year has other clouds; the default (and the source's default) is cloud-free
    assert (synthetic.cloud_cover(gb, CLOUDY_YEAR + 1) != cloud).mean() > 0.05
    assert clear.masks["s2"].all() and clear.provenance["clouds"] is False


def test_a_tile_of_a_grid_gets_the_clouds_of_the_whole_grid():
    gb = point_geobox(*CLOUDY_LONLAT, size=256)
    whole = synthetic.cloud_cover(gb, CLOUDY_YEAR)
    np.testing.assert_array_equal(synthetic.cloud_cover(gb[100:180, 40:200], CLOUDY_YEAR), whole[100:180, 40:200])


def test_cloud_share_is_realistic_and_the_humid_tropics_have_overcast_cells():
    from odc.geo.geobox import GeoBox

    def cell_share(w, s, year):  # a 0.25-degree cell, sampled at 1/1200 degree
        gb = GeoBox.from_bbox((w, s, w + 0.25, s + 0.25), "EPSG:4326", resolution=1 / 1200)
        return synthetic.cloud_cover(gb, year).mean()

    temperate = [cell_share(w, 47.0, 2021) for w in (8.0, 8.25, 8.5, 8.75)]
    assert all(0.05 < s < 0.5 for s in temperate), temperate
    # Quito's cell (lat -0.25..0) is overcast in 2021, and clear-ish tropics still hold 40-95 %
    assert cell_share(-78.5, -0.25, 2021) > 0.99
    tropics = [cell_share(w, -1.5, 2021) for w in (36.5, 36.75, 37.0, 37.25)]
    assert all(s > 0.4 for s in tropics), tropics


def test_source_option_clouds_and_cached_cells_are_refetched_when_it_changes(tmp_path):
    from gum_ray.mapping.job import MapJob
    from gum_ray.mapping.stages import fetch_cell

    cell = GRID.cell_at(*CLOUDY_LONLAT)
    base = dict(aoi=AOI.from_bbox(*cell.bounds), years=(CLOUDY_YEAR,), product=str(tmp_path / "p"),
                cache=str(tmp_path / "cache"), grid=GRID, halo_px=8)
    assert fetch_cell(MapJob(**base), CLOUDY_YEAR, cell.row, cell.col)["fetched"]
    assert not fetch_cell(MapJob(**base), CLOUDY_YEAR, cell.row, cell.col)["fetched"]  # cached
    cloudy = MapJob(**base, source_options=(("clouds", "true"),))
    assert fetch_cell(cloudy, CLOUDY_YEAR, cell.row, cell.col)["fetched"]  # other pixels: refetched
    assert not fetch_cell(cloudy, CLOUDY_YEAR, cell.row, cell.col)["fetched"]
    assert not cloudy.imagery_cache().get(CLOUDY_YEAR, cell).masks["s2"].all()


# ------------------------------------------------------------------- prediction and the models


@pytest.fixture(scope="module")
def cloudy_imagery() -> Imagery:
    imagery = synthetic.SyntheticSource(clouds=True).fetch(point_geobox(*CLOUDY_LONLAT, size=256), CLOUDY_YEAR)
    imagery.export[4:8, :20, :30] = np.nan  # and a corner without Sentinel-1
    return Imagery.from_export(imagery.export, imagery.geobox, imagery.provenance)


def test_input_quality_bits_match_the_masks(cloudy_imagery):
    q = cloudy_imagery.input_quality()
    np.testing.assert_array_equal(q, quality_of(cloudy_imagery.masks))
    assert {QUALITY_S2 | QUALITY_S1 | QUALITY_TERRAIN, QUALITY_S1 | QUALITY_TERRAIN} <= set(np.unique(q).tolist())
    assert (q[:20, :30] & QUALITY_S1 == 0).all()
    np.testing.assert_array_equal(input_quality({"s2": [True, False], "s1": [False, False],
                                                 "terrain": [True, True]}), [5, 4])


def test_gum2_maps_cloud_pixels_that_gum1_leaves_as_no_data(cloudy_imagery):
    from gum_ray.gum2 import Gum2
    from gum_ray.inference import InferenceEngine, InferenceSettings
    from gum_ray.network import load_model

    settings = InferenceSettings(precision="fp32")
    gum1 = InferenceEngine(load_model(TINY_GUM1), settings).predict_imagery(cloudy_imagery)
    gum2 = InferenceEngine(Gum2.random(8, seed=1), settings).predict_imagery(cloudy_imagery)
    s2, s1 = cloudy_imagery.masks["s2"], cloudy_imagery.masks["s1"]
    np.testing.assert_array_equal(gum1.valid, s2)  # GUM 1: no Sentinel-2, no data
    np.testing.assert_array_equal(gum2.valid, s2 | s1)  # GUM 2.0: either is enough
    assert (~s2 & s1).sum() > 1000
    for pred in (gum1, gum2):  # the band is the imagery's, whatever the model mapped
        np.testing.assert_array_equal(pred.quality, quality_of(cloudy_imagery.masks))


# --------------------------------------------------------------------------------- the product


def test_product_writes_input_quality_with_its_overviews(tmp_path):
    p = ProductStore.create(str(tmp_path / "p"), settings=ProductSettings(grid=GRID, overview_levels=2),
                            years=[2021])
    assert p.has_quality
    cell = GRID.cell_at(*CLOUDY_LONLAT)
    prob = np.full(cell.shape, 0.7, np.float32)
    q = np.full(cell.shape, 7, np.uint8)
    q[:40] = 6  # no S2
    q[:, :10] = NODATA
    q[50:52, 50:52] = [[7, 3], [NODATA, 5]]
    p.write_cell(2021, cell, prob, q)
    np.testing.assert_array_equal(p.read_window(2021, cell.y_slice, cell.x_slice, variable=QUALITY), q)
    p.build_overviews([cell])
    lvl1 = p.read_window(2021, slice(cell.y_slice.start // 2, cell.y_slice.stop // 2),
                         slice(cell.x_slice.start // 2, cell.x_slice.stop // 2), level=1, variable=QUALITY)
    np.testing.assert_array_equal(lvl1, and_2x2(q))
    assert lvl1[25, 25] == 7 & 3 & 5 and (lvl1[:, :5] == NODATA).all() and (lvl1[:20, 5:] == 6).all()
    with pytest.raises(Exception, match="neither bit flags"):
        p.write_cell(2021, cell, prob, np.full(cell.shape, 9, np.uint8))
    # the xarray view carries it, and a new year grows it too
    from gum_ray.store.product import open_product

    ds = open_product(p.root, chunks=None, mask_and_scale=False)
    assert QUALITY in ds and ds[QUALITY].dims == ("year", "y", "x")
    p.add_year(2022)
    assert p._array(0, QUALITY).shape[0] == 2


def old_product(root: str) -> ProductStore:
    """A product as gum-ray wrote it before the input-quality variable: without it."""
    import shutil

    from tests.town import make_town_product

    make_town_product(root, years=(2020,), hole=False)
    for level in range(ProductSettings().overview_levels + 1):
        shutil.rmtree(Path(root, *(["overviews", str(level)] if level else []), QUALITY))
    import zarr

    from gum_ray.store import fs

    zarr.consolidate_metadata(fs.zarr_store(root))
    return ProductStore.open(root, writable=True)


def test_an_old_product_without_the_variable_reads_everywhere(tmp_path):
    from gum_ray.cli import main
    from gum_ray.store.cog import export_cog
    from gum_ray.store.tiles import TileRenderer
    from tests.town import TOWN_BBOX, TOWN_LONLAT, town_cells

    root = str(tmp_path / "old.zarr")
    p = old_product(root)
    assert not p.has_quality
    cell = town_cells()[0]
    # writing into it with a quality band skips the band (the layout is the product's own)
    r = p.write_cell(2020, cell, np.full(cell.shape, 0.5, np.float32), np.full(cell.shape, 7, np.uint8))
    assert r.valid_px == cell.shape[0] * cell.shape[1] and not p.has_quality
    res = export_cog(p, tmp_path / "old.tif", year=2020, aoi=AOI.from_bbox(*TOWN_BBOX))
    assert res.quality_path is None and not (tmp_path / "old_quality.tif").exists()
    renderer = TileRenderer(p, 2020)
    assert not renderer.has_quality
    assert renderer.value_at(*TOWN_LONLAT)["input_quality_recorded"] is False
    w, s, e, n = TOWN_BBOX
    bbox = ["--bbox", str(w), str(s), str(e), str(n)]
    assert main(["stats", "--product", root, *bbox]) == 0
    assert main(["status", root]) == 0
    assert main(["export", "--product", root, "--year", "2020", "--cogs", str(tmp_path / "cogs")]) == 0
    assert not (tmp_path / "cogs" / "2020" / "quality").exists()
    assert main(["tiles", "--product", root, "--year", "2020", "--zoom", "14", "--quiet", "--basemap", "none",
                 str(tmp_path / "web")]) == 0
    assert not (tmp_path / "web" / "2020" / "quality").exists()


def test_cog_exports_carry_the_quality_as_a_sibling_cog(tmp_path):
    from rio_cogeo.cogeo import cog_validate

    from gum_ray.store.cog import export_cog
    from gum_ray.store.cogs_export import export_cogs

    p = ProductStore.create(str(tmp_path / "p"), settings=ProductSettings(grid=GRID, overview_levels=1),
                            years=[2021])
    cells = [GRID.cell_at(*CLOUDY_LONLAT), GRID.cell_at(CLOUDY_LONLAT[0] + 0.01, CLOUDY_LONLAT[1])]
    rng = np.random.default_rng(0)
    codes = {}
    for c in cells:
        codes[c.id] = rng.choice(np.array([4, 5, 6, 7, NODATA], np.uint8), size=c.shape)
        p.write_cell(2021, c, rng.random(c.shape).astype(np.float32), codes[c.id])
    p.build_overviews(cells)
    # one COG of an area: name.tif + name_quality.tif, the same grid
    box = (cells[0].bounds[0], cells[0].bounds[1], cells[1].bounds[2], cells[1].bounds[3])
    res = export_cog(p, tmp_path / "area.tif", year=2021, aoi=AOI.from_bbox(*box))
    assert res.quality_path == str(tmp_path / "area_quality.tif")
    assert cog_validate(res.quality_path, strict=True)[0]
    with rasterio.open(tmp_path / "area.tif") as a, rasterio.open(res.quality_path) as q:
        assert (a.transform, a.shape, a.crs) == (q.transform, q.shape, q.crs) and q.nodata == NODATA
        got = q.read(1)
        assert q.tags(1)["flag_meanings"] == "sentinel_2 sentinel_1 terrain"
    np.testing.assert_array_equal(got, np.concatenate([codes[c.id] for c in cells], axis=1))
    # per-cell COGs: quality/<cell>.tif beside cogs/<cell>.tif, a VRT and a STAC asset
    out = tmp_path / "cogs"
    export_cogs(p, str(out), year=2021)
    for c in cells:
        with rasterio.open(out / "2021" / "quality" / f"{c.id}.tif") as q:
            np.testing.assert_array_equal(q.read(1), codes[c.id])
        item = json.loads((out / "2021" / "items" / f"gum-urban-2021-{c.id}.json").read_text())
        assert item["assets"]["input_quality"]["href"] == f"../quality/{c.id}.tif"
    with rasterio.open(out / "2021" / "gum_2021_quality.vrt") as v:
        assert v.read(1).shape == (120, 240)
