"""A GPU's reader leaves the cache's value parts byte-shuffled (gum_ray.shuffled): the host
decompresses only their LZ4 streams and the device undoes Blosc's shuffle. The bytes are Blosc's
own, the values equal the plain read's, and every other layout comes back as an array."""

from __future__ import annotations

import numcodecs
import numpy as np
import pytest
import torch
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from gum_ray import bands
from gum_ray.inference import InferenceEngine, InferenceSettings
from gum_ray.model import Gum1, build_model
from gum_ray.shuffled import ShuffledPart, shuffle, unshuffle
from gum_ray.store import fs, shards
from gum_ray.store.cache import ImageryCache
from gum_ray.store.shards import CorruptShard, read_array

from tests.test_device_path import TINY, TINY13, fake_export
from tests.test_store_shards import GRID, sample, write


def cache_codec(k: int, cname: str = "lz4hc", clevel: int = 5) -> BloscCodec:
    """The cache's codec (Blosc picks blocks of 512 KiB for 2-byte values); LZ4 at level 1 makes
    blocks of 32 KiB, so a small test chunk holds full blocks and a shorter last one."""
    return BloscCodec(cname=cname, clevel=clevel, shuffle="shuffle", typesize=k)


def compressible(shape, dtype, seed=0) -> np.ndarray:
    """Reflectance-like values: smooth, plus noise in the low bits (the low bytes' plane is
    stored as it was, the high bytes' compressed)."""
    rng = np.random.default_rng(seed)
    _, yy, xx = np.indices(shape)
    return ((yy * 5 + xx * 3) % 3000 + rng.integers(0, 200, shape)).astype(dtype)


