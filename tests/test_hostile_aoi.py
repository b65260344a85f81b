"""Malformed or misleading GeoJSON AOIs: one clear line each, honoured or refused CRSs, a cap on
the cells an AOI may plan, and a word when an AOI crosses the antimeridian."""

from __future__ import annotations

import json

import pytest

from gum_ray.grid import count_cells
from gum_ray.cli import main
from gum_ray.errors import InputError
from gum_ray.grid import AOI, DEFAULT_GRID, cells_for_aoi
from tests.hostile import error_lines, gum_cli

ZURICH_LONLAT = [[8.5, 47.3], [8.6, 47.3], [8.6, 47.4], [8.5, 47.4], [8.5, 47.3]]


def poly(coords, **extra):
    return {"type": "Polygon", "coordinates": coords, **extra}


def named_crs(name):
    return {"type": "name", "properties": {"name": name}}


MALFORMED = {
    "coordinates_null": (poly(None), "coordinates is null"),
    "position_is_a_number": (poly([[8.5, 47.3, 8.6, 47.3]]), "coordinates[0][0] is the number 8.5"),
    "string_coordinate": (poly([[["8.5", 47.3], [8.6, 47.3], [8.6, 47.4], [8.5, 47.3]]]),
                          "the string '8.5'"),
    "boolean_coordinate": (poly([[[True, 47.3], [8.6, 47.3], [8.6, 47.4], [8.5, 47.3]]]), "a boolean"),
    "nan_coordinate": ('{"type": "Polygon", "coordinates": [[[NaN, 47.3], [8.6, 47.3], [8.6, 47.4], [8.5, 47.3]]]}',
                       "non-finite"),
    "ring_is_a_string": (poly(["abc"]), "coordinates[0] is the string 'abc'"),
    "rings_nested_too_deep": (poly([[[[8.5, 47.3], [8.6, 47.3]]] * 4]), "coordinates[0][0]: a coordinate is an array"),
    "short_position": (poly([[[8.5], [8.6, 47.3], [8.6, 47.4], [8.5, 47.3]]]), "fewer than 2 numbers"),
    "features_not_a_list": ({"type": "FeatureCollection", "features": {"a": 1}}, "features is an object"),
    "geometry_a_string": ({"type": "Feature", "geometry": "POLYGON((0 0))"}, "geometry is the string"),
    "top_level_list": ([1, 2, 3], "the top level is an array, not a GeoJSON object"),
    "no_type": ({"coordinates": ZURICH_LONLAT}, "no 'type'"),
    "line_string": ({"type": "LineString", "coordinates": ZURICH_LONLAT}, "has no area"),
    "json_nested_100k_deep": ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    "not_json": ("{not json", "not readable GeoJSON"),
    "not_utf8": (b"\xff\xfe\x00{", "not UTF-8"),
    "crs_epsg_3857": (poly([[[950000, 6000000], [960000, 6000000], [960000, 6010000], [950000, 6000000]]],
                           crs=named_crs("urn:ogc:def:crs:EPSG::3857")), "reproject the file"),
    "crs_null": (poly([ZURICH_LONLAT], crs=None), "crs is null"),
    "crs_link": (poly([ZURICH_LONLAT], crs={"type": "link", "properties": {"href": "http://x/crs"}}),
                 "not a named CRS"),
    "feature_crs_3857": ({"type": "FeatureCollection", "features": [
        {"type": "Feature", "crs": named_crs("EPSG:3857"), "geometry": poly([ZURICH_LONLAT])}]},
        "features[0].crs is 'EPSG:3857'"),
}


