"""COG export, quick-look previews and their commands, from a product on local disk and on gs://."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import rasterio

from gum_ray.cli import main
from gum_ray.grid import AOI, ProductGrid, pixel_index
from gum_ray.store import fs
from gum_ray.store.cog import export_cog
from gum_ray.store.product import NODATA, ProductSettings, ProductStore

GRID = ProductGrid(cell_deg=0.01, chunk_px=40)
SETTINGS = ProductSettings(grid=GRID, overview_levels=2)
# (lon, lat, value): marked pixels; the antimeridian pair and one far north
MARKS = [(13.41234, 52.51234, 91), (179.99512, -16.80123, 92), (-179.99512, -16.80123, 93), (25.12345, 70.45678, 94)]


@pytest.fixture(scope="module", params=["local", "gcs"])
def product(request, tmp_path_factory):
    """A product with a few cells: a gradient around Berlin (3 x 3 cells) and single marked pixels."""
    if request.param == "local":
        root = str(tmp_path_factory.mktemp("export") / "product.zarr")
    else:
        request.getfixturevalue("gcs_emulator")
        root = f"gs://gum-test/export-{uuid.uuid4().hex[:8]}/product.zarr"
    p = ProductStore.create(root, settings=SETTINGS, years=[2020, 2021])
    base = GRID.cell_at(13.41234, 52.51234)
    for i in range(-1, 2):
        for j in range(-1, 2):
            c = GRID.cell(base.row + i, base.col + j)
            a = np.add.outer(np.arange(120), np.arange(120)) * 40 // 238  # 0..40
            a = a.astype(np.uint8) + 30 * (i + 1)
            a[:4, :4] = NODATA
            p.write_cell(2020, c, a)
    for lon, lat, v in MARKS:
        c = GRID.cell_at(lon, lat)
        a = np.full(c.shape, 20, np.uint8) if c != base else p.read_cell(2020, c)
        iy, ix = pixel_index(lon, lat)
        a[iy - c.y_slice.start, ix - c.x_slice.start] = v
        p.write_cell(2020, c, a)
    p.build_overviews([GRID.cell(base.row + i, base.col + j) for i in range(-1, 2) for j in range(-1, 2)])
    return root


def check_cog(path: str) -> None:
    from rio_cogeo.cogeo import cog_validate

    ok, errors, warnings = cog_validate(path, strict=True, quiet=True)
    assert ok, (errors, warnings)
    with rasterio.open(path) as src:
        assert src.nodata == NODATA and src.dtypes == ("uint8",)
        assert src.block_shapes == [(512, 512)]
        assert src.compression.name.lower() == "zstd"
        assert src.crs.to_epsg() == 4326
        if max(src.width, src.height) > 512:
            assert src.overviews(1), "internal overviews"


def value_at(path: str, lon: float, lat: float) -> int:
    with rasterio.open(path) as src:
        return int(next(src.sample([(lon, lat)]))[0])


def test_export_cog_is_valid_and_georeferenced(product, tmp_path):
    out = tmp_path / "berlin.tif"
    res = export_cog(product, out, year=2020, aoi=AOI.from_bbox(13.39, 52.49, 13.43, 52.53))
    assert (res.width, res.height) == (480, 480)
    check_cog(str(out))
    lon, lat, v = MARKS[0]
    assert value_at(str(out), lon, lat) == v
    assert value_at(str(out), lon + 1 / 12000, lat) != v
    with rasterio.open(out) as src:
        assert src.bounds.left == pytest.approx(13.39, abs=1e-12) and src.bounds.top == pytest.approx(52.53, abs=1e-12)
        assert src.tags()["gum_year"] == "2020"
        band = src.read(1)
        # the 3 x 3 cells cover 13.40..13.43 x 52.50..52.53; the rest of the bbox is no data
        assert (band[:, :120] == NODATA).all() and (band[-120:, :] == NODATA).all()
        assert (band[:360, 120:] != NODATA).mean() > 0.99


def test_big_export_has_overviews(product, tmp_path):
    out = tmp_path / "big.tif"
    export_cog(product, out, year=2020, aoi=AOI.from_bbox(13.3, 52.4, 13.5, 52.6))
    check_cog(str(out))
    with rasterio.open(out) as src:
        assert (src.width, src.height) == (2400, 2400) and len(src.overviews(1)) >= 2


def test_export_across_the_antimeridian_and_to_gcs(product, tmp_path, gcs_emulator):
    aoi = AOI.from_bbox(179.99, -16.81, -179.99, -16.80, crosses_antimeridian=True)
    out = tmp_path / "fiji.tif"
    res = export_cog(product, out, year=2020, aoi=aoi)
    assert (res.width, res.height) == (240, 120)
    check_cog(str(out))
    with rasterio.open(out) as src:
        assert src.bounds.left == pytest.approx(179.99) and src.bounds.right == pytest.approx(180.01)
    assert value_at(str(out), 179.99512, -16.80123) == 92
    assert value_at(str(out), -179.99512 + 360, -16.80123) == 93  # east of 180 in this raster
    # the same export written to gs://
    remote = f"gs://gum-test/exports-{uuid.uuid4().hex[:6]}/fiji.tif"
    export_cog(product, remote, year=2020, aoi=aoi)
    local = tmp_path / "back.tif"
    local.write_bytes(fs.read_bytes(remote))
    check_cog(str(local))
    assert local.read_bytes() == out.read_bytes() or value_at(str(local), 179.99512, -16.80123) == 92


def test_export_north_of_60_and_geojson_mask(product, tmp_path):
    lon, lat, v = MARKS[3]
    out = tmp_path / "north.tif"
    export_cog(product, out, year=2020, aoi=AOI.from_bbox(lon - 0.01, lat - 0.01, lon + 0.01, lat + 0.01))
    check_cog(str(out))
    assert value_at(str(out), lon, lat) == v
    tri = {"type": "Polygon", "coordinates": [[[13.40, 52.50], [13.43, 52.50], [13.40, 52.53], [13.40, 52.50]]]}
    out2 = tmp_path / "tri.tif"
    export_cog(product, out2, year=2020, aoi=AOI.from_geojson(tri))
    check_cog(str(out2))
    with rasterio.open(out2) as src:
        band = src.read(1)
    assert band[-5, 5] != NODATA and band[5, -5] == NODATA  # south-west corner in, north-east out


def test_export_cli_and_rio_cogeo_validate_strict(product, tmp_path, capsys):
    out = tmp_path / "cli.tif"
    rc = main(["export", "--product", product, "--bbox", "13.39", "52.49", "13.43", "52.53", "--year", "2020", str(out)])
    assert rc == 0 and "480 x 480" in capsys.readouterr().out
    rio = [str(Path(sys.executable).parent / "rio"), "cogeo", "validate", "--strict", str(out)]
    proc = subprocess.run(rio, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "is a valid cloud optimized GeoTIFF" in proc.stdout, proc.stdout + proc.stderr
    # clear errors
    cases = [
        (["--bbox", "13.43", "52.49", "13.39", "52.53", "--year", "2020"], "--antimeridian"),
        (["--bbox", "13.39", "52.49", "13.43", "95", "--year", "2020"], "beyond +-90"),
        (["--bbox", "13.39", "52.49", "13.43", "52.53", "--year", "2019"], "years there: 2020, 2021"),
    ]
    for args, msg in cases:
        assert main(["export", "--product", product, *args, str(tmp_path / "x.tif")]) == 2
        assert msg in capsys.readouterr().err
    assert main(["export", "--product", str(tmp_path), "--bbox", "0", "0", "1", "1", "--year", "2020", str(tmp_path / "y.tif")]) == 2
    assert "not a gum product" in capsys.readouterr().err
    assert not (tmp_path / "x.tif").exists() and not list(tmp_path.glob(".gum-export-*"))


def test_preview_png(product, tmp_path, capsys):
    from gum_ray.store.preview import render_preview

    out = tmp_path / "berlin.png"
    res = render_preview(product, out, year=2020, aoi=AOI.from_bbox(13.39, 52.49, 13.43, 52.53))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert res.level == 0 and res.shape == (480, 480) and res.urban_km2 > 0
    small = render_preview(product, tmp_path / "small.png", year=2020, aoi=AOI.from_bbox(13.3, 52.4, 13.5, 52.6), max_px=300)
    assert small.level == 2 and small.factor == 2 and small.shape == (300, 300)
    # no overviews for the antimeridian cells: level 0 averaged instead
    across = render_preview(
        product, tmp_path / "fiji.png", year=2020, max_px=100,
        aoi=AOI.from_bbox(179.9, -16.9, -179.9, -16.7, crosses_antimeridian=True),
    )
    assert across.level == 0 and across.factor == 32
    rc = main(["preview", "--product", product, "--bbox", "13.39", "52.49", "13.43", "52.53", "--year", "2020", str(tmp_path / "cli.png")])
    assert rc == 0 and (tmp_path / "cli.png").stat().st_size > 10_000
    assert main(["preview", "--product", product, "--bbox", "13.39", "52.49", "13.43", "52.53", "--year", "1999", str(tmp_path / "z.png")]) == 2
    assert "1999" in capsys.readouterr().err
    json.dumps(res.__dict__)
