"""One contract, one suite: every imagery source (synthetic, Earth Engine through its emulator, a
folder of GeoTIFF exports) is tested the same way (shape, dtype, NaN = missing, masks, bad year,
pickle round trip, options, describe() without secrets)."""

from __future__ import annotations

import dataclasses
import json
import pickle

import numpy as np
import pytest
import rasterio
from odc.geo.geobox import GeoBox
from rasterio.crs import CRS as RioCRS

from gum_ray.errors import InputError
from gum_ray.imagery import MODALITY_SLICES, Imagery, modalities
from gum_ray.sources import get_source, parse_options
from gum_ray.sources.base import ImagerySource, RequestLimit, SourceOptions
from gum_ray.sources.synthetic import OCEAN_BBOX, world_export

NORTH_SEA = (3.0, 55.0, 3.25, 55.25)

YEAR = 2021
# 128 x 96 px at 10 m in Zurich's UTM zone (a town, so every modality has values)
GRID = GeoBox.from_bbox((467190, 5246400, 468470, 5247360), "EPSG:32632", resolution=10)


@pytest.fixture(scope="module")
def emulator():
    from gum_ray.sources.ee_emulator import start_emulator

    emu = start_emulator(max_seconds=600)
    yield emu
    emu.stop()


def _geotiff_folder(path, with_products: bool) -> str:
    """The synthetic world written as one GUM export; its right quarter has no Sentinel-1 pass."""
    export = world_export(GRID, YEAR, with_products=with_products)
    export[MODALITY_SLICES["s1"], :, 96:] = np.nan  # a hole in one modality
    path.mkdir(parents=True, exist_ok=True)
    f = path / f"zurich_{YEAR}.tif"
    with rasterio.open(f, "w", driver="GTiff", width=GRID.shape.x, height=GRID.shape.y, count=export.shape[0],
                       dtype="float32", crs=RioCRS.from_wkt(GRID.crs.to_wkt()), transform=GRID.affine,
                       nodata=np.nan) as dst:
        dst.write(export)
    return str(path)


@pytest.fixture(params=["synthetic", "ee", "geotiff"])
def make_source(request, tmp_path):
    """``make_source(with_products=False, **extra)`` for each source kind."""
    kind = request.param

    def make(with_products: bool = False, **extra) -> ImagerySource:
        if kind == "synthetic":
            return get_source("synthetic", with_products=with_products, **extra)
        if kind == "ee":
            emu = request.getfixturevalue("emulator")
            return get_source("ee", url=emu.url, credentials="anonymous", project="gum-emulator",
                              with_products=with_products, backoff_s=0.002, backoff_max_s=0.05, **extra)
        return get_source("geotiff", path=_geotiff_folder(tmp_path / f"exports-{with_products}", with_products is True),
                          with_products=with_products, **extra)

    make.kind = kind
    return make


@pytest.mark.parametrize("with_products", [False, True])
def test_fetch_returns_imagery_on_exactly_the_grid(make_source, with_products):
    src = make_source(with_products)
    assert src.with_products is with_products
    img = src.fetch(GRID, YEAR)
    assert isinstance(img, Imagery)
    assert img.geobox == GRID
    assert img.export.dtype == np.float32
    assert img.export.shape == ((14 if with_products else 11),) + tuple(GRID.shape)
    assert img.band_names[0] == "B4" and len(img.band_names) == img.export.shape[0]
    assert set(img.masks) == set(modalities(with_products))
    json.dumps(img.provenance)  # provenance is JSON-able
    assert img.provenance["source"] == src.name


def test_nan_means_missing_and_the_masks_say_so(make_source):
    img = make_source().fetch(GRID, YEAR)
    for m in modalities(False):
        band_values = img.export[MODALITY_SLICES[m]]
        mask = img.masks[m]
        assert mask.dtype == bool and mask.shape == tuple(GRID.shape)
        np.testing.assert_array_equal(mask, np.isfinite(band_values).all(axis=0))
        assert np.isnan(band_values[:, ~mask]).all()
    assert img.masks["s2"].any()
    np.testing.assert_array_equal(img.valid, img.masks["s2"])
    if make_source.kind == "geotiff":  # the hole written into the file comes back as missing
        assert not img.masks["s1"][:, 96:].any() and img.masks["s1"][:, :96].all()


@pytest.mark.parametrize("year", [2016, 2999, "next year", 2021.5])
def test_a_bad_year_is_an_input_error(make_source, year):
    with pytest.raises(InputError, match="year") as info:
        make_source().fetch(GRID, year)
    assert isinstance(info.value, ValueError)  # library users can catch a builtin


def test_a_pickled_source_fetches_the_same_pixels(make_source):
    src = make_source()
    src.use_limiter(object())  # runtime state a job installs: not shipped with the source
    back = pickle.loads(pickle.dumps(src))
    assert back.limiter is None and back.options == src.options
    a, b = src.__class__(src.options).fetch(GRID, YEAR), back.fetch(GRID, YEAR)
    np.testing.assert_array_equal(a.export, b.export)


def test_options_are_a_frozen_typed_dataclass(make_source):
    src = make_source(True)
    assert isinstance(src.options, SourceOptions) and isinstance(src.options, type(src).Options)
    with pytest.raises(dataclasses.FrozenInstanceError):
        src.options.with_products = False
    # KEY=VALUE strings become the option's type; unknown options are refused
    opts = parse_options(type(src).Options, src.name, {**src.options.public(), "with_products": "no"})
    assert opts.with_products is False
    with pytest.raises(InputError, match="colour"):
        make_source(colour="blue")
    with pytest.raises(InputError, match="with_products"):
        make_source(with_products="perhaps")


def test_describe_names_the_source_and_holds_no_secret(make_source):
    src = make_source()
    d = src.describe()
    assert d["source"] == src.name and d["with_products"] is False
    json.dumps(d)
    for secret in type(src).Options.SECRETS:
        assert secret not in d and secret not in repr(src)
    if make_source.kind == "ee":  # a key file's path is a secret too
        keyed = get_source("ee", credentials="/keys/secret-service-account-1234.json", project="p")
        assert "secret-service-account" not in json.dumps(keyed.describe()) + repr(keyed)


def test_the_contract_answers_what_callers_used_to_branch_on_the_name_for(make_source):
    src = make_source()
    assert src.may_hold_data((8.55, 47.35, 8.6, 47.4)) is True  # Zurich
    assert src.may_hold_data(OCEAN_BBOX) is False  # mid-Atlantic: ocean in both worlds
    # the North Sea is land in the synthetic world (its ocean lies between 60 and 20 W) and sea on
    # Earth: each source answers from its own world, real ones from the land mask
    assert src.may_hold_data(NORTH_SEA) is (make_source.kind == "synthetic")
    assert src.default_checkpoint == ("demo" if make_source.kind == "synthetic" else None)
    limit = src.request_limit()
    if make_source.kind == "ee":
        assert isinstance(limit, RequestLimit) and limit.cap == src.options.max_in_flight
    else:
        assert limit is None