def _write(tmp_path, name, content):
    path = tmp_path / f"{name}.geojson"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_geojson_is_one_line_and_plans_nothing(tmp_path, case, capsys):
    content, expected = MALFORMED[case]
    path = _write(tmp_path, case, content)
    data = tmp_path / "data"
    code = main(["map", "--aoi", str(path), "--year", "2020", "--data-dir", str(data), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("gum: error: "), err
    assert expected in err[0], err[0]
    assert not data.exists()


def test_deeply_nested_geojson_from_the_console_script(tmp_path):
    path = _write(tmp_path, "deep", "[" * 100_000 + "]" * 100_000)
    r = gum_cli("plan", "--aoi", path, "--year", "2020", timeout=300)
    lines = error_lines(r.stderr)
    assert r.returncode == 2 and lines == [f"gum: error: AOI file {path}: nested too deeply to be GeoJSON; "
                                           "give a Polygon or MultiPolygon"], lines


def test_crs84_and_short_epsg_4326_are_lon_lat():
    plain = AOI.from_geojson(poly([ZURICH_LONLAT]))
    for name in ("urn:ogc:def:crs:OGC:1.3:CRS84", "urn:ogc:def:crs:OGC::CRS84",
                 "http://www.opengis.net/def/crs/OGC/1.3/CRS84", "EPSG:4326"):
        aoi = AOI.from_geojson(poly([ZURICH_LONLAT], crs=named_crs(name)))
        assert aoi.geometry.equals(plain.geometry), name


@pytest.mark.parametrize("name", ["urn:ogc:def:crs:EPSG::4326", "urn:ogc:def:crs:EPSG:6.6:4326",
                                  "http://www.opengis.net/def/crs/EPSG/0/4326"])
def test_lat_lon_urn_is_read_lat_lon(name, caplog):
    latlon = [[lat, lon] for lon, lat in ZURICH_LONLAT]
    aoi = AOI.from_geojson(poly([latlon], crs=named_crs(name)))
    assert aoi.bounds == pytest.approx((8.5, 47.3, 8.6, 47.4))  # Zurich, not (47.37 E, 8.57 N)
    assert any("puts latitude first" in r.getMessage() for r in caplog.records)


def test_lat_lon_urn_warns_on_the_command_line(tmp_path):
    latlon = [[lat, lon] for lon, lat in ZURICH_LONLAT]
    path = _write(tmp_path, "zurich_urn", poly([latlon], crs=named_crs("urn:ogc:def:crs:EPSG::4326")))
    r = gum_cli("plan", "--aoi", path, "--year", "2020")
    assert r.returncode == 0, r.stderr
    warn = [ln for ln in r.stderr.splitlines() if "latitude first" in ln]
    assert len(warn) == 1 and "longitudes 8.5000..8.6000, latitudes 47.3000..47.4000" in warn[0]
    assert "cells (shards)        1 x 1 year(s) = 1" in r.stdout


def test_cell_cap_refuses_a_typo_and_the_flag_lifts_it(tmp_path, capsys):
    # a typo'd latitude (-47 for 47) makes a box of 94 degrees: 64,800 cells
    args = ["plan", "--bbox", "0", "-47.4", "40", "47.4", "--year", "2020", "--source", "ee"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "covers more than 20,000 cells" in err[0] and "--max-aoi-cells" in err[0], err
    assert main(args + ["--max-aoi-cells", "70000"]) == 0
    line = [ln for ln in capsys.readouterr().out.splitlines() if "cells (shards)" in ln][0]
    assert 20_000 < int(line.split()[2]) <= 70_000


def test_count_cells_matches_cells_for_aoi_and_stops_early():
    aoi = AOI.from_geojson(poly([[[5, 45], [11, 45], [8, 49], [5, 45]]]))
    exact = len(cells_for_aoi(aoi, DEFAULT_GRID))
    assert count_cells(aoi, DEFAULT_GRID, 10**9) == exact
    assert 10 < count_cells(aoi, DEFAULT_GRID, 10) <= exact
    world = AOI.from_bbox(-180, -90, 180, 90)
    assert 20_000 < count_cells(world, DEFAULT_GRID, 20_000) <= 40_000  # stops early: not 1,036,800


def test_antimeridian_crossing_geojson_is_announced(tmp_path):
    fiji = poly([[[177.0, -18.5], [-178.0, -18.5], [-178.0, -16.0], [177.0, -16.0], [177.0, -18.5]]])
    path = _write(tmp_path, "fiji", fiji)
    r = gum_cli("plan", "--aoi", path, "--year", "2020", "--source", "ee")
    assert r.returncode == 0, r.stderr
    notes = [ln for ln in r.stderr.splitlines() if "crosses the antimeridian" in ln]
    assert len(notes) == 1 and "east from 177 to 180 and from -180 to -178" in notes[0], r.stderr


def test_antimeridian_split_is_unchanged():
    fiji = poly([[[177.0, -18.5], [-178.0, -18.5], [-178.0, -16.0], [177.0, -16.0], [177.0, -18.5]]])
    aoi = AOI.from_geojson(fiji)
    assert aoi.crosses_antimeridian and len(aoi.parts) == 2
    assert aoi.bounds == pytest.approx((177.0, -18.5, -178.0, -16.0))


def test_oversized_aoi_file_is_refused(tmp_path, monkeypatch):
    import gum_ray.aoi as A

    monkeypatch.setattr(A, "MAX_AOI_BYTES", 1000)
    path = _write(tmp_path, "big", {"type": "Polygon", "coordinates": [ZURICH_LONLAT * 50]})
    with pytest.raises(InputError, match="more than an AOI needs"):
        AOI.from_geojson(path)
