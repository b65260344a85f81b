"""gum patches: patch grids centred on points, the Zarr dataset, GeoTIFFs, resume, bad input."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import rasterio
from pyproj import Transformer

from gum_ray import cli
from gum_ray.errors import CheckpointError, InputError
from gum_ray.model import ModelSpec, random_checkpoint
from gum_ray.patches import (
    PatchDataset,
    PatchJob,
    centre_offset_px,
    parse_points,
    point_geobox,
    points_geojson,
    read_points,
    run_patches,
    utm_crs,
)
from gum_ray.sources.synthetic import DEMO_LONLAT, world_export
from tests.helpers import write_export

SMALL = ModelSpec(10, 16, 8)
YEAR = 2021
TOWN = DEMO_LONLAT
NEAR = (8.5650, 47.3950)  # 1.9 km north-west of the demo town
FAR = (9.30, 47.80)  # outside the GeoTIFF export made below


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("ckpt") / "small.pth"
    random_checkpoint(path, SMALL, seed=1)
    return str(path)


def _points_file(path, pts) -> str:
    path.write_text(json.dumps(points_geojson(pts)))
    return str(path)


# ------------------------------------------------------------------------------------ geometry


@pytest.mark.parametrize(
    "lon,lat",
    [TOWN, (-70.6483, -33.4569), (179.999, 10.0), (-180.0, -5.0), (0.0, 0.0), (25.0, 83.9), (-60.0, -79.9),
     (2.9999, 45.0), (3.0001, 45.0)],
)
def test_point_geobox_is_256_at_10m_in_the_utm_zone_centred_within_half_a_pixel(lon, lat):
    gb = point_geobox(lon, lat)
    assert tuple(gb.shape) == (256, 256)
    assert gb.affine.a == 10.0 and gb.affine.e == -10.0 and gb.affine.b == gb.affine.d == 0
    zone = min(int((lon + 180) // 6) + 1, 60)
    assert gb.crs.epsg == (32600 if lat >= 0 else 32700) + zone == utm_crs(lon, lat).to_epsg()
    dx, dy = centre_offset_px(gb, lon, lat)
    assert abs(dx) <= 0.5 + 1e-9 and abs(dy) <= 0.5 + 1e-9
    # independently: the point's pixel is one of the 4 central pixels
    x, y = Transformer.from_crs(4326, gb.crs.to_wkt(), always_xy=True).transform(lon, lat)
    col, row = (x - gb.affine.c) / gb.affine.a, (y - gb.affine.f) / gb.affine.e
    assert 127.5 <= col <= 128.5 and 127.5 <= row <= 128.5
    # pixel edges on the 10 m lattice shared by every gum-ray UTM grid
    assert gb.affine.c % 10 == 0 and gb.affine.f % 10 == 0


# ------------------------------------------------------------------------------------- points


def test_point_ids_come_from_id_then_properties_then_index():
    fc = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "id": "a b/c", "properties": {"id": "ignored"},
         "geometry": {"type": "Point", "coordinates": [8.5, 47.3]}},
        {"type": "Feature", "properties": {"id": 7}, "geometry": {"type": "Point", "coordinates": [8.6, 47.3]}},
        {"type": "Feature", "properties": {}, "geometry": {"type": "Point", "coordinates": [8.7, 47.3]}},
    ]}
    pts = parse_points(fc)
    assert [p.id for p in pts] == ["a b/c", "7", "2"]
    assert [p.key for p in pts] == ["a_b_c", "7", "2"]


@pytest.mark.parametrize(
    "coords,match",
    [([8.5, 95.0], "latitude 95.0 is beyond"), ([195.0, 8.5], "longitude 195.0"), ([8.5, 86.0], "84"),
     ([8.5, -82.0], "80 S"), ([500000.0, 5200000.0], "beyond"), ([float("nan"), 1.0], "finite")],
)
def test_points_outside_valid_latitudes_or_longitudes_are_clear_errors(coords, match):
    fc = points_geojson([("ok", 8.5, 47.3)])
    fc["features"].append({"type": "Feature", "id": "bad-one", "geometry": {"type": "Point", "coordinates": coords}})
    with pytest.raises(InputError, match=match) as ei:
        parse_points(fc, source="pts.geojson")
    assert "bad-one" in str(ei.value)


def test_points_file_without_points_is_a_clear_error(tmp_path):
    path = tmp_path / "empty.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": []}))
    with pytest.raises(InputError, match="has no points"):
        read_points(path)
    path.write_text("{not json")
    with pytest.raises(InputError, match="not valid GeoJSON"):
        read_points(path)
    with pytest.raises(InputError, match="no such file"):
        read_points(tmp_path / "missing.geojson")
    # the CLI says it on one line, with a non-zero exit code, before any work
    path.write_text(json.dumps({"type": "FeatureCollection", "features": []}))
    assert cli.main(["patches", "--points", str(path), "--year", "2021", "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()


def test_non_point_geometry_and_duplicate_ids_are_rejected():
    poly = {"type": "FeatureCollection", "features": [{"type": "Feature", "id": 1, "geometry": {
        "type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 0]]]}}]}
    with pytest.raises(InputError, match="not a Point"):
        parse_points(poly)
    with pytest.raises(InputError, match="the same"):
        parse_points(points_geojson([("a/b", 8.5, 47.3), ("a_b", 8.6, 47.3)]))


# ------------------------------------------------------------------------------- the dataset


def test_patches_are_georeferenced_labelled_stored_and_a_rerun_skips_what_is_done(tmp_path, ckpt):
    out = tmp_path / "patches"
    pts = parse_points(points_geojson([("town", *TOWN), ("near", *NEAR)]))
    job = PatchJob(tuple(pts), YEAR, str(out), checkpoint=ckpt)
    report = run_patches(job, executor="inline")
    assert [o.status for o in report.outcomes] == ["complete", "complete"]

    ds = PatchDataset(out)
    assert ds.attrs["year"] == YEAR and ds.attrs["source"]["source"] == "synthetic"
    assert sorted(ds.complete_keys()) == ["near", "town"]
    rec = ds.read("town")
    gb = point_geobox(*TOWN)
    assert rec.imagery.geobox == gb
    assert rec.imagery.export.shape == (11, 256, 256)
    # compact encodings at the synthetic world's own precision (aspect within float32 rounding)
    np.testing.assert_allclose(rec.imagery.export, world_export(gb, YEAR), rtol=0, atol=1e-4)
    assert rec.probability.dtype == np.uint8 and rec.probability.max() <= 100
    assert rec.cls.dtype == np.uint8 and set(np.unique(rec.cls)) <= {0, 1}
    assert (rec.cls[rec.probability >= 51] == 1).all() and (rec.cls[rec.probability <= 49] == 0).all()
    assert rec.attrs["lon"] == TOWN[0] and rec.attrs["lat"] == TOWN[1]
    assert max(abs(v) for v in rec.attrs["centre_offset_px"]) <= 0.5
    assert rec.attrs["provenance"]["source"] == "synthetic"
    assert rec.attrs["checkpoint_sha256"] == ds.attrs["checkpoint_sha256"]

    # the GeoTIFF: same grid, imagery + probability + class, described bands
    with rasterio.open(out / "geotiff" / "town.tif") as src:
        assert (src.width, src.height, src.count) == (256, 256, 13)
        assert src.crs.to_epsg() == gb.crs.epsg
        assert tuple(src.transform)[:6] == tuple(gb.affine)[:6]
        assert src.descriptions[0] == "B4" and src.descriptions[-2:] == ("urban_probability_percent", "urban_class")
        data = src.read()
    np.testing.assert_allclose(data[:11], rec.imagery.export, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(data[11], rec.probability.astype(np.float32))
    np.testing.assert_array_equal(data[12], rec.cls.astype(np.float32))

    # a rerun does nothing; an entry whose status never got written (a killed run) is redone
    stamp = os.path.getmtime(out / "patches.zarr" / "town" / "zarr.json")
    again = run_patches(job, executor="inline")
    assert [o.status for o in again.outcomes] == ["done_before", "done_before"]
    assert os.path.getmtime(out / "patches.zarr" / "town" / "zarr.json") == stamp
    meta = json.loads((out / "patches.zarr" / "near" / "zarr.json").read_text())
    meta["attributes"].pop("status")
    (out / "patches.zarr" / "near" / "zarr.json").write_text(json.dumps(meta))
    third = run_patches(job, executor="local", workers=2)
    assert {o.id: o.status for o in third.outcomes} == {"town": "done_before", "near": "complete"}
    assert ds.status("near") == "complete"


def test_points_without_imagery_are_reported_and_skipped_not_fatal(tmp_path, ckpt):
    # a GeoTIFF export that covers the town only; FAR lies outside it
    gb = point_geobox(*TOWN, size=400)
    exports = tmp_path / "exports"
    exports.mkdir()
    write_export(exports / f"town_{YEAR}.tif", world_export(gb, YEAR), crs=f"EPSG:{gb.crs.epsg}",
                 transform=gb.affine)
    pts = tmp_path / "pts.geojson"
    _points_file(pts, [("town", *TOWN), ("far", *FAR)])
    out = tmp_path / "patches"
    rc = cli.main(["patches", "--points", str(pts), "--year", str(YEAR), "--out", str(out), "--source", "geotiff",
                   "--source-option", f"path={exports}", "--checkpoint", ckpt, "--workers", "1", "--quiet"])
    assert rc == 0
    ds = PatchDataset(out)
    assert ds.status("town") == "complete" and ds.status("far") == "no_imagery"
    assert "no Sentinel-2 data" in ds.entry_attrs("far")["reason"]
    assert not (out / "geotiff" / "far.tif").exists()
    assert ds.complete_keys() == ["town"]
    # a rerun does not ask the source again for the point without imagery
    report = run_patches(PatchJob(tuple(read_points(pts)), YEAR, str(out), source="geotiff",
                                  source_options=(("path", str(exports)),), checkpoint=ckpt), executor="inline")
    assert [o.status for o in report.outcomes] == ["done_before", "done_before"]


def test_cli_makes_patches_with_a_thread_pool_and_reports(tmp_path, ckpt, capsys):
    pts = _points_file(tmp_path / "pts.geojson", [("a", *TOWN), ("b", *NEAR), ("c", 8.60, 47.36)])
    out = tmp_path / "p"
    rc = cli.main(["patches", "--points", pts, "--year", str(YEAR), "--out", str(out), "--checkpoint", ckpt,
                   "--workers", "2", "--no-geotiff"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "3 written" in err and "[3/3]" in err
    assert PatchDataset(out).complete_keys() == ["a", "b", "c"]
    assert not (out / "geotiff").exists()
    rc = cli.main(["patches", "--points", pts, "--year", str(YEAR), "--out", str(out), "--checkpoint", ckpt])
    assert rc == 0 and "3 done before" in capsys.readouterr().err


def test_a_dataset_keeps_its_settings(tmp_path, ckpt):
    pts = tuple(parse_points(points_geojson([("a", *TOWN)])))
    out = str(tmp_path / "p")
    run_patches(PatchJob(pts, YEAR, out, checkpoint=ckpt), executor="inline")
    with pytest.raises(InputError, match="year"):
        run_patches(PatchJob(pts, 2020, out, checkpoint=ckpt), executor="inline")
    moved = tuple(parse_points(points_geojson([("a", 8.6, 47.4)])))
    with pytest.raises(InputError, match="new id"):
        run_patches(PatchJob(moved, YEAR, out, checkpoint=ckpt), executor="inline")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="not a patches dataset"):
        run_patches(PatchJob(pts, YEAR, str(tmp_path / "other"), checkpoint=ckpt), executor="inline")


def test_a_13_channel_checkpoint_needs_the_products(tmp_path):
    ck13 = tmp_path / "c13.pth"
    random_checkpoint(ck13, ModelSpec(13, 16, 8))
    pts = tuple(parse_points(points_geojson([("a", *TOWN)])))
    with pytest.raises(CheckpointError, match="with_products"):
        run_patches(PatchJob(pts, YEAR, str(tmp_path / "p"), checkpoint=str(ck13)), executor="inline")
    report = run_patches(PatchJob(pts, YEAR, str(tmp_path / "p13"), checkpoint=str(ck13),
                                  source_options=(("with_products", True),), geotiff=False), executor="inline")
    assert report.written == 1
    assert PatchDataset(tmp_path / "p13").read("a").imagery.export.shape == (14, 256, 256)


def test_imagery_only_patches_for_the_users_own_labels(tmp_path):
    pts = tuple(parse_points(points_geojson([("a", *TOWN)])))
    out = tmp_path / "p"
    run_patches(PatchJob(pts, YEAR, str(out), labels=False), executor="inline")
    ds = PatchDataset(out)
    rec = ds.read("a")
    assert rec.cls is None and rec.probability is None and rec.label is None
    with rasterio.open(out / "geotiff" / "a.tif") as src:
        assert src.count == 11
    lab = np.zeros((256, 256), np.uint8)
    lab[:10] = 255
    ds.set_label("a", lab)
    np.testing.assert_array_equal(ds.read("a").label, lab)
    with pytest.raises(InputError, match="values"):
        ds.set_label("a", np.full((256, 256), 3, np.uint8))


@pytest.mark.slow
def test_patches_as_ray_tasks(tmp_path, ckpt):
    ray = pytest.importorskip("ray")
    pts = tuple(parse_points(points_geojson([("a", *TOWN), ("b", *NEAR)])))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        report = run_patches(PatchJob(pts, YEAR, str(tmp_path / "p"), checkpoint=ckpt, geotiff=False),
                             executor="ray")
    finally:
        ray.shutdown()
    assert report.written == 2
    assert PatchDataset(tmp_path / "p").complete_keys() == ["a", "b"]


def test_a_patches_dataset_on_a_local_folder_and_on_gcs(store_root, ckpt):
    pts = tuple(parse_points(points_geojson([("a", *TOWN)])))
    job = PatchJob(pts, YEAR, store_root, checkpoint=ckpt)
    assert run_patches(job, executor="inline").written == 1
    assert [o.status for o in run_patches(job, executor="inline").outcomes] == ["done_before"]
    ds = PatchDataset(store_root)
    rec = ds.read("a")
    assert rec.imagery.geobox == point_geobox(*TOWN) and rec.cls.shape == (256, 256)
    from gum_ray.store import fs

    assert fs.exists(ds.geotiff_path("a"))


def test_many_points_resume_from_their_status(tmp_path):
    rng = np.random.default_rng(0)
    pts = tuple(parse_points(points_geojson(
        [(f"p{i}", 8.5 + 0.2 * rng.random(), 47.3 + 0.2 * rng.random()) for i in range(40)])))
    out = str(tmp_path / "many")
    job = PatchJob(pts, YEAR, out, labels=False, geotiff=False)
    first = run_patches(job, executor="local", workers=2)
    assert first.written == 40 and [o.id for o in first.outcomes] == [p.id for p in pts]
    again = run_patches(job, executor="local", workers=2)
    assert again.done_before == 40 and again.written == 0
