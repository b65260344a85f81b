"""GeoTIFF inputs that lie or mislead: a 1,000,000 px wide sparse header (bounded memory), all-NaN
scenes (no crops run), Sentinel-2 in digital numbers and Sentinel-1 in linear power (a warning)."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from rasterio.windows import Window

from gum_ray.inference import InferenceEngine
from gum_ray.model import ModelSpec, load_checkpoint, random_checkpoint
from gum_ray.predict import predict_file, strip_windows
from tests.helpers import random_export, write_export
from tests.hostile import error_lines, gum_cli

TINY = ModelSpec(10, 8, 4)
GiB = 1024**3


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    random_checkpoint(path, TINY, seed=11)
    return path


def sparse_wide_export(path, width=1_000_000, height=256, valid_at=(500_000, 0), nodata=True):
    """A tiled GeoTIFF whose header claims ``width`` x ``height`` px but holds one written block:
    the file is a few hundred kB; the rest is sparse (never written)."""
    prof = dict(driver="GTiff", width=width, height=height, count=11, dtype="float32", crs="EPSG:32633",
                transform=rasterio.transform.from_origin(400000, 5300000, 10, 10), tiled=True,
                blockxsize=256, blockysize=256, compress="deflate", SPARSE_OK="TRUE", BIGTIFF="YES")
    if nodata:
        prof["nodata"] = float("nan")
    with rasterio.open(path, "w", **prof) as dst:
        x0, y0 = valid_at
        dst.write(random_export(256, 256, seed=3), window=Window(x0, y0, 256, 256))
    return path


def test_million_px_wide_sparse_header_stays_under_2_gib(tmp_path, ckpt):
    src = sparse_wide_export(tmp_path / "wide.tif")
    assert src.stat().st_size < 4_000_000  # 2.7 MB: one written block and the tile index
    out = tmp_path / "wide_gum.tif"
    r = gum_cli("predict", src, out, "--checkpoint", ckpt, "--quiet", measure=True, timeout=900)
    assert r.returncode == 0, r.stderr
    peak = int(r.stderr.split("MAXRSS_KIB=")[1].split()[0]) * 1024
    print(f"gum predict, 1,000,000 x 256 px sparse header: peak RSS {peak / GiB:.2f} GiB")
    assert peak < 2 * GiB
    assert "Traceback" not in r.stderr
    with rasterio.open(out) as o:
        assert (o.width, o.height) == (1_000_000, 256)
        block = o.read(1, window=Window(500_000, 0, 256, 256))
        assert block.max() <= 100  # predicted where the data are
        assert (o.read(1, window=Window(0, 0, 4096, 256)) == 255).all()  # no data elsewhere
        assert (o.read(2, window=Window(999_000, 0, 1000, 256)) == 255).all()


def test_sparse_blocks_without_nodata_are_no_data(tmp_path, ckpt):
    # no nodata tag: GDAL reads never-written blocks as zeros; they are still no data, and not run
    src = sparse_wide_export(tmp_path / "wide0.tif", width=20_000, valid_at=(10_240, 0), nodata=False)
    loaded = load_checkpoint(ckpt)
    engine = InferenceEngine(loaded.model)
    predict_file(engine, src, tmp_path / "o.tif")
    assert 0 < engine.crops_run <= 9
    with rasterio.open(tmp_path / "o.tif") as o:
        assert (o.read(1, window=Window(0, 0, 10_000, 256)) == 255).all()
        assert o.read(1, window=Window(10_240, 0, 256, 256)).max() <= 100


def test_all_nan_scene_runs_no_crops_and_says_so(tmp_path, ckpt):
    data = np.full((11, 300, 400), np.nan, np.float32)
    src = write_export(tmp_path / "ocean.tif", data)
    loaded = load_checkpoint(ckpt)
    engine = InferenceEngine(loaded.model)
    predict_file(engine, src, tmp_path / "lib.tif")
    assert engine.crops_run == 0
    out = tmp_path / "ocean_gum.tif"
    r = gum_cli("predict", src, out, "--checkpoint", ckpt, "--quiet")
    assert r.returncode == 0, r.stderr
    lines = error_lines(r.stderr)
    assert [ln for ln in lines if "no pixel has the data the model needs" in ln and "0 crops were run" in ln], lines
    with rasterio.open(out) as o:
        assert (o.read() == 255).all()


@pytest.mark.parametrize("case", ["s2_digital_numbers", "s1_linear_power"])
def test_wrong_units_warn_one_line(tmp_path, ckpt, case):
    x = random_export(64, 64, seed=4)
    if case == "s2_digital_numbers":
        x[0:4] = np.round(x[0:4] * 10000)  # 0-5000: left in DN
        expected = "Sentinel-2 values look like digital numbers"
    else:
        x[4:8] = 10 ** (x[4:8] / 10)  # dB -> linear power
        expected = "Sentinel-1 values look like linear power"
    src = write_export(tmp_path / f"{case}.tif", x)
    r = gum_cli("predict", src, tmp_path / "o.tif", "--checkpoint", ckpt, "--quiet")
    assert r.returncode == 0, r.stderr
    warn = [ln for ln in error_lines(r.stderr) if expected in ln]
    assert len(warn) == 1 and warn[0].startswith("WARNING") and str(src) in warn[0], r.stderr


def test_correct_units_give_no_warning(tmp_path, ckpt):
    src = write_export(tmp_path / "good.tif", random_export(64, 64, seed=4))
    r = gum_cli("predict", src, tmp_path / "o.tif", "--checkpoint", ckpt, "--quiet")
    assert r.returncode == 0 and "WARNING" not in r.stderr, r.stderr


def test_column_strips_give_the_whole_width_result(tmp_path, ckpt):
    x = random_export(300, 1400, seed=8)
    x[:4, :, 300:700] = np.nan  # a no-data band across the strips: its crops are skipped
    src = write_export(tmp_path / "s.tif", x)
    loaded = load_checkpoint(ckpt)
    whole, strips = InferenceEngine(loaded.model), InferenceEngine(loaded.model)
    predict_file(whole, src, tmp_path / "whole.tif", strip_px=2048)
    assert len(strip_windows(1400, 512)) == 3
    predict_file(strips, src, tmp_path / "strips.tif", strip_px=512)
    with rasterio.open(tmp_path / "whole.tif") as a, rasterio.open(tmp_path / "strips.tif") as b:
        np.testing.assert_array_equal(a.read(), b.read())
        assert (a.read(1)[:, 300:700] == 255).all() and (a.read(1)[:, :300] <= 100).all()
    assert strips.crops_run > whole.crops_run  # the halos are recomputed, nothing else differs


def test_skipping_no_data_crops_changes_no_valid_pixel(ckpt):
    from gum_ray import bands

    x = random_export(256, 1024, seed=9)
    x[:4, :, 600:] = np.nan
    valid, pre = bands.validity_mask(x), bands.preprocess(x)
    engine = InferenceEngine(load_checkpoint(ckpt).model)

    def run(**kw):
        parts = list(engine.predict_rows(lambda a, b: pre[:, a:b], 256, 1024, **kw))
        return np.concatenate([p for _, p, _ in parts], axis=0)

    every = run()
    n_all = engine.crops_run
    skipped = run(keep_crop=lambda y, x0: bool(valid[y : y + 256, x0 : x0 + 256].any()))
    assert engine.crops_run - n_all < n_all  # the all-no-data crop at x = 768 was not run
    np.testing.assert_array_equal(every[valid], skipped[valid])
    assert np.isnan(skipped[:, 832:]).all()  # pixels no run crop covers: no data


def test_rows_without_data_above_valid_rows_are_no_data_in_both_bands(tmp_path, ckpt):
    x = random_export(600, 300, seed=12)
    x[:4, :250] = np.nan  # the first rows have no Sentinel-2: both output bands must say 255 there
    src = write_export(tmp_path / "top.tif", x)
    loaded = load_checkpoint(ckpt)
    predict_file(InferenceEngine(loaded.model), src, tmp_path / "o.tif")
    with rasterio.open(tmp_path / "o.tif") as o:
        prob, cls, _quality = o.read()
    assert (prob[:250] == 255).all() and (cls[:250] == 255).all()
    assert (prob[250:] <= 100).all() and set(np.unique(cls[250:])) <= {0, 1}


def test_geotiff_source_refuses_a_header_that_would_make_a_read_unbounded(tmp_path):
    from odc.geo.geobox import GeoBox

    from gum_ray.errors import InputError
    from gum_ray.sources.geotiff import GeoTiffSource

    # 0.25 m pixels: covering one 256 px cell at 10 m would read 10,240 x 10,240 px of 11 bands
    prof = dict(driver="GTiff", width=12_000, height=12_000, count=11, dtype="float32", crs="EPSG:32633",
                transform=rasterio.transform.from_origin(400000, 5300000, 0.25, 0.25), tiled=True,
                SPARSE_OK="TRUE", nodata=float("nan"))
    with rasterio.open(tmp_path / "fine_2021.tif", "w", **prof):
        pass
    gbox = GeoBox.from_bbox((400000, 5300000 - 2560, 402560, 5300000), "EPSG:32633", resolution=10)
    with pytest.raises(InputError, match="much finer than the 10 m grid") as err:
        GeoTiffSource(tmp_path).fetch(gbox, 2021)
    assert "\n" not in str(err.value)
