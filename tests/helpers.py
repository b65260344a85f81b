"""Shared test helpers: paths to the team's real sample imagery and small synthetic GeoTIFFs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

REPO = Path(__file__).resolve().parents[1]
REALDATA = REPO.parent / "shared" / "realdata"
ABERYSTWYTH = REALDATA / "aberystwyth_2021-05-27_gum11.tif"


def require_realdata(path: Path = ABERYSTWYTH) -> Path:
    if not path.exists():
        pytest.skip(f"real sample imagery not found at {path} (the team's ../shared/realdata is absent)")
    return path


def bigearthnet_files() -> list[Path]:
    require_realdata(REALDATA)
    files = sorted(REALDATA.glob("bigearthnet_*_gum11.tif"))
    if not files:
        pytest.skip(f"no BigEarthNet patches in {REALDATA}")
    return files


def write_export(path: Path, data: np.ndarray, *, crs="EPSG:32633", transform=None, **profile) -> Path:
    """Write a (bands, H, W) array as a GeoTIFF in the GUM export layout."""
    transform = transform if transform is not None else from_origin(400000, 5300000, 10, 10)
    prof = dict(driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0],
                dtype=data.dtype, crs=crs, transform=transform)
    prof.update(profile)
    with rasterio.open(path, "w", **prof) as dst:
        dst.write(data)
    return path


def random_export(h: int, w: int, bands: int = 11, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = np.empty((bands, h, w), np.float32)
    x[0:4] = rng.uniform(0, 0.5, (4, h, w))
    x[4:8] = rng.uniform(-25, 0, (4, h, w))
    x[8] = rng.uniform(0, 500, (h, w))
    x[9] = rng.uniform(0, 40, (h, w))
    x[10] = rng.uniform(0, 360, (h, w))
    if bands == 14:
        x[11:14] = rng.integers(0, 2, (3, h, w))
    return x


def gum(*args) -> int:
    """Run the ``gum`` CLI in this process (arguments as strings); its exit code."""
    from gum_ray.cli import main

    return main([str(a) for a in args])


def one_error_line(capsys) -> str:
    """The one ``gum: error:`` line a bad input must give on stderr (asserted), for its text."""
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("gum: error: "), err
    return err[0]


def product_chunks(product) -> dict[str, bytes]:
    """Every chunk of the product (level 0 and the overview levels), by path."""
    out = {}
    for root, _, files in os.walk(product):
        if "/c/" not in root + "/" or "_manifest" in root:
            continue
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, product)] = open(p, "rb").read()
    assert any(k.startswith("overviews") for k in out) and any(k.startswith("probability") for k in out)
    return out
