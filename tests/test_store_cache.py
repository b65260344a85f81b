"""The imagery cache: compact encodings per (year, cell) with GeoBox and provenance, local and gs://."""

from __future__ import annotations

import numpy as np
import pytest

from gum_ray.bands import decode_compact, encode_compact
from gum_ray.errors import InputError
from gum_ray.grid import ProductGrid
from gum_ray.imagery import Imagery
from gum_ray.store import fs
from gum_ray.store.cache import ImageryCache

GRID = ProductGrid(cell_deg=0.01, chunk_px=40)


def fake_export(shape: tuple[int, int], bands: int = 11, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = np.empty((bands,) + shape, np.float32)
    x[0:4] = rng.uniform(0, 0.6, (4,) + shape)
    x[4:8] = rng.uniform(-30, 2, (4,) + shape)
    x[8] = rng.uniform(-10, 3000, shape)
    x[9] = rng.uniform(0, 60, shape)
    x[10] = rng.uniform(0, 360, shape)
    if bands == 14:
        x[11:14] = rng.integers(0, 2, (3,) + shape)
    x[0:4, :5, :7] = np.nan  # no Sentinel-2 here
    x[6:8, -3:] = np.nan  # no descending pass here
    return x


@pytest.mark.parametrize("bands", [11, 14])
def test_put_get_round_trip(store_root, bands):
    cache = ImageryCache(store_root)
    cell = GRID.cell_at(25.12, 70.45)  # above 60 N
    gbox = cell.utm_geobox(halo_px=16)
    export = fake_export((gbox.shape.y, gbox.shape.x), bands)
    assert not cache.has(2020, cell)
    prov = {"source": "synthetic", "dates": ["2020-01-01", "2021-01-01"], "requests": 4}
    cache.put(2020, cell, Imagery.from_export(export, gbox, prov))
    assert cache.has(2020, cell) and not cache.has(2021, cell)
    assert cache.cells(2020) == [cell.id]
    got = cache.get(2020, cell)
    assert got.geobox == gbox
    assert got.provenance == prov
    assert got.with_products == (bands == 14)
    attrs = cache.attrs(2020, cell)
    assert attrs["band_names"][0] == "B4" and len(attrs["band_names"]) == bands
    assert tuple(attrs["band_names"]) == got.band_names
    # the compact parts are stored exactly, in their compact dtypes, and come back the same
    want = encode_compact(export)
    parts = got.to_compact()
    assert set(parts) == set(want)
    for k, v in want.items():
        assert parts[k].dtype == v.dtype and np.array_equal(parts[k], v), k
    np.testing.assert_array_equal(got.export, decode_compact(want))
    assert np.isnan(got.export[0, 0, 0]) and np.isnan(got.export[7, -1, 0])
    np.testing.assert_allclose(got.export[0, 10, 10], export[0, 10, 10], atol=1e-4)
    # few objects: one shard per array plus metadata
    n_objects = len(fs.find(cache.path(2020, cell)))
    assert n_objects <= 2 * len(want) + 1
    # overwriting and deleting
    cache.put(2020, cell, Imagery.from_export(fake_export((gbox.shape.y, gbox.shape.x), bands, seed=1), gbox, prov))
    assert not np.array_equal(cache.get(2020, cell).to_compact()["s2"], want["s2"])
    cache.delete(2020, cell)
    assert not cache.has(2020, cell)
    with pytest.raises(InputError, match="not in the cache"):
        cache.get(2020, cell)


def test_incomplete_entry_is_not_used(store_root):
    import zarr

    cache = ImageryCache(store_root)
    cell = GRID.cell_at(13.41, 52.51)
    g = zarr.open_group(fs.zarr_store(cache.path(2020, cell)), mode="w")  # a crash before "complete"
    g.create_array("s2", shape=(4, 8, 8), dtype="uint16")
    assert not cache.has(2020, cell)
    gbox = cell.utm_geobox()
    cache.put(2020, cell, Imagery.from_export(fake_export((gbox.shape.y, gbox.shape.x)), gbox))
    assert cache.has(2020, cell)


def test_deletion_cut_short_is_fetched_again_never_read(store_root, monkeypatch):
    """A node lost while a committed cell's entry is deleted: the entry is never read with parts
    missing (was: a KeyError on every retry, the cell set aside)."""
    cache = ImageryCache(store_root)
    cell = GRID.cell_at(13.41, 52.51)
    gbox = cell.utm_geobox()
    cache.put(2020, cell, Imagery.from_export(fake_export((gbox.shape.y, gbox.shape.x)), gbox))
    real_remove = fs.remove

    def remove_then_die(path, recursive=False):
        """Objects go one by one, in the store's order; the process dies after the first one."""
        fsys, p = fs.filesystem(path)
        objects = sorted(fsys.find(p)) if recursive else [p]
        if objects:
            fsys.rm(objects[0])
        if len(objects) > 1:
            raise KeyboardInterrupt("node lost mid-deletion")

    monkeypatch.setattr(fs, "remove", remove_then_die)
    with pytest.raises(KeyboardInterrupt):
        cache.delete(2020, cell)
    monkeypatch.setattr(fs, "remove", real_remove)
    assert not cache.has(2020, cell)  # so the next attempt fetches it again
    assert fs.exists(fs.join(cache.path(2020, cell), "s2", "zarr.json"))  # the parts were left

    # an entry marked complete with a part gone (an older gum-ray's order of deletion): one clear
    # error, and the entry is removed so the next attempt fetches it again
    cache.put(2020, cell, Imagery.from_export(fake_export((gbox.shape.y, gbox.shape.x)), gbox))
    fs.remove(fs.join(cache.path(2020, cell), "s2"), recursive=True)
    assert cache.has(2020, cell)
    with pytest.raises(InputError, match="lacked s2.*fetched again"):
        cache.get(2020, cell)
    assert not cache.has(2020, cell)


def test_bad_inputs(store_root, tmp_path):
    cache = ImageryCache(store_root)
    cell = GRID.cell_at(13.41, 52.51)
    gbox = cell.utm_geobox()
    with pytest.raises(ValueError, match="expected .* for this grid"):
        Imagery.from_export(fake_export((10, 10)), gbox)  # imagery and its grid disagree
    with pytest.raises(ValueError, match="expected"):
        Imagery.from_export(np.zeros((5, gbox.shape.y, gbox.shape.x), np.float32), gbox)
    with pytest.raises(InputError, match="expected an Imagery"):
        cache.put(2020, cell, fake_export((gbox.shape.y, gbox.shape.x)))
    other = tmp_path / "not-a-cache"
    other.mkdir()
    (other / "x.txt").write_text("x")
    with pytest.raises(InputError, match="not a gum-ray imagery cache"):
        ImageryCache(str(other))
