"""The imagery cache's own shard reader (gum_ray.store.shards): the same arrays as Zarr reads, for
every layout it takes; Zarr for any other; a damaged object is an error, never wrong pixels."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, GzipCodec, ZstdCodec

from gum_ray.bands import encode_compact
from gum_ray.grid import ProductGrid
from gum_ray.imagery import Imagery
from gum_ray.store import fs
from gum_ray.store.cache import ImageryCache
from gum_ray.store.shards import CorruptShard, read_array

from tests.test_store_cache import fake_export

GRID = ProductGrid(cell_deg=0.01, chunk_px=40)


def write(path: str, a: np.ndarray, inner, shard=None, compressors=None, fill=0):
    shard = shard or tuple(-(-s // c) * c for s, c in zip(a.shape, inner))
    g = zarr.open_group(fs.zarr_store(path), mode="w", zarr_format=3)
    z = g.create_array("a", shape=a.shape, dtype=a.dtype, chunks=inner, shards=shard, fill_value=fill,
                       compressors=compressors or [ZstdCodec(level=3)])
    z[...] = a
    return fs.join(path, "a"), z


def sample(shape=(3, 23, 17), dtype=np.uint16, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 3000, shape).astype(dtype)


CODECS = {
    "zstd": lambda dtype: ZstdCodec(level=3),
    "blosc lz4hc shuffle (the cache's)": lambda dtype: BloscCodec(cname="lz4hc", clevel=5, shuffle="shuffle",
                                                                  typesize=np.dtype(dtype).itemsize),
    "blosc lz4 noshuffle": lambda dtype: BloscCodec(cname="lz4", shuffle="noshuffle", typesize=1),
    "blosc zstd bitshuffle": lambda dtype: BloscCodec(cname="zstd", shuffle="bitshuffle",
                                                      typesize=np.dtype(dtype).itemsize),
}


@pytest.mark.parametrize("codec", list(CODECS))
@pytest.mark.parametrize("inner", [(1, 5, 17), (3, 5, 17), (2, 8, 8), (1, 23, 17), (3, 4, 5)])
@pytest.mark.parametrize("dtype", [np.uint16, np.int16, np.uint8])
def test_same_as_zarr_for_every_inner_chunk_layout(tmp_path, inner, dtype, codec):
    """One band and whole rows (decoded in place), several bands, square chunks, partial last
    chunks on every axis (decoded, then copied), zstd or Blosc of any kind: equal to Zarr's read,
    value for value."""
    a = sample(dtype=dtype)
    path, z = write(str(tmp_path / "g"), a, inner, compressors=[CODECS[codec](dtype)])
    got = read_array(path)
    assert got is not None and got.dtype == a.dtype and got.shape == a.shape
    np.testing.assert_array_equal(got, a)
    np.testing.assert_array_equal(got, z[...])


@pytest.mark.parametrize("inner", [(1, 5, 17), (1, 23, 17), (3, 5, 17)])
def test_a_range_of_bands_decodes_only_those(tmp_path, inner):
    """``first`` (a band range): with one band per inner chunk only that range is decoded and
    returned; with several bands per chunk the whole array comes back; an array of only the fill
    value gives the range filled; a reversed or empty range is refused."""
    import gum_ray.store.shards as shards

    a = sample(dtype=np.int16)
    path, _ = write(str(tmp_path / "g"), a, inner, compressors=[CODECS["blosc lz4hc shuffle (the cache's)"](a.dtype)])
    whole_path = path
    calls = []
    real = shards._DECODERS["blosc"]
    shards._DECODERS["blosc"] = (real[0], lambda blob, out: calls.append(1) or real[1](blob, out), real[2])
    try:
        for want_range in (slice(1, 3), slice(2, 3), slice(0, a.shape[0])):
            calls.clear()
            got = read_array(path, first=want_range)
            if inner[0] == 1:
                np.testing.assert_array_equal(got, a[want_range])
                rows_chunks = -(-a.shape[1] // inner[1]) * -(-a.shape[2] // inner[2])
                assert len(calls) == (want_range.stop - want_range.start) * rows_chunks  # no other band decoded
            else:
                np.testing.assert_array_equal(got, a)
    finally:
        shards._DECODERS["blosc"] = real
    empty = np.full((3, 10, 4), 7, np.uint8)
    path, _ = write(str(tmp_path / "h"), empty, (1, 5, 4), fill=7)
    np.testing.assert_array_equal(read_array(path, first=slice(1, 3)), empty[1:3])
    if inner[0] == 1:
        with pytest.raises(ValueError, match="range"):
            read_array(whole_path, first=slice(2, 1))


def test_fill_value_chunks_and_missing_shard(tmp_path):
    """Inner chunks holding only the fill value are not stored (index entry 2**64-1): they read as
    the fill value; so does an array with no shard object at all."""
    a = sample()
    a[:, 5:10] = 7  # one row block of fill value in every band
    path, z = write(str(tmp_path / "g"), a, (1, 5, 17), fill=7)
    np.testing.assert_array_equal(read_array(path), a)
    empty = np.full((2, 9, 4), 7, np.uint16)
    path, _ = write(str(tmp_path / "h"), empty, (1, 5, 4), fill=7)
    assert not fs.exists(fs.join(path, "c", "0", "0", "0"))
    np.testing.assert_array_equal(read_array(path), empty)


def test_other_layouts_are_left_to_zarr(tmp_path):
    a = sample()
    path, _ = write(str(tmp_path / "b"), a, (1, 5, 17), compressors=[GzipCodec()])
    assert read_array(path) is None
    path, _ = write(str(tmp_path / "z"), a, (1, 5, 17), compressors=[BloscCodec(), ZstdCodec()])  # two
    assert read_array(path) is None
    path, _ = write(str(tmp_path / "m"), a, (1, 5, 17), shard=(1, 10, 17))  # several shards
    assert read_array(path) is None


@pytest.mark.parametrize("codec", ["zstd", "blosc lz4hc shuffle (the cache's)"])
def test_damaged_objects_raise(tmp_path, codec):
    a = sample()
    path, _ = write(str(tmp_path / "g"), a, (1, 5, 17), compressors=[CODECS[codec](a.dtype)])
    obj = fs.join(path, "c", "0", "0", "0")
    good = fs.read_bytes(obj)
    for name, bad in [("index", good[:-10] + bytes([good[-10] ^ 1]) + good[-9:]),  # the index's checksum
                      ("truncated", good[-40:]),
                      ("chunk", b"\x00" * 64 + good[64:]),  # the first chunks' frames broken
                      # Blosc: the first frame's compressed size (it trusts that field)
                      ("header", good[:12] + bytes([good[12] ^ 4]) + good[13:])]:
        if name == "header" and codec == "zstd":
            continue  # byte 12 is data there: a flipped literal is not caught (no checksum)
        fs.write_bytes(obj, bad)
        with pytest.raises(CorruptShard):
            read_array(path)
    fs.write_bytes(obj, good)
    np.testing.assert_array_equal(read_array(path), a)


def test_the_cache_reads_its_own_layout_directly_and_older_entries_too(store_root):
    """A new entry is one band and 512 whole rows per inner chunk, Blosc LZ4HC with byte shuffle,
    and every part is read without Zarr (local and gs://); an entry in the layouts before (zstd, one
    band or all bands per chunk) or one another tool wrote with another codec reads the same."""
    cache = ImageryCache(store_root)
    cell = GRID.cell_at(13.41, 52.51)
    gbox = cell.utm_geobox(halo_px=16)
    export = fake_export((gbox.shape.y, gbox.shape.x))
    cache.put(2020, cell, Imagery.from_export(export, gbox))
    want = encode_compact(export)
    path = cache.path(2020, cell)
    for name in want:
        meta = zarr.open_array(fs.zarr_store(fs.join(path, name)), mode="r")
        assert meta.metadata.codecs[0].chunk_shape[0] == 1  # one band per inner chunk
        blosc = meta.metadata.codecs[0].codecs[1]
        assert isinstance(blosc, BloscCodec) and blosc.cname.value == "lz4hc"
        assert blosc.typesize == want[name].dtype.itemsize
        np.testing.assert_array_equal(read_array(fs.join(path, name)), want[name])
    allocs = []

    def alloc(shape, dtype):
        allocs.append((shape, dtype))
        return np.empty(shape, dtype)

    parts, got_box, _ = cache.get_compact(2020, cell, alloc)
    assert got_box == gbox and len(allocs) == len(want)
    for name, v in want.items():
        np.testing.assert_array_equal(parts[name], v)
    # rewrite three parts as older gum-ray (zstd, one band or all bands per chunk) and another
    # codec would have
    g = zarr.open_group(fs.zarr_store(path), mode="r+", zarr_format=3)
    for name, codec, nbc in (("s2", ZstdCodec(level=3), None), ("terrain", ZstdCodec(level=3), 1),
                             ("s1", GzipCodec(), None)):
        nb, h, w = want[name].shape
        del g[name]
        z = g.create_array(name, shape=(nb, h, w), dtype=want[name].dtype, chunks=(nbc or nb, 512, w),
                           shards=(nb, -(-h // 512) * 512, w), fill_value=0, compressors=[codec])
        z[...] = want[name]
    parts, _, _ = cache.get_compact(2020, cell)
    for name, v in want.items():
        np.testing.assert_array_equal(parts[name], v)
    assert read_array(fs.join(path, "s1")) is None  # gzip: read by Zarr
    np.testing.assert_array_equal(read_array(fs.join(path, "terrain")), want["terrain"])  # zstd, directly


def test_a_mask_s_common_byte_is_its_fill_value_and_not_stored(tmp_path):
    """Each mask is written with its more common byte as the fill value, so inner chunks of only
    that byte are not stored (an all-present mask, an all-absent one: no shard at all) and read
    back as a fill; mixed masks and entries written with a fill of 0 before read the same."""
    cache = ImageryCache(str(tmp_path / "cache"))
    cell = ProductGrid(cell_deg=0.1, chunk_px=40).cell_at(13.41, 52.51)
    gbox = cell.utm_geobox(halo_px=16)
    h, w = gbox.shape.y, gbox.shape.x
    assert h > 1024  # three inner chunks of rows a band
    export = fake_export((h, w))
    export[4:8] = np.nan  # no Sentinel-1: its mask is all 0
    export[0:4, :300] = np.nan  # Sentinel-2 absent in the first inner chunk of rows, present below
    export[0:4, 600:610, :7] = np.nan  # and a few pixels in the second
    cache.put(2021, cell, Imagery.from_export(export, gbox))
    want = encode_compact(export)
    path = cache.path(2021, cell)
    fills = {}
    for name in ("s2_mask", "s1_mask", "terrain_mask"):
        meta = json.loads(fs.read_bytes(fs.join(path, name, "zarr.json")))
        fills[name] = meta["fill_value"]
    assert fills == {"s2_mask": 1, "s1_mask": 0, "terrain_mask": 1}
    for name in ("s1_mask", "terrain_mask"):  # only the fill value: nothing stored
        assert not fs.exists(fs.join(path, name, "c", "0", "0", "0"))
    raw = fs.read_bytes(fs.join(path, "s2_mask", "c", "0", "0", "0"))
    n_chunks = 4 * -(-h // 512)
    index = np.frombuffer(raw[len(raw) - 16 * n_chunks - 4 : -4], "<u8").reshape(n_chunks, 2)
    stored = [bool(i[0] != 2**64 - 1) for i in index]
    assert stored[:2] == [True, True] and not any(stored[2 : -(-h // 512)])  # band 0: rows 0-1023 only
    parts, _, _ = cache.get_compact(2021, cell)
    for name, v in want.items():
        np.testing.assert_array_equal(parts[name], v)
    # an entry written before, with 0 as every mask's fill value, reads the same
    g = zarr.open_group(fs.zarr_store(path), mode="r+", zarr_format=3)
    for name in ("s2_mask", "s1_mask", "terrain_mask"):
        nb = want[name].shape[0]
        del g[name]
        z = g.create_array(name, shape=want[name].shape, dtype="uint8", chunks=(1, 512, w),
                           shards=(nb, -(-h // 512) * 512, w), fill_value=0,
                           compressors=[BloscCodec(cname="lz4hc", clevel=5, typesize=1, shuffle="noshuffle")])
        z[...] = want[name]
    parts, _, _ = cache.get_compact(2021, cell)
    for name, v in want.items():
        np.testing.assert_array_equal(parts[name], v)


def test_a_damaged_cache_entry_is_an_error_and_fetched_again(tmp_path):
    """A damaged object in a cache entry: one clear error, never pixels, and the entry is removed
    so the cell's next attempt fetches it again."""
    from gum_ray.errors import InputError

    cache = ImageryCache(str(tmp_path / "c"))
    cell = GRID.cell_at(13.41, 52.51)
    gbox = cell.utm_geobox(halo_px=16)
    cache.put(2020, cell, Imagery.from_export(fake_export((gbox.shape.y, gbox.shape.x)), gbox))
    obj = fs.join(cache.path(2020, cell), "s2", "c", "0", "0", "0")
    fs.write_bytes(obj, fs.read_bytes(obj)[:-5] + b"\xff" * 5)
    with pytest.raises(InputError, match=r"damaged and is removed; it is fetched again on the next attempt "
                                         r"\(s2: the shard index's checksum does not match"):
        cache.get_compact(2020, cell)
    assert not cache.has(2020, cell) and not fs.exists(cache.path(2020, cell))


