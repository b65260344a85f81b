"""A cached part's bytes as Blosc leaves them before its last step, the unshuffle; undone on the
engine's device (numpy or torch, the same arithmetic).

Blosc's byte shuffle (the imagery cache's codec, :mod:`gum_ray.store.cache`) stores each block of
an inner chunk as its values' first bytes, then their second bytes, ...: the planes compress
apart. Decompressing is two passes on the host: the LZ4 streams, then the unshuffle, which puts
each value's bytes back together (about a third of the host's decompression time on a cell of
Sentinel-2 and Sentinel-1 integers, ``docs/performance.md``). Beside a GPU the host does the first
only (:func:`gum_ray.store.shards.read_array` with ``for_device=True``): the planes go up as they
are, and the device, which has bandwidth to spare, unshuffles them (:func:`unshuffle`, two copy
kernels per part).

Layout (the cache's since issue 14): inner chunks of one band and ``chunk_rows`` whole rows, each
one Blosc frame of the same block size; :attr:`ShuffledPart.data` holds the chunks of the bands
read, in order (band, then rows), each whole as Blosc decoded it (the last rows of a band padded as
Zarr padded them); within a chunk, full blocks of ``blocksize`` bytes and a shorter last block,
each shuffled on its own (a block of ``n`` values of ``k`` bytes: ``k`` planes of ``n`` bytes;
whole values only, since the block size is a multiple of ``k``, as Blosc makes it).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class ShuffledPart:
    """A part of ``shape`` (bands, rows, cols) and ``dtype`` whose bytes are still byte-shuffled
    per Blosc block (see the module's notes). ``data`` (numpy uint8 or a torch uint8 tensor, on
    any device) is (chunks, chunk bytes)."""

    data: Any
    shape: tuple[int, int, int]
    dtype: np.dtype
    chunk_rows: int
    blocksize: int

    @property
    def chunk_bytes(self) -> int:
        return self.chunk_rows * self.shape[2] * self.dtype.itemsize

    @property
    def chunks_per_band(self) -> int:
        return -(-self.shape[1] // self.chunk_rows)

    def __post_init__(self):
        k = self.dtype.itemsize
        if len(self.shape) != 3 or min(self.shape) < 1 or self.chunk_rows < 1 or self.blocksize < k or \
                self.blocksize % k:
            raise ValueError(f"not a shuffled part's layout: shape {self.shape}, {self.chunk_rows} rows a chunk, "
                             f"blocks of {self.blocksize} bytes for {k}-byte values")
        want = (self.shape[0] * self.chunks_per_band, self.chunk_bytes)
        if tuple(self.data.shape) != want:
            raise ValueError(f"a shuffled part of shape {self.shape} holds {want} bytes, not {tuple(self.data.shape)}")


def unshuffle(part: ShuffledPart):
    """The part's array (bands, rows, cols) of its dtype: a numpy array for numpy data, else a
    torch tensor on the data's device (the padded rows of each band's last chunk dropped by a
    view; a band's rows stay one contiguous block). The same slicing for both: one transposing
    copy for the full blocks of every chunk, one for the last blocks."""
    k, nbytes, bs = part.dtype.itemsize, part.chunk_bytes, part.blocksize
    data = part.data
    n = data.shape[0]
    numpy = isinstance(data, np.ndarray)
    if numpy:
        out = np.empty_like(data)
    else:
        import torch

        out = torch.empty_like(data)
    full = nbytes // bs
    for at, blocks, size in ((0, full, bs), (full * bs, 1, nbytes - full * bs)):
        if blocks and size:  # (chunks, blocks, k planes, values) -> (chunks, blocks, values, k)
            out[:, at : at + blocks * size].reshape(n, blocks, size // k, k)[...] = \
                data[:, at : at + blocks * size].reshape(n, blocks, k, size // k).swapaxes(2, 3)
    values = out.view(part.dtype if numpy else _torch_dtype(part.dtype))
    bands, rows, cols = part.shape
    return values.reshape(bands, part.chunks_per_band * part.chunk_rows, cols)[:, :rows]


def shuffle(values: np.ndarray, blocksize: int) -> np.ndarray:
    """Blosc's per-block byte shuffle of ``values`` (one chunk, C order) as uint8 bytes: what its
    frame decompresses to before the unshuffle (a chunk that is not stored, filled with the fill
    value; and the tests' reference)."""
    k = values.dtype.itemsize
    raw = np.ascontiguousarray(values).reshape(-1).view(np.uint8)
    out = np.empty_like(raw)
    full = raw.size // blocksize
    for at, blocks, size in ((0, full, blocksize), (full * blocksize, 1, raw.size - full * blocksize)):
        if blocks and size:  # (blocks, values, k) -> (blocks, k planes, values)
            out[at : at + blocks * size].reshape(blocks, k, size // k)[...] = \
                raw[at : at + blocks * size].reshape(blocks, size // k, k).swapaxes(1, 2)
    return out


def _torch_dtype(dtype: np.dtype):
    import torch

    return torch.from_numpy(np.empty(0, dtype)).dtype

