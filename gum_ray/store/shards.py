"""Read a Zarr v3 array stored as one shard of Blosc (or zstd) inner chunks, as the imagery cache
writes it, decoding each inner chunk straight into its place in the result.

Why not zarr-python's own read: its synchronous API runs every read on one event loop and hands
each inner chunk's codecs to ``asyncio.to_thread``, so two threads reading two cells at once are
no faster than one (zarr-python issue #4293), and each chunk is decoded into a buffer of its own
and then copied. A model actor on a GPU node needs several reader threads, each decompressing a
cell while the device runs (DESIGN decision 13; ``docs/performance.md``). Here one read is one
object GET, and numcodecs' Blosc and zstd (both release the GIL; Blosc runs one thread off the
main thread) write every inner chunk of one band and whole rows (the cache's layout since issue
14) directly into the array it returns.

Beside a GPU (``read_array(..., for_device=True)``) the host does less: a 16-bit value part's
Blosc frames are decompressed only as far as their LZ4 streams (:func:`read_shuffled`, through
LZ4's own ``LZ4_decompress_safe``), and the device undoes Blosc's byte shuffle
(:mod:`gum_ray.shuffled`); a part of nothing but its fill value is a broadcast of it.

Only the exact layout described below is read here; for anything else (another codec, another
index location, more than one shard, a chunk key encoding other than the default)
:func:`read_array` returns None and the caller reads with zarr. The shard index's CRC32C is
checked, every offset against the object's size, and every frame's header against its block (a
zstd frame's declared size; a Blosc frame's declared size and its own length): a damaged index or
frame raises :class:`CorruptShard` rather than leaving stale memory in the result. (The inner
chunks carry no checksum, as Zarr wrote them: a flipped byte inside a frame that still decodes is
not caught here, nor by Zarr.)
"""

from __future__ import annotations

import functools
import json
import math
from typing import Any, Callable

import numpy as np

from gum_ray.shuffled import ShuffledPart, shuffle
from gum_ray.store import fs

#: an inner chunk that holds only the fill value is not stored; its index entry is (2**64-1, 2**64-1)
EMPTY = 2**64 - 1
_DTYPES = {"uint8", "uint16", "int16", "int32", "uint32", "float32"}


class CorruptShard(ValueError):
    """A shard object whose index or chunks do not agree with its metadata."""


def _is(codec: Any, name: str, **config: Any) -> bool:
    if not isinstance(codec, dict) or codec.get("name") != name:
        return False
    got = codec.get("configuration") or {}
    return all(got.get(k, v) == v for k, v in config.items()) and set(got) <= set(config) | {"checksum"}