def shard_of(frames: list[bytes]) -> bytes:
    """A shard object as Zarr writes one: the chunks, then their (offset, size) index and its CRC32C."""
    import google_crc32c

    index, at = [], 0
    for f in frames:
        index += [at, len(f)]
        at += len(f)
    body = np.asarray(index, "<u8").tobytes()
    return b"".join(frames) + body + np.uint32(google_crc32c.value(body)).tobytes()


def test_a_chunk_of_the_wrong_size_is_an_error_not_stale_memory():
    """A frame that decodes to fewer (or more) values than its inner chunk holds: an error, never
    a block left as the destination's memory was."""
    import numcodecs

    from gum_ray.store.shards import decode_into

    good = np.arange(20, dtype=np.uint16).reshape(1, 4, 5)
    for name, codec in (("zstd", numcodecs.Zstd()), ("blosc", numcodecs.Blosc(cname="lz4hc", typesize=2))):
        out = np.full((1, 4, 5), 9, np.uint16)
        decode_into(shard_of([codec.encode(good)]), out, (1, 4, 5), (1, 1, 1), 0, codec=name)
        np.testing.assert_array_equal(out, good)
        for wrong in (good.ravel()[:10], np.arange(30, dtype=np.uint16)):
            out = np.full((1, 4, 5), 9, np.uint16)
            with pytest.raises(CorruptShard, match="declares|decodes to"):
                decode_into(shard_of([codec.encode(np.ascontiguousarray(wrong))]), out, (1, 4, 5), (1, 1, 1), 0,
                            codec=name)



