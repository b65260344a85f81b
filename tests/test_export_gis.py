"""GIS exports: urban-area polygons (GeoParquet, GeoJSON) whose area agrees with `gum stats`, and
`gum export --cogs` (a COG per written cell, a VRT that GDAL reads as the product, a STAC collection)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
import shapely

from gum_ray.cli import main
from gum_ray.grid import AOI, ProductGrid, pixel_index
from gum_ray.store.product import ProductSettings, ProductStore
from gum_ray.store.stats import urban_area
from tests.town import make_town_product

# 0.03-degree cells (360 px) over 0.09 x 0.09 degree around the demo town: several towns and roads
GRID3 = ProductGrid(cell_deg=0.03, chunk_px=120)
AREA = (8.55, 47.34, 8.64, 47.43)
BBOX = ["--bbox", "8.555", "47.35", "8.63", "47.42"]  # not on cell edges


@pytest.fixture(scope="module")
def towns(tmp_path_factory):
    root = tmp_path_factory.mktemp("towns") / "product.zarr"
    make_town_product(str(root), years=(2021,), hole=False, bbox=AREA,
                      settings=ProductSettings(grid=GRID3, overview_levels=2))
    return str(root)


def read_geoparquet(path):
    table = pq.read_table(path)
    geo = json.loads(table.schema.metadata[b"geo"])
    geoms = shapely.from_wkb(table.column("geometry").to_numpy(zero_copy_only=False))
    return table, geo, geoms


@pytest.mark.parametrize("threshold", [50, 80])
def test_polygon_area_agrees_with_gum_stats(towns, tmp_path, capsys, threshold):
    out = tmp_path / "urban.parquet"
    assert main(["export", "--product", towns, *BBOX, "--year", "2021", "--threshold", str(threshold),
                 str(out)]) == 0
    assert "urban polygons" in capsys.readouterr().out
    assert main(["stats", "--product", towns, *BBOX, "--year", "2021", "--threshold", str(threshold),
                 "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)["years"][0]
    table, geo, geoms = read_geoparquet(out)
    assert len(geoms) >= {50: 1, 80: 2}[threshold]  # towns joined by roads at 50 %, apart at 80 %
    area = table.column("area_km2").to_numpy()
    assert abs(area.sum() - stats["urban_km2"]) <= 0.10 * stats["urban_km2"], (area.sum(), stats)
    assert (area >= 0.01).all()
    # per polygon: the stated area is the polygon's geodesic area
    from pyproj import Geod

    g = Geod(ellps="WGS84")
    np.testing.assert_allclose([abs(g.geometry_area_perimeter(p)[0]) / 1e6 for p in geoms], area, rtol=1e-9)
    assert all(p.is_valid and p.geom_type == "Polygon" for p in geoms)
    w, s, e, n = map(float, BBOX[1:])
    assert all(w - 1e-4 <= p.bounds[0] and p.bounds[2] <= e + 1e-4 and s - 1e-4 <= p.bounds[1] and p.bounds[3] <= n + 1e-4 for p in geoms)


def test_geoparquet_follows_the_spec_and_geojson_matches_it(towns, tmp_path):
    pqf, gj = tmp_path / "u.parquet", tmp_path / "u.geojson"
    for f in (pqf, gj):
        assert main(["export", "--product", towns, *BBOX, "--year", "2021", "--min-area", "0.05",
                     "--simplify", "2", str(f)]) == 0
    table, geo, geoms = read_geoparquet(pqf)
    assert geo["version"] == "1.1.0" and geo["primary_column"] == "geometry"
    col = geo["columns"]["geometry"]
    assert col["encoding"] == "WKB" and col["geometry_types"] == ["Polygon"]
    assert col["crs"]["id"] == {"authority": "EPSG", "code": 4326}
    assert set(table.column_names) == {"id", "year", "area_km2", "bbox", "geometry"}
    bbox = table.column("bbox").to_pylist()
    assert all(p.exterior.is_ccw and not any(r.is_ccw for r in p.interiors) for p in geoms)
    for b, p in zip(bbox, geoms):
        assert (b["xmin"], b["ymin"], b["xmax"], b["ymax"]) == pytest.approx(p.bounds)
    gum = json.loads(table.schema.metadata[b"gum"])
    assert gum["simplify_px"] == 2 and gum["min_area_km2"] == 0.05 and gum["threshold_percent"] == 50
    fc = json.loads(gj.read_text())
    assert fc["type"] == "FeatureCollection" and len(fc["features"]) == len(geoms)
    areas = sorted(f["properties"]["area_km2"] for f in fc["features"])
    np.testing.assert_allclose(areas, sorted(table.column("area_km2").to_pylist()), rtol=1e-6)
    for f in fc["features"]:
        ring = f["geometry"]["coordinates"][0]
        assert shapely.LinearRing(ring).is_ccw, "RFC 7946: exterior rings counter-clockwise"


def test_min_area_and_simplification_are_applied(towns, tmp_path):
    from gum_ray.store.polygons import export_polygons

    aoi = AOI.from_bbox(*map(float, BBOX[1:]))
    kw = dict(year=2021, aoi=aoi, threshold=70)  # at 70 % roads break into many small pieces
    exact = export_polygons(towns, tmp_path / "a.parquet", min_area_km2=0, simplify_px=0, **kw)
    big = export_polygons(towns, tmp_path / "b.parquet", min_area_km2=0.01, simplify_px=0, **kw)
    simple = export_polygons(towns, tmp_path / "c.parquet", min_area_km2=0, simplify_px=3, **kw)
    assert exact.polygons > 20 and 0 < big.polygons < exact.polygons
    assert big.dropped_small == exact.polygons - big.polygons
    assert 0 < simple.polygons <= exact.polygons
    nv = lambda f: sum(shapely.get_num_coordinates(g) for g in read_geoparquet(f)[2])  # noqa: E731
    assert nv(tmp_path / "c.parquet") < 0.5 * nv(tmp_path / "a.parquet")
    assert abs(simple.urban_km2 - exact.urban_km2) < 0.02 * exact.urban_km2


def test_polygon_bad_input_is_one_line(towns, tmp_path, capsys):
    assert main(["export", "--product", towns, *BBOX, "--year", "2019", str(tmp_path / "x.parquet")]) == 2
    assert "years there: 2021" in capsys.readouterr().err
    assert main(["export", "--product", towns, *BBOX, "--year", "2021", "--format", "geojson",
                 "--threshold", "0", str(tmp_path / "x.geojson")]) == 2
    assert "threshold 0" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_cogs_vrt_reads_as_the_product_and_stac_lists_them(towns, tmp_path, capsys):
    import pystac

    out = tmp_path / "gis"
    assert main(["export", "--cogs", "--product", towns, "--year", "2021", str(out)]) == 0
    assert "wrote 9 COGs (0 already there)" in capsys.readouterr().out
    vrt = out / "2021" / "gum_2021.vrt"
    p = ProductStore.open(towns)
    with rasterio.open(vrt) as src:
        assert src.crs.to_epsg() == 4326 and src.nodata == 255 and src.dtypes == ("uint8",)
        assert (src.width, src.height) == (1080, 1080)
        assert src.bounds.left == pytest.approx(8.55, abs=1e-12) and src.bounds.top == pytest.approx(47.43, abs=1e-12)
        data = src.read(1)
        iy, ix = pixel_index(8.55 + 1e-9, 47.43 - 1e-9)
        expect = p.read_window(2021, slice(iy, iy + 1080), slice(ix, ix + 1080))
        np.testing.assert_array_equal(data, expect)
        # a decimated read (what QGIS does zoomed out) works too
        small = src.read(1, out_shape=(270, 270))
        assert small.shape == (270, 270) and (small != 255).any()
    coll = pystac.Collection.from_file(str(out / "2021" / "collection.json"))
    items = list(coll.get_items())
    assert len(items) == 9
    for item in items:
        href = item.assets["data"].get_absolute_href()
        with rasterio.open(href) as cog:
            assert list(cog.bounds) == pytest.approx(item.bbox, abs=1e-12)
            assert item.properties["proj:shape"] == [cog.height, cog.width]
    assert coll.assets["mosaic"].get_absolute_href() == str(vrt)
    # resume: a second run keeps the COGs
    assert main(["export", "--cogs", "--product", towns, "--year", "2021", str(out)]) == 0
    assert "wrote 0 COGs (9 already there)" in capsys.readouterr().out


def test_cogs_bad_input_is_one_line(towns, tmp_path, capsys):
    assert main(["export", "--cogs", "--product", towns, "--year", "2021", "--bbox", "0", "0", "1", "1",
                 str(tmp_path / "g")]) == 2
    assert "nothing to export" in capsys.readouterr().err
    assert main(["export", "--cogs", "--product", str(tmp_path / "none.zarr"), "--year", "2021",
                 str(tmp_path / "g")]) == 2
    assert "no product at" in capsys.readouterr().err
    assert not (tmp_path / "g").exists()


def test_polygons_follow_a_geojson_aoi_like_gum_stats(towns, tmp_path, capsys):
    tri = tmp_path / "tri.geojson"
    tri.write_text(json.dumps({"type": "Polygon", "coordinates": [[[8.555, 47.35], [8.63, 47.35], [8.555, 47.42], [8.555, 47.35]]]}))
    out = tmp_path / "tri.geojson.out.geojson"
    assert main(["export", "--product", towns, "--aoi", str(tri), "--year", "2021", "--simplify", "0",
                 "--min-area", "0", str(out)]) == 0
    capsys.readouterr()
    assert main(["stats", "--product", towns, "--aoi", str(tri), "--year", "2021", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)["years"][0]
    feats = json.loads(out.read_text())["features"]
    total = sum(f["properties"]["area_km2"] for f in feats)
    assert stats["urban_km2"] > 0.3 and abs(total - stats["urban_km2"]) <= 0.01 * stats["urban_km2"]
    poly = shapely.Polygon([(8.555, 47.35), (8.63, 47.35), (8.555, 47.42)]).buffer(1e-4)
    assert all(poly.contains(shapely.geometry.shape(f["geometry"])) for f in feats)