def layout(meta: dict[str, Any]
           ) -> tuple[tuple[int, ...], np.dtype, Any, tuple[int, ...], tuple[int, ...], str] | None:
    """(shape, dtype, fill value, inner chunk shape, inner chunks per axis of the shard, codec name)
    of an array's ``zarr.json`` if it is one shard of ``bytes`` (little endian) + ``blosc`` or
    ``zstd`` inner chunks with a ``bytes`` + ``crc32c`` index at the end, under the default chunk
    key encoding; else None. (A Blosc frame's header says how it was compressed, shuffle included,
    so its configuration needs no check here.)"""
    try:
        if meta.get("zarr_format") != 3 or meta.get("node_type") != "array" or meta.get("storage_transformers"):
            return None
        if meta.get("data_type") not in _DTYPES:
            return None
        shape = tuple(int(s) for s in meta["shape"])
        grid = meta["chunk_grid"]
        keys = meta.get("chunk_key_encoding", {})
        if grid.get("name") != "regular" or keys.get("name") != "default" or \
                (keys.get("configuration") or {}).get("separator", "/") != "/":
            return None
        shard = tuple(int(s) for s in grid["configuration"]["chunk_shape"])
        codecs = meta["codecs"]
        if len(codecs) != 1 or codecs[0].get("name") != "sharding_indexed":
            return None
        cfg = codecs[0]["configuration"]
        inner = tuple(int(s) for s in cfg["chunk_shape"])
        if not (len(shape) == len(shard) == len(inner) and all(a <= b for a, b in zip(shape, shard))):
            return None  # more than one shard
        if any(b % c for b, c in zip(shard, inner)) or min(inner) < 1:
            return None
        inner_codecs = cfg["codecs"]
        if len(inner_codecs) != 2 or not _is(inner_codecs[0], "bytes", endian="little") or \
                inner_codecs[1].get("name") not in _DECODERS:
            return None
        index_codecs = cfg.get("index_codecs")
        if len(index_codecs) != 2 or not _is(index_codecs[0], "bytes", endian="little") or \
                not _is(index_codecs[1], "crc32c"):
            return None
        if cfg.get("index_location", "end") != "end":
            return None
        fill = meta.get("fill_value", 0)
        if not isinstance(fill, (int, float)) or isinstance(fill, bool):
            return None
        return shape, np.dtype(meta["data_type"]).newbyteorder("<"), fill, inner, \
            tuple(b // c for b, c in zip(shard, inner)), inner_codecs[1]["name"]
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def read_array(path: str, alloc: Callable[[tuple[int, ...], np.dtype], np.ndarray] | None = None,
               first: slice | None = None, for_device: bool = False) -> np.ndarray | ShuffledPart | None:
    """The array stored at ``path`` (a Zarr v3 array's folder, local or ``gs://``), or None if its
    layout is not the one read here (:func:`layout`). ``alloc(shape, dtype)`` gives the array to
    fill (default ``np.empty``; e.g. pinned memory for a GPU upload).

    ``first``: only these indices of the first axis (a band range, ``step`` 1) are wanted. Where
    the inner chunks hold one index of that axis each (the imagery cache's layout), only their
    chunks are decompressed and the array returned holds just them; otherwise the whole array is
    returned (the caller tells the two apart by the shape).

    ``for_device``: the array goes to a device (a GPU) that finishes its decoding there. Where it is
    the imagery cache's layout of Blosc frames of byte-shuffled LZ4 (one band and whole rows a
    chunk, values of more than one byte), only its LZ4 streams are decompressed and the unshuffle
    is left to the device: a :class:`~gum_ray.shuffled.ShuffledPart` (:func:`read_shuffled`). An
    array of nothing but its fill value (no object stored, e.g. the Sentinel-1 of a place with
    none) is a read-only broadcast of that value, which the upload makes a fill on the device
    (:func:`gum_ray.devices.as_device_tensor`), not memory filled on the host. Otherwise the array
    as above.
    """
    meta = json.loads(fs.read_bytes(fs.join(path, "zarr.json")))
    spec = layout(meta)
    if spec is None:
        return None
    shape, dtype, fill, inner, grid, codec = spec
    start = 0
    if first is not None and len(shape) > 1 and inner[0] == 1:
        start, stop, step = first.indices(shape[0])
        if step != 1 or stop <= start:
            raise ValueError(f"{path}: the first axis' range {first} is not a non-empty range of step 1")
        shape = (stop - start, *shape[1:])
    try:
        raw = fs.read_object(fs.join(path, "c", *(["0"] * len(shape))))  # on this thread, gs:// too
    except FileNotFoundError:  # nothing but the fill value was written
        raw = None
    if for_device and raw is None:
        return np.broadcast_to(np.asarray(fill, dtype), shape)
    if for_device:
        part = read_shuffled(raw, shape, dtype, fill, inner, grid, codec, alloc, first=start, what=path)
        if part is not None:
            return part
    out = (alloc or np.empty)(shape, dtype)
    if raw is None:
        out[...] = fill
        return out
    decode_into(raw, out, inner, grid, fill, what=path, codec=codec, first=start)
    return out


def _index(raw: bytes, n: int, what: str) -> np.ndarray:
    """The shard's index, (offset, bytes) of each of its ``n`` inner chunks, its checksum checked."""
    import google_crc32c

    size = len(raw)
    if size < 16 * n + 4:
        raise CorruptShard(f"{what}: shard of {size} bytes is shorter than its index")
    view = memoryview(raw)
    index = view[size - 16 * n - 4 : size - 4]
    if np.uint32(google_crc32c.value(bytes(index))).tobytes() != bytes(view[size - 4 :]):
        raise CorruptShard(f"{what}: the shard index's checksum does not match (a damaged object)")
    return np.frombuffer(index, "<u8").reshape(n, 2)


def decode_into(raw: bytes, out: np.ndarray, inner: tuple[int, ...], shard_grid: tuple[int, ...], fill: Any,
                what: str = "shard", codec: str = "zstd", first: int = 0) -> None:
    """Decode the shard ``raw`` (inner chunks of shape ``inner``, ``shard_grid`` of them per axis,
    indexed in C order, each compressed by ``codec``: ``"blosc"`` or ``"zstd"``) into ``out`` (the
    array, whose shape the shard covers; with ``first``, where inner chunks are one index of the
    first axis deep, ``out`` is that axis' indices ``first, first + 1, ...`` only, and the other
    chunks are not decoded)."""
    n = math.prod(shard_grid)
    size = len(raw)
    view = memoryview(raw)
    entries = _index(raw, n, what)
    if first and inner[0] != 1:
        raise ValueError(f"{what}: a range of the first axis is read only where inner chunks are one index deep")
    grid = [-(-s // c) for s, c in zip(out.shape, inner)]  # inner chunks that hold array pixels
    declared_size, decode, always_declared = _DECODERS[codec]
    whole = math.prod(inner) * out.dtype.itemsize
    for k, (offset, nbytes) in enumerate(entries.tolist()):
        pos = np.unravel_index(k, shard_grid)
        pos = (int(pos[0]) - first, *pos[1:])
        if pos[0] < 0 or any(p >= g for p, g in zip(pos, grid)):  # not wanted, or outside the array
            continue
        region = tuple(slice(p * c, min((p + 1) * c, s)) for p, c, s in zip(pos, inner, out.shape))
        dst = out[region]
        if offset == EMPTY and nbytes == EMPTY:
            dst[...] = fill
            continue
        if offset + nbytes > size - 16 * n - 4:
            raise CorruptShard(f"{what}: inner chunk {k} lies outside the shard's data")
        blob = view[offset : offset + nbytes]
        size_said = declared_size(blob)  # None: a zstd frame that does not say (decoded, then checked)
        if size_said is None and always_declared:
            raise CorruptShard(f"{what}: inner chunk {k} is not a whole {codec} frame (a damaged or truncated object)")
        if size_said is not None and size_said != whole:  # it would fill only part of its block
            raise CorruptShard(f"{what}: inner chunk {k}'s {codec} frame declares {size_said} bytes, not {whole}")
        try:
            # one band, whole rows: decoded in place (a band's rows are one contiguous block)
            if dst.flags.c_contiguous and dst.nbytes == whole and size_said == whole:
                decode(blob, dst)
                continue
            chunk = np.frombuffer(decode(blob, None), out.dtype)
        except (RuntimeError, ValueError) as exc:  # numcodecs: "Zstd decompression error: ...", blosc's
            raise CorruptShard(f"{what}: inner chunk {k}: {exc}") from None
        if chunk.size != math.prod(inner):
            raise CorruptShard(f"{what}: inner chunk {k} decodes to {chunk.size} values, not {math.prod(inner)}")
        dst[...] = chunk.reshape(inner)[tuple(slice(0, r.stop - r.start) for r in region)]


#: Blosc 1.x frame header flags (c-blosc's blosc.h) and its block split rule (blosc.c)
_SHUFFLE, _MEMCPYED, _BITSHUFFLE, _DONT_SPLIT, _LZ4_FORMAT = 0x1, 0x2, 0x4, 0x10, 1
_MAX_SPLITS, _MIN_BUFFERSIZE = 16, 128


def read_shuffled(raw: bytes, shape: tuple[int, ...], dtype: np.dtype, fill: Any, inner: tuple[int, ...],
                  grid: tuple[int, ...], codec: str, alloc: Callable | None = None, first: int = 0,
                  what: str = "shard") -> ShuffledPart | None:
    """The shard ``raw`` as a :class:`~gum_ray.shuffled.ShuffledPart`: each wanted inner chunk's LZ4
    streams decompressed in place into ``alloc((chunks, chunk bytes), uint8)``, not unshuffled.
    None where the array or a frame is not that layout (Blosc LZ4 with byte shuffle, one block size,
    values of more than one byte, chunks of one band and whole rows, not stored plain), or where
    no LZ4 decoder can be called (:func:`lz4_decoder`): the caller decodes it whole instead.
    A stream that does not decode to its size raises :class:`CorruptShard`."""
    k = dtype.itemsize
    if codec != "blosc" or k < 2 or len(shape) != 3 or inner[0] != 1 or inner[2] != shape[2] or grid[2] != 1:
        return None
    decoder = lz4_decoder()
    if decoder is None:
        return None
    entries = _index(raw, math.prod(grid), what)
    per_band = -(-shape[1] // inner[1])
    wanted = [(first + b) * grid[1] + r for b in range(shape[0]) for r in range(per_band)]
    chunk_bytes = inner[1] * inner[2] * k
    end = len(raw) - 16 * len(entries) - 4
    frames, blocksize = {}, None
    for i in wanted:
        offset, nbytes = entries[i].tolist()
        if offset == EMPTY and nbytes == EMPTY:
            continue
        if offset + nbytes > end or nbytes < 16:
            raise CorruptShard(f"{what}: inner chunk {i} lies outside the shard's data")
        head = raw[offset : offset + 16]
        flags, typesize, bs = head[2], head[3], int.from_bytes(head[8:12], "little")
        if blosc_frame_size(memoryview(raw)[offset : offset + nbytes]) != chunk_bytes or \
                flags & (_MEMCPYED | _BITSHUFFLE) or not flags & _SHUFFLE or flags >> 5 != _LZ4_FORMAT or \
                typesize != k or bs < k or bs % k or bs != (blocksize or bs):
            return None  # not this layout (e.g. an incompressible chunk stored plain): decoded whole
        blocksize = bs
        frames[i] = (offset, flags)
    if blocksize is None:  # nothing stored: the fill value only
        return None
    data = (alloc or np.empty)((len(wanted), chunk_bytes), np.dtype(np.uint8))
    if not data.flags.c_contiguous or data.dtype != np.uint8:  # LZ4 writes through its address
        raise ValueError(f"{what}: alloc gave a {data.dtype} array that is not C-contiguous")
    base = np.frombuffer(raw, np.uint8)
    filled = None
    for row, i in enumerate(wanted):
        if i in frames:
            offset, flags = frames[i]
            unpack_frame(base, offset, offset + int(entries[i][1]), flags, k, blocksize, data[row], decoder,
                         f"{what}: inner chunk {i}")
            continue
        if filled is None:  # not stored: the fill value, as its frame would decompress
            filled = shuffle(np.full(inner[1:], fill, dtype), blocksize)
        data[row] = filled
    return ShuffledPart(data, tuple(shape), dtype, inner[1], blocksize)


def unpack_frame(base: np.ndarray, offset: int, stop: int, flags: int, k: int, blocksize: int, out: np.ndarray,
                 decoder: Callable[[int, int, int, int], int], what: str) -> None:
    """Decompress the LZ4 streams of the Blosc frame ``base[offset:stop]`` (``flags`` from its
    header; values of ``k`` bytes, blocks of ``blocksize``) into ``out`` (uint8, the frame's size:
    each block's byte planes where Blosc's unshuffle would have read them). :class:`CorruptShard`
    where a block lies outside the frame or a stream does not decode to its size."""
    size = out.size
    nblocks = -(-size // blocksize)
    if offset + 16 + 4 * nblocks > stop:
        raise CorruptShard(f"{what}: its Blosc frame is shorter than its block table")
    src0, dst0 = base.ctypes.data, out.ctypes.data
    for j, at in enumerate(np.frombuffer(base, "<i4", nblocks, offset + 16).tolist()):
        bsize = min(blocksize, size - j * blocksize)
        # Blosc compresses a full block's planes apart (its split rule), a shorter last one whole
        splits = k if (not flags & _DONT_SPLIT and k <= _MAX_SPLITS and blocksize // k >= _MIN_BUFFERSIZE
                       and bsize == blocksize) else 1
        each = bsize // splits
        if at < 16 + 4 * nblocks:
            raise CorruptShard(f"{what}: its block {j} starts inside the frame's header")
        pos = offset + at
        for s in range(splits):
            if pos + 4 > stop:
                raise CorruptShard(f"{what}: its block {j} lies outside its frame")
            cb = int(base[pos : pos + 4].view("<i4")[0])
            pos += 4
            if cb < 0 or cb > stop - pos:
                raise CorruptShard(f"{what}: its block {j} lies outside its frame")
            at_out = j * blocksize + s * each
            if cb == each:  # stored as it was
                out[at_out : at_out + each] = base[pos : pos + cb]
            elif decoder(src0 + pos, dst0 + at_out, cb, each) != each:
                raise CorruptShard(f"{what}: its block {j} does not decompress to {each} bytes")
            pos += cb


@functools.lru_cache(maxsize=None)
def lz4_decoder() -> Callable[[int, int, int, int], int] | None:
    """LZ4's ``LZ4_decompress_safe(src, dst, compressed bytes, capacity)`` (bounded by its
    capacity; the GIL released while it runs) from the LZ4 that numcodecs' Blosc is built with, or
    the system's liblz4; None if neither can be called, or if it does not decode a frame Blosc
    made here as Blosc does (then every part is decompressed whole, by Blosc)."""
    import ctypes
    import ctypes.util

    from numcodecs import Blosc, blosc

    for lib in (blosc.__file__, ctypes.util.find_library("lz4")):
        try:
            fn = ctypes.CDLL(lib).LZ4_decompress_safe
        except (OSError, AttributeError, TypeError):
            continue
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
        fn.restype = ctypes.c_int
        # checked once on a frame Blosc makes here: 100,000 bytes at level 1 are a full block of
        # 64 KiB, split in planes, and a shorter last one, whole
        values = (np.arange(50_000, dtype=np.uint16) * 7 % 3001).reshape(10, 5_000)
        frame = np.frombuffer(Blosc(cname="lz4hc", clevel=1, shuffle=Blosc.SHUFFLE).encode(values), np.uint8)
        blocksize = int(frame[8:12].view("<u4")[0])
        got = np.empty(values.nbytes, np.uint8)
        try:
            unpack_frame(frame, 0, frame.size, int(frame[2]), 2, blocksize, got, fn, "a check")
        except CorruptShard:
            continue
        if np.array_equal(got, shuffle(values, blocksize)):
            return fn
    return None


def frame_content_size(frame: memoryview | bytes) -> int | None:
    """The decompressed size a zstd frame's header declares (RFC 8878, 3.1.1.1), or None when the
    header does not carry it or is not a zstd frame's."""
    head = bytes(frame[:18])
    if len(head) < 6 or head[:4] != b"\x28\xb5\x2f\xfd":
        return None
    descriptor = head[4]
    fcs_flag, single_segment, did_flag = descriptor >> 6, (descriptor >> 5) & 1, descriptor & 3
    at = 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[did_flag]
    width = (1 if single_segment else 0) if fcs_flag == 0 else (2, 4, 8)[fcs_flag - 1]
    if width == 0 or len(head) < at + width:
        return None
    value = int.from_bytes(head[at : at + width], "little")
    return value + 256 if width == 2 else value


def blosc_frame_size(frame: memoryview | bytes) -> int | None:
    """The decompressed size a Blosc (1.x) frame's 16-byte header declares, or None when it is not
    such a header or its compressed size is not the frame's own length (a truncated or damaged
    frame: Blosc trusts that field, so it is checked before decoding)."""
    head = bytes(frame[:16])
    if len(head) < 16 or head[0] not in (1, 2):
        return None
    nbytes, _blocksize, cbytes = np.frombuffer(head[4:16], "<u4").tolist()
    return nbytes if cbytes == len(frame) else None


def _blosc_decode(blob: memoryview, out: np.ndarray | None) -> Any:
    from numcodecs import blosc

    return blosc.decompress(blob, out)


def _zstd_decode(blob: memoryview, out: np.ndarray | None) -> Any:
    import numcodecs

    return numcodecs.Zstd().decode(blob, out=out)


#: codec name in zarr.json -> (the size a frame declares, decode(frame, out or None), whether
#: every whole frame declares it)
_DECODERS: dict[str, tuple[Callable[[Any], int | None], Callable[[Any, Any], Any], bool]] = {
    "blosc": (blosc_frame_size, _blosc_decode, True),
    "zstd": (frame_content_size, _zstd_decode, False),
}