@pytest.mark.parametrize("level", [1, 3, 19])
def test_frame_content_size_reads_every_header_width(level):
    import numcodecs

    from gum_ray.store.shards import frame_content_size

    zstd = numcodecs.Zstd(level=level)
    for n in (0, 1, 255, 256, 65791, 65792, 1 << 20):
        assert frame_content_size(zstd.encode(np.zeros(n, np.uint8))) == n
    assert frame_content_size(b"not a zstd frame") is None


def test_blosc_frame_size_is_the_header_s_and_only_for_a_whole_frame():
    import numcodecs

    from gum_ray.store.shards import blosc_frame_size

    for n in (0, 1, 255, 70000, 1 << 21):
        for codec in (numcodecs.Blosc(cname="lz4hc", typesize=2), numcodecs.Blosc(cname="zstd", shuffle=2)):
            frame = codec.encode(np.arange(n, dtype=np.uint8))
            assert blosc_frame_size(frame) == n
            assert blosc_frame_size(frame[:-1]) is None and blosc_frame_size(frame + b"x") is None
    assert blosc_frame_size(b"not a blosc frame") is None and blosc_frame_size(b"\x02") is None


@pytest.mark.parametrize("pin", [False, pytest.param(True, marks=pytest.mark.skipif(
    not __import__("torch").cuda.is_available(), reason="pinned memory needs a CUDA GPU"))])