def blosc_s_shuffle(chunk: np.ndarray, blocksize: int) -> np.ndarray:
    """The reference: numcodecs' own shuffle, applied to each Blosc block of the chunk apart."""
    raw = np.ascontiguousarray(chunk).reshape(-1).view(np.uint8)
    k = chunk.dtype.itemsize
    out = [np.frombuffer(numcodecs.Shuffle(k).encode(raw[a : a + blocksize][: (min(blocksize, raw.size - a) // k) * k]),
                         np.uint8) for a in range(0, raw.size, blocksize)]
    out = [np.concatenate([o, raw[a + o.size : a + min(blocksize, raw.size - a)]]) for o, a in
           zip(out, range(0, raw.size, blocksize))]
    return np.concatenate(out)


@pytest.mark.parametrize("dtype", [np.uint16, np.int16, np.int32])
@pytest.mark.parametrize("rows, chunk_rows, cols, blocksize", [(37, 8, 50, 256), (16, 16, 64, 2048),
                                                              (5, 2, 7, 12), (9, 4, 30, 120)])
def test_shuffle_is_blosc_s_per_block_shuffle_and_unshuffle_undoes_it(dtype, rows, chunk_rows, cols, blocksize):
    """Full blocks and a shorter last one; a band's rows padded to whole chunks; numpy and torch."""
    k = np.dtype(dtype).itemsize
    blocksize = blocksize // k * k
    a = sample((3, rows, cols), dtype, seed=rows)
    per_band = -(-rows // chunk_rows)
    padded = np.zeros((3, per_band * chunk_rows, cols), dtype)
    padded[:, :rows] = a
    chunks = padded.reshape(3 * per_band, chunk_rows * cols)
    data = np.stack([shuffle(c, blocksize) for c in chunks])
    for c, d in zip(chunks, data):
        np.testing.assert_array_equal(d, blosc_s_shuffle(c, blocksize))
    part = ShuffledPart(data, a.shape, np.dtype(dtype), chunk_rows, blocksize)
    np.testing.assert_array_equal(unshuffle(part), a)
    got = unshuffle(ShuffledPart(torch.from_numpy(data), a.shape, np.dtype(dtype), chunk_rows, blocksize))
    assert isinstance(got, torch.Tensor) and got.shape == a.shape
    np.testing.assert_array_equal(got.numpy(), a)
    with pytest.raises(ValueError, match="holds"):
        ShuffledPart(data[1:], a.shape, np.dtype(dtype), chunk_rows, blocksize)
    with pytest.raises(ValueError, match="layout"):
        ShuffledPart(data, a.shape, np.dtype(dtype), chunk_rows, blocksize + 1)


def test_lz4_is_found_and_checked_against_blosc():
    assert shards.lz4_decoder() is not None


@pytest.mark.parametrize("dtype", [np.uint16, np.int16])
@pytest.mark.parametrize("cname, clevel", [("lz4hc", 5), ("lz4", 1)], ids=["one block a chunk", "1.5 blocks"])
@pytest.mark.parametrize("first", [None, slice(1, 3), slice(2, 3)])
def test_a_shuffled_read_holds_blosc_s_bytes_and_the_plain_read_s_values(tmp_path, dtype, cname, clevel, first):
    """Inner chunks of one band and whole rows, the last rows of each band a partial chunk; bytes
    stored as LZ4 streams and as they were (an incompressible plane); a band never written (its
    chunks the fill value, not stored); a range of bands: Blosc's own bytes before its unshuffle,
    and after the device's unshuffle the plain read's values."""
    a = compressible((4, 45, 6250), dtype, seed=clevel)
    a[1] = 7  # the fill value: its chunks are not stored
    path, z = write(str(tmp_path / "g"), a, (1, 8, 6250), compressors=[cache_codec(2, cname, clevel)], fill=7)
    part = read_array(path, first=first, for_device=True)
    assert isinstance(part, ShuffledPart)
    assert part.blocksize == (100_000 if clevel == 5 else 65_536)
    want = read_array(path, first=first)
    np.testing.assert_array_equal(want, a[first or slice(None)])
    np.testing.assert_array_equal(unshuffle(part), want)
    got = unshuffle(ShuffledPart(torch.from_numpy(part.data), part.shape, part.dtype, part.chunk_rows,
                                 part.blocksize))
    np.testing.assert_array_equal(got.numpy(), want)
    # chunk by chunk, the bytes Blosc itself decompresses before its unshuffle
    padded = np.full((a.shape[0], 48, 6250), 7, dtype)
    padded[:, :45] = a
    bands_read = range(a.shape[0])[first or slice(None)]
    chunks = [padded[b, r : r + 8].reshape(-1) for b in bands_read for r in range(0, 48, 8)]
    assert part.data.shape == (len(chunks), 8 * 6250 * a.dtype.itemsize)
    for c, d in zip(chunks, part.data):
        np.testing.assert_array_equal(d, blosc_s_shuffle(c, part.blocksize))


@pytest.mark.parametrize("what, dtype, inner, codec", [
    ("a mask: one-byte values", np.uint8, (1, 8, 60), cache_codec(1)),
    ("zstd (older entries)", np.uint16, (1, 8, 60), ZstdCodec(level=3)),
    ("several bands a chunk", np.uint16, (3, 8, 60), cache_codec(2)),
    ("square chunks", np.uint16, (1, 8, 8), cache_codec(2)),
    ("no shuffle", np.uint16, (1, 8, 60), BloscCodec(cname="lz4", shuffle="noshuffle", typesize=2)),
    ("zstd inside Blosc", np.uint16, (1, 8, 60), BloscCodec(cname="zstd", shuffle="shuffle", typesize=2)),
    ("stored plain (level 0)", np.uint16, (1, 8, 60), BloscCodec(cname="lz4", clevel=0, shuffle="shuffle",
                                                                 typesize=2)),
])
def test_other_layouts_come_back_as_arrays(tmp_path, what, dtype, inner, codec):
    a = sample((3, 21, 60), dtype)
    path, _ = write(str(tmp_path / "g"), a, inner, compressors=[codec])
    got = read_array(path, for_device=True)
    assert isinstance(got, np.ndarray), what
    np.testing.assert_array_equal(got, a)


@pytest.mark.parametrize("fill", [0, 1])
def test_a_part_of_only_its_fill_value_is_a_broadcast_that_uploads_as_a_fill(tmp_path, fill):
    """Nothing stored (e.g. the Sentinel-1 of a place with none): no memory filled on the host, a
    read-only broadcast of the value, which the upload makes a fill on the device."""
    from gum_ray.devices import as_device_tensor

    a = np.full((2, 21, 60), fill, np.uint8)
    path, _ = write(str(tmp_path / "g"), a, (1, 8, 60), compressors=[cache_codec(1)], fill=fill)
    got = read_array(path, for_device=True)
    assert isinstance(got, np.ndarray) and got.shape == a.shape and not any(got.strides)
    assert not got.flags.writeable
    np.testing.assert_array_equal(got, a)
    np.testing.assert_array_equal(read_array(path), a)  # the plain read: memory of its own
    t = as_device_tensor(got, torch.device("cpu"))
    assert t.dtype == torch.uint8 and t.is_contiguous() and torch.equal(t, torch.from_numpy(a))


def _first_frame(path):
    raw = bytearray(fs.read_bytes(fs.join(path, "c", "0", "0", "0")))
    offset, nbytes = shards._index(bytes(raw), 3 * 3, "x")[0].tolist()
    return raw, offset, nbytes


@pytest.mark.parametrize("damage", ["block inside the header", "stream past its frame", "stream cut short"])
def test_a_damaged_frame_raises_rather_than_leaving_stale_memory(tmp_path, damage):
    a = compressible((3, 21, 6250), np.uint16)
    path, _ = write(str(tmp_path / "g"), a, (1, 8, 6250), compressors=[cache_codec(2, "lz4", 1)])
    raw, offset, nbytes = _first_frame(path)
    table = offset + 16
    pos = offset + int(np.frombuffer(bytes(raw[table : table + 4]), "<i4")[0])  # block 0, its planes
    sizes = [int(np.frombuffer(bytes(raw[pos : pos + 4]), "<i4")[0])]
    sizes.append(int(np.frombuffer(bytes(raw[pos + 4 + sizes[0] : pos + 8 + sizes[0]]), "<i4")[0]))
    assert sizes[0] == 32_768 > sizes[1]  # the low bytes stored as they were, the high bytes by LZ4
    if damage == "block inside the header":
        raw[table : table + 4] = np.int32(8).tobytes()
    elif damage == "stream past its frame":
        raw[pos : pos + 4] = np.int32(nbytes).tobytes()
    else:  # the LZ4 stream zeroed: it does not decode to its plane's size
        at = pos + 8 + sizes[0]
        raw[at : at + sizes[1]] = bytes(sizes[1])
    fs.write_bytes(fs.join(path, "c", "0", "0", "0"), bytes(raw))
    with pytest.raises(CorruptShard):
        read_array(path, for_device=True)


@pytest.mark.parametrize("spec", [TINY, TINY13])
@pytest.mark.parametrize("by_mask", [True, False], ids=["cpu branches", "gpu branchless"])
@pytest.mark.parametrize("s1", [True, False], ids=["with S1", "no S1"])
def test_the_engine_takes_a_model_actor_s_read_for_its_device(tmp_path, spec, by_mask, s1):
    """A GPU actor's read (value parts shuffled, into memory torch tensors own; a part of only its
    fill value a broadcast) gives the engine the input, validity and quality of the plain read,
    the bands it reads only."""
    from gum_ray.mapping.stages import CellPredictor

    cache = ImageryCache(str(tmp_path / "c"))
    cell = GRID.cell_at(13.41, 52.51)
    gbox = cell.utm_geobox(halo_px=16)
    export = fake_export(gbox.shape.y, gbox.shape.x, n=spec.in_channels + 1, seed=3)
    yy, xx = np.mgrid[0 : gbox.shape.y, 0 : gbox.shape.x]
    export[8:11] = [yy * 3.0, xx % 40, (xx + yy) % 360]  # terrain as smooth as terrain: compressed
    if not s1:
        export[4:8] = np.nan
    parts = bands.encode_compact(export)
    parts["terrain_mask"][2, 20:22] = 0
    cache.put_compact(2020, cell, parts, gbox, {})
    engine = InferenceEngine(Gum1.from_module(build_model(spec)), InferenceSettings(device="cpu"))
    engine._by_mask = by_mask
    read, tensors, _, _, _ = CellPredictor._read(cache, 2020, cell, False, engine.compact_bands(), for_device=True)
    shuffled = {k for k, v in tensors.items() if isinstance(v, ShuffledPart)}
    assert shuffled == ({"s2", "s1", "terrain"} if s1 else {"s2", "terrain"})  # masks and products are bytes
    if not s1:  # nothing stored: broadcasts of the fill value
        assert not any(tensors["s1"].strides) and not any(tensors["s1_mask"].strides)
    for k in shuffled:  # the data the reader filled, as a tensor: no copy
        assert isinstance(tensors[k].data, torch.Tensor) and tensors[k].data.data_ptr() == read[k].data.ctypes.data
    got = engine.prepare_compact(tensors, quality=True)
    want = engine.prepare_compact(parts, quality=True)
    for g, w in zip(got, want):
        assert torch.equal(g, w)

