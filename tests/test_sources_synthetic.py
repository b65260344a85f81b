"""The synthetic world: deterministic, exact to the wire encodings, consistent across grids."""

from __future__ import annotations

import math

import numpy as np
import pytest
import rasterio.warp
from odc.geo.geobox import GeoBox
from rasterio.crs import CRS as RioCRS
from rasterio.enums import Resampling

from gum_ray.bands import EXPORT_BANDS, EXPORT_BANDS_WITH_PRODUCTS
from gum_ray.errors import InputError
from gum_ray.sources import get_source, synthetic as S
from gum_ray.sources.base import MODALITY_SLICES, Imagery
from gum_ray.sources.earthengine import ENCODINGS, decode_numpy, encode_numpy

UTM_ZURICH = GeoBox.from_bbox((465000, 5246000, 470120, 5251120), "EPSG:32632", resolution=10)


def _eq(a: np.ndarray, b: np.ndarray) -> bool:
    return np.array_equal(a, b, equal_nan=True)


def test_source_returns_gum_layout_and_is_deterministic():
    src = get_source("synthetic")
    a = src.fetch(UTM_ZURICH, 2021)
    b = src.fetch(UTM_ZURICH, 2021)
    assert isinstance(a, Imagery)
    assert a.export.shape == (11, 512, 512) and a.export.dtype == np.float32
    assert a.band_names == EXPORT_BANDS
    assert _eq(a.export, b.export)
    assert all(m.all() for m in a.masks.values())  # the synthetic world has no gaps
    assert a.provenance["source"] == "synthetic" and a.provenance["year"] == 2021
    # value ranges of the band contract
    assert 0 < np.nanmin(a.modality("s2")) and np.nanmax(a.modality("s2")) < 0.7
    assert -30 <= np.nanmin(a.modality("s1")) and np.nanmax(a.modality("s1")) <= 5
    assert 0 <= a.band("slope").min() and a.band("slope").max() < 90
    assert 0 <= a.band("aspect").min() and a.band("aspect").max() < 360


def test_values_are_exact_at_the_compact_encoding():
    """Every modality survives the wire encoding (encode, decode) bit for bit."""
    sample, _ = S.render(UTM_ZURICH, 2022, with_products=True)
    for modality, codes in ENCODINGS["compact"].items():
        values = sample.export[MODALITY_SLICES[modality]]
        back = decode_numpy(encode_numpy(values, codes), codes)
        assert _eq(back, values), modality
    # and at the stated precisions
    x = sample.export
    assert _eq(np.rint(x[0:4] * np.float32(1e4)).astype(np.float32) / np.float32(1e4), x[0:4])
    assert _eq(np.rint(x[4:8] * np.float32(100)).astype(np.float32) / np.float32(100), x[4:8])
    assert _eq(np.rint(x[8]), x[8])
    assert set(np.unique(x[11:14])) <= {0.0, 1.0}