def test_a_model_actor_reads_into_tensors_it_hands_to_the_engine(tmp_path, pin):
    """The actor decompresses into memory owned by torch tensors (pinned beside a GPU) and gives
    the engine those tensors, whose allocation an asynchronous upload can hold; a part Zarr reads
    is handed over as the array it is."""
    import torch

    from gum_ray.mapping.stages import CellPredictor

    cache = ImageryCache(str(tmp_path / "c"))
    cell = GRID.cell_at(13.41, 52.51)
    gbox = cell.utm_geobox(halo_px=16)
    export = fake_export((gbox.shape.y, gbox.shape.x))
    cache.put(2020, cell, Imagery.from_export(export, gbox))
    want = encode_compact(export)
    g = zarr.open_group(fs.zarr_store(cache.path(2020, cell)), mode="r+", zarr_format=3)
    del g["s1"]
    z = g.create_array("s1", shape=want["s1"].shape, dtype="int16", chunks=(1, 64, 64), compressors=[BloscCodec()])
    z[...] = want["s1"]
    parts, tensors, got_box, _, read_s = CellPredictor._read(cache, 2020, cell, pin)
    assert got_box == gbox and read_s > 0 and set(parts) == set(tensors) == set(want)
    for name, v in want.items():
        np.testing.assert_array_equal(parts[name], v)
        if name == "s1":  # read by Zarr: the array itself
            assert tensors[name] is parts[name]
            continue
        t = tensors[name]
        assert isinstance(t, torch.Tensor) and t.is_pinned() == pin
        assert t.data_ptr() == parts[name].ctypes.data  # the same memory, no copy
    # with the bands a GUM 1 engine reads: terrain holds bands 1-2 only, the rest whole
    parts, tensors, _, _, _ = CellPredictor._read(cache, 2020, cell, pin, {"s2": slice(0, 4), "terrain": slice(1, 3)})
    np.testing.assert_array_equal(parts["terrain"], want["terrain"][1:3])
    assert tensors["terrain"].shape[0] == 2
    for name in set(want) - {"terrain"}:
        np.testing.assert_array_equal(parts[name], want[name])
