"""The product grid, cells, UTM GeoBoxes, pixel areas and AOI parsing."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from pyproj import Geod, Transformer

from gum_ray.errors import GumError, InputError
from gum_ray.grid import (
    AOI,
    DEFAULT_GRID,
    GLOBAL_HEIGHT,
    GLOBAL_WIDTH,
    PIXEL_DEG,
    Cell,
    ProductGrid,
    aoi_windows,
    cells_for_aoi,
    geobox_from_dict,
    geobox_to_dict,
    parse_aoi,
    pixel_area_rows,
    pixel_center,
    pixel_index,
    x_coords,
    y_coords,
)

TINY = ProductGrid(cell_deg=0.01, chunk_px=40)


def test_default_grid_is_worldcover_grid():
    assert (GLOBAL_WIDTH, GLOBAL_HEIGHT) == (4_320_000, 2_160_000)
    assert DEFAULT_GRID.cell_px == 3000
    assert (DEFAULT_GRID.n_rows, DEFAULT_GRID.n_cols) == (720, 1440)
    assert (TINY.cell_px, TINY.n_rows, TINY.n_cols) == (120, 18000, 36000)


@pytest.mark.parametrize("cell_deg,chunk", [(0.07, 10), (0.0, 1), (0.25, 7), (1e-5, 1)])
def test_bad_grid_settings(cell_deg, chunk):
    with pytest.raises(InputError):
        ProductGrid(cell_deg, chunk)


def test_cell_geometry_and_ids():
    c = DEFAULT_GRID.cell_at(13.4, 52.5)  # on the edge 52.5: belongs to the cell south of it
    assert c.bounds == (13.25, 52.25, 13.5, 52.5)
    assert (c.row, c.col) == (150, 773)
    assert c.id == "r00150c00773"
    assert DEFAULT_GRID.cell_from_id(c.id) == c
    assert c.y_slice == slice(450_000, 453_000) and c.x_slice == slice(2_319_000, 2_322_000)
    gb = c.product_geobox()
    assert gb.shape == (3000, 3000)
    assert gb.crs.epsg == 4326
    assert gb.affine.c == 13.25 and gb.affine.f == 52.5
    assert gb.affine.a == pytest.approx(PIXEL_DEG) and gb.affine.e == pytest.approx(-PIXEL_DEG)
    with pytest.raises(InputError):
        Cell(720, 0)
    with pytest.raises(InputError):
        DEFAULT_GRID.cell_from_id("12-34")


def test_pixel_index_and_centre_round_trip():
    for lon, lat in [(0.0, 0.0), (-179.99999, 89.99999), (179.99999, -89.99999), (13.41234, 52.51234)]:
        iy, ix = pixel_index(lon, lat)
        clon, clat = pixel_center(iy, ix)
        assert abs(clon - lon) <= PIXEL_DEG / 2 + 1e-12
        assert abs(clat - lat) <= PIXEL_DEG / 2 + 1e-12
    assert pixel_index(180.0, 0.0)[1] == 0  # wraps
    assert x_coords(0, 1)[0] == pytest.approx(-180 + PIXEL_DEG / 2)
    assert y_coords(0, 1)[0] == pytest.approx(90 - PIXEL_DEG / 2)
    with pytest.raises(InputError):
        pixel_index(0.0, 90.5)


def test_pixel_area_matches_geodesic_polygons():
    geod = Geod(ellps="WGS84")
    for row in [1_080_000 - 1, 1_500_000, 360_000, 2_000_000]:
        lon, lat = pixel_center(row, 0)
        d = PIXEL_DEG / 2
        ref, _ = geod.polygon_area_perimeter([lon - d, lon + d, lon + d, lon - d], [lat - d, lat - d, lat + d, lat + d])
        assert pixel_area_rows(row, row + 1)[0] == pytest.approx(abs(ref), rel=1e-7)
    # the whole ellipsoid
    total = pixel_area_rows(0, GLOBAL_HEIGHT).sum() * GLOBAL_WIDTH
    assert total / 1e6 == pytest.approx(510_065_621.7, rel=1e-9)
    # pyramid step: one pixel at step 2 = the 2x2 pixels below it
    assert pixel_area_rows(10, 11, step=2)[0] == pytest.approx(2 * pixel_area_rows(20, 22).sum(), rel=1e-9)


def test_utm_geobox_covers_cell_with_halo():
    c = DEFAULT_GRID.cell_at(13.4, 52.4)
    gb = c.utm_geobox(halo_px=64)
    assert gb.crs.epsg == 32633
    assert gb.resolution.x == 10 and gb.resolution.y == -10
    assert gb.affine.c % 10 == 0 and gb.affine.f % 10 == 0  # on the 10 m lattice
    t = Transformer.from_crs(4326, 32633, always_xy=True)
    w, s, e, n = c.bounds
    xs, ys = t.transform([w, e, e, w], [s, s, n, n])
    x0, y0, x1, y1 = gb.extent.boundingbox
    assert x0 <= min(xs) - 640 and x1 >= max(xs) + 640
    assert y0 <= min(ys) - 640 and y1 >= max(ys) + 640
    assert gb.shape.x < 2100 and gb.shape.y < 3000  # ~1.7 km x 2.8 km at 52 N, plus halo
    roundtrip = geobox_from_dict(json.loads(json.dumps(geobox_to_dict(gb))))
    assert roundtrip == gb


def test_utm_geobox_antimeridian_polar_and_south():
    east = DEFAULT_GRID.cell_at(179.9, -16.8)
    assert east.utm_crs().to_epsg() == 32760
    west = DEFAULT_GRID.cell_at(-179.9, -16.8)
    assert west.utm_crs().to_epsg() == 32701
    north = DEFAULT_GRID.cell_at(25.1, 70.1)  # above 60 N
    gb = north.utm_geobox(halo_px=0)
    assert gb.crs.to_epsg() == 32635
    # 0.25 deg of longitude at 70 N is ~9.5 km; 0.25 deg of latitude ~27.9 km
    assert 900 < gb.shape.x < 1100 and 2700 < gb.shape.y < 2900
    for c in (east, west, north):
        assert c.utm_geobox().shape.x > 0


def test_cells_for_bbox_edges_and_counts():
    assert [c.bounds for c in cells_for_aoi((0, 0, 0.25, 0.25))] == [(0.0, 0.0, 0.25, 0.25)]
    cells = cells_for_aoi((0.1, 0.1, 0.6, 0.3))  # 3 columns x 2 rows
    assert len(cells) == 6
    assert len(cells_for_aoi((13.0, 52.0, 13.05, 52.03), TINY)) == 5 * 3
    europe = cells_for_aoi((-10, 35, 30, 60))
    assert len(europe) == 160 * 100


def test_cells_for_polygon_skip_corners():
    tri = {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [0, 1], [0, 0]]]}
    cells = cells_for_aoi(AOI.from_geojson(tri))
    assert 10 <= len(cells) < 16
    assert all(c.bounds[0] + c.bounds[1] < 1.0 for c in cells)


def test_antimeridian_bbox_needs_flag_and_gives_both_sides():
    with pytest.raises(InputError, match="antimeridian"):
        AOI.from_bbox(179.9, -17.0, -179.9, -16.8)
    aoi = AOI.from_bbox(179.9, -17.0, -179.9, -16.8, crosses_antimeridian=True)
    assert aoi.crosses_antimeridian and len(aoi.parts) == 2
    assert aoi.bounds == (179.9, -17.0, -179.9, -16.8)
    cols = {c.col for c in cells_for_aoi(aoi, TINY)}
    assert cols == set(range(35990, 36000)) | set(range(0, 10))
    (r1, c1), (r2, c2) = aoi_windows(aoi)
    assert c1.stop == GLOBAL_WIDTH and c2.start == 0 and r1 == r2
    with pytest.raises(InputError, match="does not cross"):
        AOI.from_bbox(10, 0, 11, 1, crosses_antimeridian=True)


def test_geojson_ring_across_antimeridian_is_split(tmp_path):
    ring = [[170, -10], [-170, -10], [-170, 10], [170, 10], [170, -10]]
    path = tmp_path / "fiji.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [ring]}}]}))
    aoi = AOI.from_geojson(path)
    assert aoi.crosses_antimeridian
    assert aoi.bounds == (170.0, -10.0, -170.0, 10.0)
    assert sorted(round(p.area, 6) for p in aoi.parts) == [200.0, 200.0]
    # RFC 7946 style: already split into a MultiPolygon
    mp = {"type": "MultiPolygon", "coordinates": [
        [[[170, -10], [180, -10], [180, 10], [170, 10], [170, -10]]],
        [[[-180, -10], [-170, -10], [-170, 10], [-180, 10], [-180, -10]]]]}
    aoi2 = AOI.from_geojson(mp)
    assert aoi2.crosses_antimeridian and aoi2.bounds == aoi.bounds
    assert {c.id for c in cells_for_aoi(aoi)} == {c.id for c in cells_for_aoi(aoi2)}
    # a normal polygon is not "crossing"
    assert not AOI.from_geojson({"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 0]]]}).crosses_antimeridian


@pytest.mark.parametrize(
    "bbox,match",
    [
        ((10, 0, 5, 1), "west .* is east of east"),
        ((0, 0, 1, 91), "beyond"),
        ((0, -90.5, 1, 1), "beyond"),
        ((0, 1, 1, 0), "south"),
        ((0, 0, 0, 1), "no width"),
        ((170, 0, 190, 1), "outside -180..180"),
        ((0, 0, float("nan"), 1), "finite"),
    ],
)
def test_bad_bboxes_are_clear_errors(bbox, match):
    with pytest.raises(GumError, match=match):
        AOI.from_bbox(*bbox)


def test_bad_geojson_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        AOI.from_geojson(tmp_path / "missing.geojson")
    bad = tmp_path / "bad.geojson"
    bad.write_text("{not json")
    with pytest.raises(InputError, match="not readable GeoJSON"):
        AOI.from_geojson(bad)
    with pytest.raises(InputError, match="has no area"):
        AOI.from_geojson({"type": "Point", "coordinates": [0, 0]})
    with pytest.raises(InputError, match="swapped or projected"):
        AOI.from_geojson({"type": "Polygon", "coordinates": [[[52, 13], [53, 13], [53, 95], [52, 13]]]})
    with pytest.raises(InputError, match="either --bbox"):
        parse_aoi()
    with pytest.raises(InputError, match="4 numbers"):
        parse_aoi(bbox=[1, 2, 3])


def test_aoi_area_is_geodesic():
    aoi = AOI.from_bbox(0, 0, 1, 1)
    assert aoi.area_km2() == pytest.approx(12308.8, rel=1e-3)
    assert math.isclose(AOI.from_bbox(179.5, 0, -179.5, 1, crosses_antimeridian=True).area_km2(), aoi.area_km2(), rel_tol=1e-6)
    assert np.isfinite(aoi.area_km2())
