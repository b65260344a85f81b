"""The GeoTIFF source: existing GUM exports read onto any grid."""

from __future__ import annotations

import os

import numpy as np
import pytest
import rasterio
from odc.geo.geobox import GeoBox

from gum_ray.bands import EXPORT_BANDS, EXPORT_BANDS_WITH_PRODUCTS
from gum_ray.errors import InputError
from gum_ray.sources import get_source
from gum_ray.sources import synthetic as S
from gum_ray.sources.geotiff import GeoTiffSource, year_of

REALDATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "realdata")
ABERYSTWYTH = os.path.join(REALDATA, "aberystwyth_2021-05-27_gum11.tif")
BIGEARTHNET_AT = os.path.join(REALDATA, "bigearthnet_S2A_MSIL2A_20170613T101031_87_48_gum11.tif")

# a town with roads: 2.56 km in UTM 32N around the synthetic world's demo town
GRID = GeoBox.from_bbox((467190, 5246400, 469750, 5248960), "EPSG:32632", resolution=10)


def write_export(path, geobox: GeoBox, export: np.ndarray, **tags) -> str:
    """A GUM export GeoTIFF like the authors' scripts write (float32, one band per GUM band)."""
    names = EXPORT_BANDS_WITH_PRODUCTS if export.shape[0] == 14 else EXPORT_BANDS
    with rasterio.open(
        path, "w", driver="GTiff", width=geobox.shape[1], height=geobox.shape[0], count=export.shape[0],
        dtype="float32", crs=f"EPSG:{geobox.crs.epsg}", transform=geobox.affine, tiled=True,
    ) as ds:
        ds.write(export.astype(np.float32))
        ds.descriptions = names
        if tags:
            ds.update_tags(**tags)
    return str(path)


def _eq(a, b):
    return np.array_equal(a, b, equal_nan=True)


def test_same_grid_and_aligned_windows_are_exact(tmp_path):
    world = S.world_export(GRID, 2021)
    write_export(tmp_path / "zurich_2021_gum11.tif", GRID, world)
    src = get_source("geotiff", path=tmp_path)
    got = src.fetch(GRID, 2021)
    assert _eq(got.export, world)
    assert got.provenance["files"] == [{"file": "zurich_2021_gum11.tif", "year": 2021, "bands": 11}]
    # a window that sticks out of the file: exact inside, NaN outside, masks say so
    win = GeoBox((100, 120), GRID.affine * GRID.affine.translation(200, -30), GRID.crs)
    part = src.fetch(win, 2021)
    assert _eq(part.export[:, 30:, :56], world[:, :70, 200:256])
    assert np.isnan(part.export[:, :30]).all() and np.isnan(part.export[:, :, 56:]).all()
    assert part.masks["s2"][30:, :56].all() and not part.masks["s2"][:30].any()


def test_reprojected_onto_a_latlon_grid(tmp_path):
    world = S.world_export(GRID, 2021)
    write_export(tmp_path / "zurich_2021.tif", GRID, world)
    ll = GRID.to_crs("EPSG:4326", resolution=1 / 12000)
    got = GeoTiffSource(tmp_path).fetch(ll, 2021)
    valid = got.masks["s2"]
    assert 0.85 < valid.mean() < 1.0  # the UTM square is a tilted square in lat/lon: corners are NaN
    direct = S.world_export(ll, 2021)
    # the synthetic world sampled directly on the lat/lon grid: same classes (away from edges)
    cls = S.class_map(ll, 2021)
    inner = valid & (cls == S.CLASS_VEGETATION)
    assert np.nanmedian(np.abs(got.export[3] - direct[3])[inner]) < 0.01  # B8
    assert np.nanmedian(np.abs(got.export[8] - direct[8])[valid]) < 2.0  # elevation, m
    urban_sig = (got.export[4] > -8.5) & valid  # the urban backscatter signature
    truth = S.ground_truth(ll, 2021)
    iou = (urban_sig & truth).sum() / (urban_sig | truth)[valid].sum()
    assert iou > 0.85


def test_products_use_nearest_and_eleven_band_files_leave_them_nan(tmp_path):
    world = S.world_export(GRID, 2021, with_products=True)
    write_export(tmp_path / "a_2021.tif", GRID[:, :128], world[:, :, :128])
    write_export(tmp_path / "b_2021.tif", GRID[:, 128:], world[:11, :, 128:])
    ll = GRID.to_crs("EPSG:4326", resolution=1 / 12000)
    got = GeoTiffSource(tmp_path, with_products=True).fetch(ll, 2021)
    assert got.export.shape[0] == 14
    prod = got.modality("products")
    assert set(np.unique(prod[np.isfinite(prod)])) <= {0.0, 1.0}  # nearest: no blends
    assert got.masks["products"].any() and not got.masks["products"].all()
    # the two files mosaic: S2 is valid over both halves
    assert len(got.provenance["files"]) == 2
    same = GeoTiffSource(tmp_path, with_products=True).fetch(GRID, 2021)
    assert _eq(same.export[:, :, :128], world[:, :, :128])
    assert _eq(same.export[:11, :, 128:], world[:11, :, 128:]) and np.isnan(same.export[11:, :, 128:]).all()