@pytest.mark.parametrize(
    "geobox",
    [
        UTM_ZURICH,
        GeoBox.from_bbox((179.97, 66.0, 180.03, 66.03), "EPSG:4326", resolution=1 / 12000),
        GeoBox.from_bbox((780000, 8090000, 784000, 8094000), "EPSG:32760", resolution=10),
    ],
    ids=["utm32", "latlon-antimeridian-66N", "utm60S"],
)
def test_a_tile_gets_the_whole_grids_pixels(geobox):
    full, full_classes = S.render(geobox, 2023, with_products=True)
    h, w = geobox.shape
    for r0, r1, c0, c1 in [(0, h // 2, 0, w // 3), (h // 3, h, w // 4, w), (17, h - 5, 3, w - 29)]:
        part, part_classes = S.render(geobox[r0:r1, c0:c1], 2023, with_products=True)
        assert _eq(part.export, full.export[:, r0:r1, c0:c1])
        assert _eq(part_classes, full_classes[r0:r1, c0:c1])


def test_same_place_looks_the_same_in_utm_and_latlon():
    utm = GeoBox.from_bbox((462000, 5244000, 472000, 5254000), "EPSG:32632", resolution=10)
    ll = utm.to_crs("EPSG:4326", resolution=1 / 12000)
    cls_utm = S.class_map(utm, 2021)
    cls_ll = S.class_map(ll, 2021)
    warped = np.full(ll.shape, 255, np.uint8)
    rasterio.warp.reproject(
        cls_utm, warped, src_transform=utm.affine, src_crs=RioCRS.from_epsg(32632),
        dst_transform=ll.affine, dst_crs=RioCRS.from_epsg(4326), dst_nodata=255,
        resampling=Resampling.nearest,
    )
    inside = warped != 255
    assert inside.mean() > 0.8
    agree = (warped == cls_ll)[inside].mean()
    assert agree > 0.99, agree  # only pixels on class edges differ (sampled 5-10 m apart)
    assert (cls_ll == S.CLASS_TOWN).any() and (cls_ll == S.CLASS_ROAD).any()
    # terrain: smooth, within a few metres wherever both grids sample
    el_utm = S.render(utm, 2021, modalities_wanted=["terrain"])[0].export[8]
    el_ll = S.render(ll, 2021, modalities_wanted=["terrain"])[0].export[8]
    w_el = np.full(ll.shape, np.nan, np.float32)
    rasterio.warp.reproject(
        el_utm, w_el, src_transform=utm.affine, src_crs=RioCRS.from_epsg(32632),
        dst_transform=ll.affine, dst_crs=RioCRS.from_epsg(4326), dst_nodata=np.nan,
        resampling=Resampling.bilinear,
    )
    assert np.nanmedian(np.abs(w_el - el_ll)) < 2.0


def test_town_shapes_are_the_same_on_the_ground_at_high_latitude():
    """A town at 65 N covers the same ground area in a 10 m UTM grid and a 1/12000-degree grid."""
    town = max(S.towns_near(15.0, 65.0, 25, 2020), key=lambda t: t.radius_m)
    r = (town.radius_m * 1.4 + 100) / S.M_PER_DEG
    bbox = (town.lon - r / math.cos(math.radians(town.lat)), town.lat - r,
            town.lon + r / math.cos(math.radians(town.lat)), town.lat + r)
    ll = GeoBox.from_bbox(bbox, "EPSG:4326", resolution=1 / 12000)
    utm = ll.to_crs("EPSG:32633", resolution=10)
    gt_ll = S.ground_truth(ll, 2020)
    gt_utm = S.ground_truth(utm, 2020)
    lat = ll.coordinates["latitude"].values[:, None]
    px_area = (S.M_PER_DEG / 12000) ** 2 * np.cos(np.radians(lat))
    area_ll = float((gt_ll * px_area).sum())
    area_utm = float(gt_utm.sum()) * 100.0
    assert area_utm > 0.8 * math.pi * town.radius_m**2 * 0.8
    assert abs(area_ll - area_utm) / area_utm < 0.03


def test_classes_are_clearly_separable():
    sample, cls = S.render(UTM_ZURICH, 2021)
    x = sample.export
    ndvi = (x[3] - x[0]) / (x[3] + x[0])
    urban = S.urban(cls)
    veg = cls == S.CLASS_VEGETATION
    water = (cls == S.CLASS_LAKE) | (cls == S.CLASS_OCEAN)
    assert urban.any() and veg.any()
    assert ndvi[urban].max() < 0.25 < 0.45 < ndvi[veg].min()  # low NDVI where built up
    assert x[4][urban].min() > -9.0 > -10.0 > x[4][veg].max()  # high VV backscatter
    assert x[0:3, urban].mean() > 2 * x[0:3, veg].mean()  # bright
    if water.any():
        assert x[3][water].max() < 0.03 and x[4][water].max() < -20


def test_demo_bbox_has_urban_and_non_urban_and_the_ocean_nothing():
    demo = GeoBox.from_bbox(S.DEMO_BBOX, "EPSG:4326", resolution=1 / 12000)
    gt = S.ground_truth(demo, 2021)
    assert 0.02 < gt.mean() < 0.5
    assert S.is_land(*S.DEMO_LONLAT)
    ocean = GeoBox.from_bbox(S.OCEAN_BBOX, "EPSG:4326", resolution=1 / 12000)
    assert (S.class_map(ocean, 2021) == S.CLASS_OCEAN).all()
    assert not S.ground_truth(ocean, 2021).any()
    assert not S.is_land(-40.0, 10.0) and S.is_ocean(-40.0, 10.0)
    assert S.is_land(-60.5, 0.0) and S.is_land(-19.5, 0.0)
    lon = np.array([-70.0, -40.0, -10.0, 8.5])
    assert S.is_land(lon, np.zeros(4)).tolist() == [True, False, True, True]


def test_towns_grow_from_year_to_year():
    gts = [S.ground_truth(UTM_ZURICH, y) for y in (2017, 2020, 2023, 2026)]
    for a, b in zip(gts, gts[1:]):
        assert not (a & ~b).any()  # urban stays urban
        assert b.sum() > a.sum()  # and the towns grow
    assert S.urban(S.render(UTM_ZURICH, 2026)[1]).sum() == gts[-1].sum()


def test_products_layout():
    src = get_source("synthetic", with_products=True)
    im = src.fetch(UTM_ZURICH, 2024)
    assert im.band_names == EXPORT_BANDS_WITH_PRODUCTS and im.export.shape[0] == 14
    wc = im.band("worldcover_built")
    assert set(np.unique(im.modality("products"))) <= {0.0, 1.0}
    gt2020 = S.ground_truth(UTM_ZURICH, 2020)
    assert _eq(wc.astype(bool), gt2020)
    assert im.masks["products"].all()


def test_bad_input_is_a_clear_error():
    src = get_source("synthetic")
    with pytest.raises(InputError, match="2017"):
        src.fetch(UTM_ZURICH, 2016)
    with pytest.raises(InputError, match="future"):
        src.fetch(UTM_ZURICH, 2999)
    empty = GeoBox((0, 10), UTM_ZURICH.affine, UTM_ZURICH.crs)
    with pytest.raises(InputError, match="empty"):
        src.fetch(empty, 2021)
    with pytest.raises(InputError, match="GeoBox"):
        src.fetch((0, 0, 1, 1), 2021)
    with pytest.raises(InputError, match="unknown imagery source"):
        get_source("landsat")


def test_a_3000_px_grid_renders_whole_and_matches_its_parts():
    # (its speed is a benchmark's business, not a test's: tools/bench_pipeline.py)
    gb = GeoBox.from_bbox((460000, 5250000, 490000, 5280000), "EPSG:32632", resolution=10)
    sample, _ = S.render(gb, 2021)
    assert sample.export.shape == (11, 3000, 3000)
    part, _ = S.render(gb[1000:1256, 2000:2256], 2021)
    np.testing.assert_array_equal(part.export, sample.export[:, 1000:1256, 2000:2256])
