"""The imagery cache: fetched imagery per (year, cell) on its UTM grid (DESIGN.md decision 6).

Imagery is written here before inference, so a crash, a new checkpoint or a new stride never costs
Earth Engine quota twice. :meth:`ImageryCache.put` takes and :meth:`ImageryCache.get` returns an
:class:`~gum_ray.imagery.Imagery` (its compact parts are what is stored). Layout (``<root>`` local or ``gs://``)::

    <root>/gum_imagery_cache.json           marks the folder as a gum-ray imagery cache
    <root>/<key>/                           one folder per source and recipe (the source's
                                            ``cache_key()``: name, recipe version, 11/14 bands,
                                            server or input): imagery is reused only where the
                                            same source would fetch the same pixels
    <root>/<key>/<year>/<cell_id>/          one Zarr v3 group per (year, cell):
        s2, s1, terrain[, products]          compact integer bands (bands.encode_compact):
                                             uint16 reflectance x 10000, int16 dB x 100,
                                             int16 terrain (m, centi-degrees), uint8 products
        s2_mask, s1_mask, terrain_mask       uint8 validity (1 = value present; the more
                                             common byte is the fill value, not stored)
        zarr.json attributes                 geobox (CRS WKT, affine, shape), provenance,
                                             band names, "complete": true (written last)

Each array is one shard (one object) of inner chunks of one band and 512 whole rows, Blosc LZ4HC
with byte shuffle, so a cell costs about 7 objects, a reader can fetch a block of rows, and each
inner chunk decompresses in place into the array it is read into (:mod:`gum_ray.store.shards`).
Entries written earlier (zstd; inner chunks of all bands and 512 rows, or 512 x 512 px) still read,
through the same reader or Zarr. Why LZ4HC: it decodes 2-4x faster than zstd on one thread, which
is what keeps a GPU fed when a cached continent is mapped again, for about the same bytes on real
imagery (docs/performance.md, "A faster cache codec").
``has`` is true only once the group's attributes say ``complete`` (written after every array), so
a half-written entry is never used; an entry found damaged is removed, so it is fetched again.

A mapping job deletes a cell's entry once the cell is committed unless it keeps the cache
(``gum map --keep-cache``: to map the same imagery again with another model or settings without
fetching it again); the entries of cells not yet committed stay, so a resumed run never refetches.
"""

from __future__ import annotations

import datetime as _dt
import json
from typing import Any, Callable, Mapping

import numpy as np

from gum_ray.bands import COMPACT_ENCODING_VERSION, export_band_names
from gum_ray.errors import InputError
from gum_ray.grid import Cell, geobox_from_dict, geobox_to_dict
from gum_ray.imagery import COMPACT_PARTS, Imagery
from gum_ray.shuffled import ShuffledPart
from gum_ray.store import fs
from gum_ray.store.shards import CorruptShard, read_array
from gum_ray.version import __version__

CACHE_MARKER = "gum_imagery_cache.json"
CACHE_VERSION = 1
INNER_CHUNK = 512
#: the inner chunks' codec: Blosc LZ4HC at level 5 with byte shuffle (a slower encode, once per
#: fetched cell, for a decode that a model actor repeats each time the cell is mapped)
CODEC = {"cname": "lz4hc", "clevel": 5}