def test_years_and_black_borders(tmp_path):
    world = S.world_export(GRID[:64, :64], 2019)
    world[:, :5] = 0.0  # the zero border Earth Engine exports come back with
    write_export(tmp_path / "tile.tif", GRID[:64, :64], world, date="2019-07-01")
    src = GeoTiffSource(tmp_path)
    got = src.fetch(GRID[:64, :64], 2019)
    assert np.isnan(got.export[:, :5]).all() and not got.masks["s2"][:5].any()
    assert _eq(got.export[:, 5:], world[:, 5:])
    with pytest.raises(InputError, match="no export for 2022.*2019"):
        src.fetch(GRID[:64, :64], 2022)
    assert GeoTiffSource(tmp_path, year_policy="any").fetch(GRID[:64, :64], 2022).masks["s2"].any()
    assert year_of("x_20170613T101031_87_48.tif", {}) == 2017
    assert year_of("aberystwyth_2021-05-27_gum11.tif", {}) == 2021
    assert year_of("patch_7.tif", {"DATE": "2020-01-05"}) == 2020
    assert year_of("patch_123456.tif", {}) is None


def test_bad_input(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        GeoTiffSource(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no GUM export"):
        GeoTiffSource(tmp_path / "empty").fetch(GRID[:8, :8], 2021)
    with rasterio.open(tmp_path / "labels.tif", "w", driver="GTiff", width=8, height=8, count=1, dtype="uint8",
                       crs="EPSG:32632", transform=GRID.affine) as ds:
        ds.write(np.zeros((1, 8, 8), np.uint8))
    with pytest.raises(InputError, match="has 1 bands; a GUM export has 11"):
        GeoTiffSource(tmp_path / "labels.tif").fetch(GRID[:8, :8], 2021)
    with pytest.raises(InputError, match="no GUM export.*1 other rasters skipped"):
        GeoTiffSource(tmp_path).fetch(GRID[:8, :8], 2021)
    with pytest.raises(InputError, match="2017"):
        GeoTiffSource(tmp_path).fetch(GRID[:8, :8], 2010)


@pytest.mark.skipif(not os.path.exists(ABERYSTWYTH), reason="../shared/realdata is absent (real sample exports)")
def test_real_export_in_british_national_grid():
    src = GeoTiffSource(REALDATA)  # the folder also holds a 1-band label raster: skipped
    with rasterio.open(ABERYSTWYTH) as ds:
        gb = GeoBox.from_rio(ds)
        ref = ds.read().astype(np.float32)
    same = src.fetch(gb, 2021)
    assert _eq(same.export, ref)
    assert not same.masks["s1"].any() and same.masks["terrain"].all()
    assert not same.masks["s2"][:, 0].any()  # column 0 has no S2
    utm = gb.to_crs("EPSG:32630", resolution=10)
    got = src.fetch(utm, 2021)
    v = got.masks["s2"]
    assert v.mean() > 0.9
    for b in (0, 3, 8, 9):  # reflectance, elevation, slope: the same distribution after warping
        # (bilinear smooths slopes a little: 3.13 vs 3.20 degrees median)
        assert abs(np.nanmedian(got.export[b][v]) - np.nanmedian(ref[b])) < 0.05 * max(1, abs(np.nanmedian(ref[b])))
    assert np.isnan(got.modality("s1")).all()


@pytest.mark.skipif(not os.path.exists(BIGEARTHNET_AT), reason="../shared/realdata is absent (real sample exports)")
def test_real_bigearthnet_patch_with_one_s1_pass():
    with rasterio.open(BIGEARTHNET_AT) as ds:
        gb = GeoBox.from_rio(ds)
        ref = ds.read().astype(np.float32)
    ll = gb.to_crs("EPSG:4326", resolution=1 / 12000)
    got = GeoTiffSource(REALDATA).fetch(ll, 2017)
    asc_ok = np.isfinite(got.band("VV_ascending")).any()
    desc_ok = np.isfinite(got.band("VV_descending")).any()
    assert asc_ok != desc_ok  # one pass only, the other NaN, as in the file
    assert not got.masks["s1"].any()  # the strict modality mask wants all four S1 bands
    assert np.isnan(ref[4:8]).all(axis=(1, 2)).sum() == 2