class ImageryCache:
    """The imagery cache at ``root`` (local folder or gs://)."""

    def __init__(self, root: str, key: str | None = None):
        """The cache at ``root``; entries under ``<root>/<key>/`` (``key`` None: directly under root)."""
        self.root = fs.normalize(root)
        if key is not None and (not key or "/" in key or key.startswith(".")):
            raise InputError(f"imagery cache key {key!r}: expected a plain folder name")
        self.key = key
        marker = fs.join(self.root, CACHE_MARKER)
        if not fs.exists(marker):
            if not fs.is_remote(self.root) and fs.exists(self.root) and fs.list_names(self.root):
                raise InputError(
                    f"{self.root} is not empty and not a gum-ray imagery cache (no {CACHE_MARKER}); "
                    f"give an empty or new folder for the cache"
                )
            fs.create_only(marker, json.dumps({"format": "gum-ray-imagery-cache", "version": CACHE_VERSION}).encode())

    @property
    def base(self) -> str:
        """The folder that holds this key's entries."""
        return self.root if self.key is None else fs.join(self.root, self.key)

    def path(self, year: int, cell: Cell) -> str:
        return fs.join(self.base, str(int(year)), cell.id)

    def size(self) -> tuple[int, int]:
        """(objects, bytes) of this key's entries."""
        return fs.du(self.base)

    def _group(self, year: int, cell: Cell, mode: str) -> Any:
        import zarr

        store = fs.zarr_store(self.path(year, cell), read_only=(mode == "r"))
        return zarr.open_group(store, mode=mode, zarr_format=3)

    def has(self, year: int, cell: Cell) -> bool:
        """True when a complete entry for (year, cell) is cached."""
        return self._complete_attrs(year, cell) is not None

    def _complete_attrs(self, year: int, cell: Cell) -> dict[str, Any] | None:
        """The entry's attributes if it is complete and in this version's encodings, else None."""
        try:
            attrs = self.attrs(year, cell)
        except FileNotFoundError:
            return None
        # an entry in another version of the compact encodings is refetched, never misread
        complete = bool(attrs.get("complete")) and attrs.get("encoding_version") == COMPACT_ENCODING_VERSION
        return attrs if complete else None

    def cells(self, year: int) -> list[str]:
        """Ids of cells with an entry (complete or not) for ``year``."""
        return [n for n in fs.list_names(fs.join(self.base, str(int(year)))) if n.startswith("r")]

    def put(self, year: int, cell: Cell, imagery: Imagery) -> None:
        """Cache the imagery of (year, cell) (on its UTM grid, ``cell.utm_geobox(halo)``).

        Stored as its compact parts (:meth:`~gum_ray.imagery.Imagery.to_compact`). Overwrites a
        previous entry.
        """
        if not isinstance(imagery, Imagery):
            raise InputError(f"imagery for cell {cell.id}: expected an Imagery, got {type(imagery).__name__}")
        self.put_compact(year, cell, imagery.to_compact(), imagery.geobox, imagery.provenance)

    def put_compact(
        self,
        year: int,
        cell: Cell,
        parts: Mapping[str, np.ndarray],
        geobox: Any,
        provenance: Mapping[str, Any] | None = None,
    ) -> None:
        """Cache already-encoded compact parts (:data:`~gum_ray.imagery.COMPACT_PARTS`)."""
        from zarr.codecs import BloscCodec

        missing = {"s2", "s2_mask", "s1", "s1_mask", "terrain", "terrain_mask"} - set(parts)
        if missing:
            raise InputError(f"imagery for cell {cell.id}: compact parts {sorted(missing)} are missing")
        g = self._group(year, cell, "w")
        for name in COMPACT_PARTS:
            if name not in parts:
                continue
            arr = np.ascontiguousarray(parts[name])
            nb, h, w = arr.shape
            # inner chunks of one band and whole rows: a model actor reads whole cells, and each
            # such chunk is one contiguous block of the array it is read into, so it decompresses
            # in place (gum_ray.store.shards), with no copy (docs/performance.md)
            ch = (1, min(INNER_CHUNK, h), w)
            shard = (nb, -(-h // ch[1]) * ch[1], w)
            codec = BloscCodec(**CODEC, typesize=arr.dtype.itemsize,
                               shuffle="shuffle" if arr.dtype.itemsize > 1 else "noshuffle")
            # a mask's fill value is its more common byte (1 where most pixels have the input, 0
            # where most lack it, e.g. no Sentinel-1): inner chunks of only that byte, most of a
            # cell's, are not stored, and a reader fills them rather than decompressing them
            fill = int(np.count_nonzero(arr) * 2 >= arr.size) if name.endswith("_mask") else 0
            z = g.create_array(
                name, shape=arr.shape, dtype=arr.dtype, chunks=ch, shards=shard,
                fill_value=fill, compressors=[codec],
                dimension_names=["band", "y", "x"],
            )
            z[...] = arr
        g.attrs.update(
            {
                "year": int(year),
                "cell_id": cell.id,
                "geobox": geobox_to_dict(geobox),
                "band_names": list(export_band_names("products" in parts)),
                "encoding": "gum_ray.bands.encode_compact",
                "encoding_version": COMPACT_ENCODING_VERSION,
                "provenance": json.loads(json.dumps(dict(provenance or {}), default=str)),
                "software_version": __version__,
                "cached_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "complete": True,
            }
        )

    def get(self, year: int, cell: Cell) -> Imagery:
        """The cached entry of (year, cell); :class:`InputError` if it is not cached (completely)."""
        parts, geobox, provenance = self.get_compact(year, cell)
        return Imagery.from_compact(parts, geobox, provenance)

    def get_compact(self, year: int, cell: Cell, alloc: Callable[[tuple[int, ...], np.dtype], np.ndarray] | None = None,
                    bands: Mapping[str, slice] | None = None, for_device: bool = False
                    ) -> tuple[dict[str, np.ndarray | ShuffledPart], Any, dict[str, Any]]:
        """The cached entry of (year, cell) as stored: its compact integer parts
        (:data:`~gum_ray.imagery.COMPACT_PARTS`, decompressed, not decoded), GeoBox and provenance.

        What a model actor uploads to its device (:meth:`gum_ray.inference.InferenceEngine.prepare_compact`).
        Each part is one object read and decompressed in place (:func:`gum_ray.store.shards.read_array`,
        into ``alloc(shape, dtype)`` if given), or through Zarr for a layout that reader does not take.
        ``bands``: part -> the range of its bands wanted (the engine's
        :meth:`~gum_ray.inference.InferenceEngine.compact_bands`); where the entry's layout allows it
        (one band per inner chunk) only those are decompressed and the part holds only them, else
        the part is whole. ``for_device``: the parts go to a GPU, which finishes their decoding
        (:func:`~gum_ray.store.shards.read_array`): a value part of the cache's layout comes back
        as its LZ4 streams decompressed and still byte-shuffled
        (:class:`~gum_ray.shuffled.ShuffledPart`), a part of only its fill value as a broadcast of
        it; masks and other layouts as arrays.
        :class:`InputError` if it is not cached (completely).
        """
        path = self.path(year, cell)
        attrs = self._complete_attrs(year, cell)  # read once: the check and the GeoBox
        if attrs is None:
            raise InputError(
                f"imagery for year {year}, cell {cell.id} is not in the cache {self.root}; fetch it first"
            )
        present = set(fs.list_names(path))
        parts: dict[str, np.ndarray | ShuffledPart] = {}
        group = None  # opened for a part the direct reader does not take, once
        for name in COMPACT_PARTS:
            if name not in present:
                continue
            try:
                a = read_array(fs.join(path, name), alloc, (bands or {}).get(name), for_device)
            except FileNotFoundError:  # its zarr.json is gone: a deletion cut short (below)
                continue
            except CorruptShard as exc:
                # a damaged object (storage, or a write cut short outside gum-ray's order): never
                # used; removed, so the cell's next attempt fetches it again
                self.delete(year, cell)
                why = str(exc).removeprefix(fs.join(path, name) + ": ")
                raise InputError(
                    f"the cached imagery of year {year}, cell {cell.id} was damaged and is removed; it is "
                    f"fetched again on the next attempt ({name}: {why})"
                ) from None
            if a is None:  # a layout the direct reader does not take: Zarr reads it
                if group is None:
                    group = self._group(year, cell, "r")
                a = np.asarray(group[name][...])
            parts[name] = a
        missing = [n for n in ("s2", "s2_mask", "s1", "s1_mask", "terrain", "terrain_mask") if n not in parts]
        if missing:
            # marked complete but a part is gone (its deletion was cut short): never used; removed,
            # so the cell's next attempt fetches it again
            self.delete(year, cell)
            raise InputError(
                f"the cached imagery of year {year}, cell {cell.id} lacked {', '.join(missing)} "
                f"(a deletion cut short); removed, it is fetched again on the next attempt"
            )
        return parts, geobox_from_dict(attrs["geobox"]), attrs.get("provenance", {})

    def attrs(self, year: int, cell: Cell) -> dict[str, Any]:
        """The attributes of the entry of (year, cell): band names, encoding, times, provenance."""
        return dict(json.loads(fs.read_bytes(fs.join(self.path(year, cell), "zarr.json"))).get("attributes", {}))

    def delete(self, year: int, cell: Cell) -> None:
        """Remove the entry of (year, cell) (e.g. to refetch it).

        Its ``zarr.json`` (which marks it complete) goes first: a deletion cut short (a node lost
        mid-way) leaves an incomplete entry, which :meth:`has` reports as absent, so it is fetched
        again, never read with parts missing.
        """
        fs.remove(fs.join(self.path(year, cell), "zarr.json"))
        fs.remove(self.path(year, cell), recursive=True)
