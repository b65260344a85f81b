"""Overlap-blend tiled inference of a GUM model: batched, mixed precision, bounded memory.

The engine knows a model only through :class:`gum_ray.network.UrbanModel` (its input channels,
preprocessing, validity and a forward on a batch of crops), so every model family runs through it
the same way. :meth:`InferenceEngine.predict_imagery` takes an :class:`~gum_ray.imagery.Imagery` and
returns a :class:`~gum_ray.imagery.Prediction` on the same grid.

The network always sees 256 x 256 crops (the training crop; the PSP head pools over the whole crop,
so a prediction depends on the crop's extent). Crop positions follow mmsegmentation's slide
inference exactly: ``0, s, 2s, ...`` along each axis, the last crop pulled back to end at the image
edge. Images smaller than a crop are padded (reflect) up to 256 px; the padding is cropped off the
output. Nothing is ever required to be a multiple of 16.

Two ways to merge overlapping crops:

* ``merge="probability"`` (default): each crop's softmax P(urban) is weighted by a smooth 2-D
  window (Hann, floored so the image edge keeps a weight) and the weighted mean is taken.
* ``merge="logits"``: logits are averaged with equal weights, as mmsegmentation's
  ``slide_inference`` does. With ``stride=256`` and fp32 this reproduces mmseg's own path (the seed
  notebook's) to the pixel: :meth:`InferenceSettings.seed`.

Memory is bounded whatever the scene size: the engine walks crop rows top to bottom, keeps only the
input rows and accumulator rows that pending crops still touch, and hands finished rows to the caller
(:meth:`InferenceEngine.predict_rows`). Only one batch of crops is on the device at a time.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch

from gum_ray.devices import (as_device_tensor, cpu_supports_bf16, default_batch_size,  # noqa: F401 - re-exported
                             default_channels_last, one_malloc_arena, resolve_device, resolve_precision,
                             retain_freed_memory)
from gum_ray.errors import InputError
from gum_ray.imagery import NODATA, Imagery, Prediction, probability_to_uint8  # noqa: F401 - re-exported
from gum_ray.network import UrbanModel, as_model, flops_per_crop  # noqa: F401 - re-exported
from gum_ray.shuffled import ShuffledPart, unshuffle
from gum_ray.tiling import (CROP, DEFAULT_STRIDE, InferenceSettings, Precision,  # noqa: F401 - re-exported
                            crop_count, crop_starts)
from gum_ray.unet import conv_before_upsample, fold_batchnorm
from gum_ray.winograd import use_winograd

log = logging.getLogger(__name__)

WINDOW_FLOOR = 0.02


def window_1d(kind: str, crop: int = CROP) -> np.ndarray:
    """The blending window along one axis (the 2-D window is its outer product)."""
    if kind == "none":
        return np.ones(crop, np.float32)
    i = np.arange(crop, dtype=np.float64)
    return (WINDOW_FLOOR + (1.0 - WINDOW_FLOOR) * np.sin(np.pi * (i + 0.5) / crop) ** 2).astype(np.float32)


def window_2d(kind: str, crop: int = CROP) -> np.ndarray:
    w1 = window_1d(kind, crop)
    return np.outer(w1, w1)


class _Forward(torch.nn.Module):
    """A model's forward on a batch of full crops, as a module (what ``torch.compile`` takes)."""

    def __init__(self, model: UrbanModel):
        super().__init__()
        self.net = model.module
        self._model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._model.forward(x)


@dataclasses.dataclass
class _Scene:
    """One scene's state in :meth:`InferenceEngine.predict_scenes`."""

    key: Any
    x: torch.Tensor  # (C, hp, wp) network input on the device, padded to at least a crop
    height: int
    width: int
    crops: list[tuple[int, int]]
    acc: torch.Tensor  # (K, hp, wp)
    weight: torch.Tensor  # (hp, wp), separable: outer(wy, wx)
    valid: torch.Tensor | None
    done: int = 0
    # off a CPU (InferenceEngine._gather): every crop's rows (N, 256, 1) and columns (N, 1, 256) on
    # the device, so a batch's crops are cut by one gather and blended by one scatter
    rows: torch.Tensor | None = None
    cols: torch.Tensor | None = None
    taken: int = 0  # crops handed to a batch so far (a scene's crops go in order)


class InferenceEngine:
    """Runs a model (:class:`~gum_ray.network.UrbanModel`) over whole scenes with :class:`InferenceSettings`.

    ``model`` may also be a bare GUM 1 network (an mmseg module), which is wrapped.

    The arithmetic runs on the engine's device, CPU or GPU alike: decoding compact integers
    (:meth:`predict_compact`), the model's preprocessing (its ``preprocess`` on tensors), cutting
    crops into a batch buffer that is reused (on a CPU one copy a crop; off it one gather a batch),
    the forward, blending (adds into an accumulator: per crop on a CPU, one scatter a batch off it;
    the weights are separable, ``outer(wy, wx)``, never accumulated) and thresholding. Only uint8
    (or float16) results come back to the host.
    """

    def __init__(self, model: UrbanModel | torch.nn.Module, settings: InferenceSettings | None = None):
        self.settings = settings or InferenceSettings()
        self.device = resolve_device(self.settings.device)
        self.autocast_dtype = resolve_precision(self.settings.precision, self.device)
        channels_last = self.settings.channels_last
        if channels_last is None:
            channels_last = default_channels_last(self.device, self.autocast_dtype)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        fold = self.settings.fold_bn if self.settings.fold_bn is not None else channels_last
        self.model = as_model(model)
        if self.settings.notebook_preprocessing and hasattr(self.model, "as_notebook"):
            self.model = self.model.as_notebook()  # a family whose default differs from its notebook
        winograd = self.settings.winograd
        fp32_cpu = self.device.type == "cpu" and self.autocast_dtype is None
        if winograd is None:  # torch.compile chooses its own kernels
            winograd = fold and fp32_cpu and not self.settings.compile
        elif winograd and not fp32_cpu:
            raise InputError("winograd on takes fp32 on a CPU only; use precision fp32 with device cpu, "
                             "or leave it on auto", param=("winograd", "precision", "device"))
        self.folded = self.winograd_convs = 0
        if fold or winograd:  # on a copy: the caller's model keeps its weights
            self.model = copy.deepcopy(self.model)
        if fold:
            self.folded = fold_batchnorm(self.model.module)
            conv_before_upsample(self.model.module)  # folded InterpConvs: 1 x 1 conv at 1/4 the pixels
        if winograd:  # the deep 3 x 3 convs: 1.3x less time per crop on an AVX2 CPU (docs/performance.md)
            self.winograd_convs = use_winograd(self.model.module, keep_weights=False)  # held once, transformed
        self.model.module.to(self.device).eval()
        self.model.module.to(memory_format=self.memory_format)
        self.in_channels = int(self.model.in_channels)
        self.batch_size = self.settings.batch_size or default_batch_size(self.device)
        forward = _Forward(self.model)
        self._forward = torch.compile(forward, dynamic=False) if self.settings.compile else forward
        self._w1 = window_1d(self.settings.window)  # on the host (_axis_weight)
        w1 = torch.from_numpy(self._w1).to(self.device)
        self._window = torch.outer(w1, w1)
        self._batch: torch.Tensor | None = None
        self._copy_stream = None  # CUDA: the stream cells are uploaded on (_upload_parts)
        self._tables: torch.Tensor | None = None  # code tables (prepare_compact), made on first use
        self._tables_made = False
        self._by_band: tuple | None = None  # the tables as a CPU looks bands up (_present_tables)
        # a CPU branches on each band's mask per row block; a GPU would sync on every branch, so it
        # looks every band up through the whole table (the tests run both on a CPU)
        self._by_mask = self.device.type == "cpu"
        # likewise a CPU cuts and blends crop by crop (a copy and an add each, which stay in cache);
        # a GPU's host would launch two kernels a crop, so it cuts a batch's crops of a scene by one
        # gather and blends them by one scatter-add (the tests run both on a CPU)
        self._gather = self.device.type != "cpu"
        self._sources: tuple[tuple[str, int], ...] = ()
        self.crops_run = 0
        #: seconds spent per stage (the host's view: on CUDA, kernels are asynchronous)
        self.stage_s: dict[str, float] = collections.defaultdict(float)
        if self.device.type == "cpu":
            retain_freed_memory()

    def to_device(self, a: np.ndarray | torch.Tensor) -> torch.Tensor:
        """``a`` as a tensor on the engine's device (uploaded once: pinned and asynchronous on CUDA)."""
        return as_device_tensor(a, self.device)

    def to_host(self, t: torch.Tensor) -> np.ndarray:
        """A device tensor's values as a numpy array. From a GPU into page-locked memory, so the
        copy is the GPU's DMA, with no host copy through a staging buffer (the host's work for a
        cell's results is then a launch and a wait); on the CPU the tensor's own memory."""
        if t.device.type != "cuda":
            return t.cpu().numpy()
        out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        out.copy_(t, non_blocking=True)
        torch.cuda.current_stream(t.device).synchronize()
        return out.numpy()  # the array holds the tensor (and its pinned block) while it lives

    # -- the network on one batch ---------------------------------------------------------
    def _batch_buffer(self) -> torch.Tensor:
        if self._batch is None:
            self._batch = torch.empty((self.batch_size, self.in_channels, CROP, CROP), device=self.device
                                      ).contiguous(memory_format=self.memory_format)
        return self._batch

    @torch.inference_mode()
    def _run_batch(self, crops: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(B, C, 256, 256) float32 -> per-crop scores on the device (B, K, 256, 256) float32.

        K = 2 logits for merge="logits"; K = 1 window-weighted P(urban) for merge="probability".
        """
        x = as_device_tensor(crops, self.device).contiguous(memory_format=self.memory_format)
        return self._scores(x)

    def _scores(self, x: torch.Tensor) -> torch.Tensor:
        t = time.perf_counter()
        if self.autocast_dtype is not None:
            with torch.autocast(self.device.type, dtype=self.autocast_dtype):
                logits = self._forward(x)
        else:
            logits = self._forward(x)
        logits = logits.float()
        self.crops_run += x.shape[0]
        if self.settings.merge == "logits":
            out = logits
        else:
            out = torch.softmax(logits, dim=1)[:, 1:2] * self._window
        self.stage_s["forward"] += time.perf_counter() - t
        return out

    def _run_views(self, views: list[torch.Tensor]) -> torch.Tensor:
        """Crops given as (C, 256, 256) views of device tensors -> scores; one device copy each into
        the reused batch buffer, no host copy."""
        t = time.perf_counter()
        buf = self._batch_buffer()[: len(views)]
        for j, v in enumerate(views):
            buf[j].copy_(v)
        self.stage_s["crop"] += time.perf_counter() - t
        return self._scores(buf)

    # -- geometry -------------------------------------------------------------------------
    def _geometry(self, height: int, width: int, origin) -> tuple[int, int, list[int], list[int]]:
        s = self.settings
        hp, wp = max(height, CROP), max(width, CROP)
        oy, ox = origin if origin is not None else (None, None)
        return hp, wp, crop_starts(hp, s.stride, origin=oy), crop_starts(wp, s.stride, origin=ox)

    def _axis_weight(self, n: int, starts: list[int]) -> torch.Tensor:
        """Sum over the crops of an axis of the 1-D window (a count for merge="logits"), on the
        device: summed on the host (float32, the same sums in the same order; a few dozen small
        adds a scene that would otherwise each be a launch) and uploaded once."""
        w = np.zeros(n, dtype=np.float32)
        w1 = self._w1 if self.settings.merge == "probability" else np.ones(CROP, np.float32)
        for a in starts:
            w[a : a + CROP] += w1
        return self.to_device(w)

    def _finish(self, acc: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Blended scores / weights -> (P(urban) float32, class uint8), on the device."""
        if self.settings.merge == "logits":
            mean = acc / weight  # as mmseg: sum of logits / count
            label = (mean[1] > mean[0]).to(torch.uint8)  # argmax, ties -> class 0
            prob = torch.softmax(mean, dim=0)[1]
        else:
            prob = (acc[0] / weight).clamp_(0.0, 1.0)  # the weights' sum is a product: 1 ulp off
            label = (prob > 0.5).to(torch.uint8)
        return prob, label

    # -- whole scenes ---------------------------------------------------------------------
    def predict(self, x: np.ndarray | torch.Tensor, origin: tuple[int, int] | None = None) -> Prediction:
        """Predict a preprocessed scene (C, H, W) float32 held in memory (numpy, or a tensor).

        ``origin`` = (row, col) of the scene's first pixel on a larger pixel grid: crops are then
        placed on that grid's stride lattice (see :func:`crop_starts`), so overlapping scenes of one
        grid (neighbouring cells with their halos) agree where they overlap.
        """
        self._check_input(tuple(x.shape))
        (_, prob, label), = self.predict_scenes([(None, x, None, origin)])
        return Prediction(prob.cpu().numpy(), label.cpu().numpy())

    def predict_imagery(self, imagery: Imagery, origin: tuple[int, int] | None = None) -> Prediction:
        """Predict imagery on its grid: the model's preprocessing, no data where the model says so.

        Returns a :class:`Prediction` on ``imagery.geobox`` whose probability is NaN (and class 0)
        where the model does not map the pixel (its :meth:`~gum_ray.network.UrbanModel.validity`);
        the network does not run when no pixel is mapped. The prediction carries the imagery's
        input quality (which inputs each pixel had), whatever the model mapped. ``origin``: see
        :meth:`predict`.
        """
        valid = self.model.validity(imagery.export)
        quality = imagery.input_quality()
        if not valid.any():
            shape = tuple(imagery.geobox.shape)
            return Prediction(np.full(shape, np.nan, np.float32), np.zeros(shape, np.uint8), imagery.geobox,
                              quality=quality)
        pred = self.predict(self.model.preprocess(imagery.export), origin=origin)
        return Prediction(pred.probability, pred.label, imagery.geobox, quality=quality).masked(valid)

    def prepare_compact(self, parts: dict[str, np.ndarray | torch.Tensor | ShuffledPart],
                        rows_per_block: int | None = None, quality: bool = False) -> tuple[torch.Tensor, ...]:
        """Compact integer parts (:data:`gum_ray.imagery.COMPACT_PARTS`, as cached) -> the network
        input (C, H, W) float32 and the model's validity (H, W) bool, on the engine's device; with
        ``quality``, also the pixels' input quality (H, W) uint8
        (:func:`gum_ray.imagery.compact_input_quality`, from the masks already uploaded). A value
        part may hold just the bands :meth:`compact_bands` names for it (as the imagery cache reads
        them for this engine) or all of them, and may come still byte-shuffled (unshuffled here).
        On a CPU running channels_last the input's memory is pixel-major (a (C, H, W) view of an
        (H, W, C) tensor), so crops copy into the channels_last batch without a transpose.

        The integers are uploaded once; decoding (:func:`gum_ray.bands.decode_compact`) and the
        model's own ``preprocess`` and ``validity`` run on the device, in row blocks
        (``rows_per_block``: 64 on a CPU, where they stay in cache; elsewhere the whole cell at
        once, so a GPU's host launches a few dozen kernels a cell, not thousands); for a family
        whose channels each come from one band (``channel_sources``, GUM 1) as one table lookup per
        channel (:func:`gum_ray.bands.code_tables`; on a CPU by what each band's mask holds in the
        block, :meth:`_lookup_bands`). The values equal the numpy path's
        (``model.preprocess(decode_compact(parts))``) either way.
        """
        from gum_ray.bands import code_index, decode_compact

        t = time.perf_counter()
        dev = self._upload_parts(parts)
        self.stage_s["upload"] += time.perf_counter() - t
        t = time.perf_counter()
        _, h, w = dev["s2"].shape
        rows_per_block = min(h, rows_per_block or (64 if self.device.type == "cpu" else h))
        # pixel-major on a CPU running channels_last (the docstring; docs/performance.md): each
        # block is looked up channel-major into ``block`` and transposed once, while in cache
        hwc = self.device.type == "cpu" and self.memory_format == torch.channels_last
        if hwc:
            x = torch.empty((h, w, self.in_channels), dtype=torch.float32, device=self.device).permute(2, 0, 1)
        else:
            x = torch.empty((self.in_channels, h, w), dtype=torch.float32, device=self.device)
        valid = torch.empty((h, w), dtype=torch.bool, device=self.device)
        tables = self._code_tables()
        by_band = self._present_tables() if tables is not None and self._by_mask else None
        # a per-band family: per part, the table entries of the bands its channels read (one
        # int32 pass each), then one lookup per channel; no float export in between
        reads: dict[str, list[tuple[int, int]]] = collections.defaultdict(list)
        for c, (part, band) in enumerate(self._sources):
            reads[part].append((c, band))
        spans = self.compact_bands() or {}
        # a part read as just its span (compact_bands) holds band span.start first
        first = {part: sp.start if dev[part].shape[0] == sp.stop - sp.start else 0 for part, sp in spans.items()}
        if tables is not None:
            index = {part: torch.empty((sp.stop - sp.start, rows_per_block, w), dtype=torch.int32, device=self.device)
                     for part, sp in spans.items()}
            s2_valid = torch.empty((rows_per_block, w), dtype=torch.uint8, device=self.device)
            block = torch.empty((self.in_channels, rows_per_block, w), dtype=torch.float32, device=self.device) \
                if hwc else None
        with torch.inference_mode():
            for a in range(0, h, rows_per_block):
                rows = slice(a, min(a + rows_per_block, h))
                if tables is None:
                    export = decode_compact(dev, rows)
                    valid[rows] = self.model.validity(export)
                    x[:, rows] = self.model.preprocess(export)
                    continue
                n = rows.stop - rows.start
                xb = x[:, rows] if block is None else block[:, :n]  # each channel's rows contiguous
                for part, chans in reads.items():
                    bands = spans[part]
                    mask = dev.get(part + "_mask")
                    if by_band is not None:  # a CPU: per band, by what its mask holds in this block
                        self._lookup_bands(xb, rows, dev[part], first[part], mask, chans, index[part][0, :n], by_band)
                        continue
                    i = code_index(dev[part][bands.start - first[part] : bands.stop - first[part], rows],
                                   None if mask is None else mask[bands, rows], out=index[part][:, :n])
                    for c, band in chans:
                        torch.index_select(tables[c], 0, i[band - bands.start].view(-1), out=xb[c].view(-1))
                if block is not None:
                    x[:, rows].copy_(xb)
                # GUM 1's validity: every Sentinel-2 band present, i.e. the least mask byte is not 0
                torch.ne(torch.amin(dev["s2_mask"][:, rows], dim=0, out=s2_valid[:n]), 0, out=valid[rows])
        self.stage_s["decode+preprocess"] += time.perf_counter() - t
        if not quality:
            return x, valid
        from gum_ray.imagery import QUALITY_BITS, compact_input_quality

        t = time.perf_counter()
        with torch.inference_mode():
            q = compact_input_quality({m: dev[m + "_mask"] for m in QUALITY_BITS})
        self.stage_s["quality"] += time.perf_counter() - t
        return x, valid, q

    def _upload_parts(self, parts: dict[str, np.ndarray | torch.Tensor | ShuffledPart]) -> dict[str, torch.Tensor]:
        """The parts on the device. On CUDA they are copied on a stream of their own, so a cell's
        upload runs while the previous cell's crops still run on the compute stream (which then
        waits for the copy before it decodes); each device tensor is marked as used by the compute
        stream, so its memory is not reused before that stream is done with it. A part still
        byte-shuffled (:class:`~gum_ray.shuffled.ShuffledPart`, as a GPU's reader leaves it) goes up
        as it is and is unshuffled here, on the device (two copy kernels)."""
        def up(v):
            return dataclasses.replace(v, data=as_device_tensor(v.data, self.device)) \
                if isinstance(v, ShuffledPart) else as_device_tensor(v, self.device)

        if self.device.type != "cuda":
            dev = {k: up(v) for k, v in parts.items()}
            return {k: unshuffle(v) if isinstance(v, ShuffledPart) else v for k, v in dev.items()}
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(self.device)
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self._copy_stream):  # host memory: nothing on the device to wait for
            dev = {k: up(v) for k, v in parts.items()}
        compute.wait_stream(self._copy_stream)
        for v in dev.values():
            (v.data if isinstance(v, ShuffledPart) else v).record_stream(compute)
        # a shuffled part is unshuffled on the compute stream, after the copy
        return {k: unshuffle(v) if isinstance(v, ShuffledPart) else v for k, v in dev.items()}

    def _present_tables(self) -> tuple[torch.Tensor, torch.Tensor, list[float | None]]:
        """Per channel, the code table's present half indexed by the code's 16 bits as unsigned
        (int16 codes rotated into place), and the value of an absent code when it is one value
        (None if not): a CPU looks a band up with no mask pass where its mask says every pixel of
        a block is present, and fills the absent value where it says none is (the usual cases)."""
        if self._by_band is None:
            from gum_ray.bands import INT16_OFFSET, INT16_PARTS, TABLE_HALF

            tables = self._tables
            present = tables[:, TABLE_HALF:].clone()
            for c, (part, _) in enumerate(self._sources):
                if part in INT16_PARTS:  # entry code + 32768 -> the code's unsigned 16 bits
                    present[c] = torch.roll(present[c], INT16_OFFSET)
            absent = [float(t[0]) if bool((t[:TABLE_HALF] == t[0]).all()) else None for t in tables]
            self._by_band = (tables, present.contiguous(), absent)
        return self._by_band

    @staticmethod
    def _lookup_bands(xb: torch.Tensor, rows: slice, codes: torch.Tensor, first: int, mask: torch.Tensor | None,
                      chans: list[tuple[int, int]], index: torch.Tensor,
                      by_band: tuple[torch.Tensor, torch.Tensor, list[float | None]]) -> None:
        """``xb[c]`` (the input's block of ``rows``, each channel's rows contiguous) for each
        (channel, band) of one compact part (whose ``codes`` start at band ``first``), on a CPU: a
        block whose mask is all present is one lookup of the code's bits; all absent, the absent
        value; mixed, the lookup of the whole table with the mask byte
        (:func:`gum_ray.bands.code_index`)."""
        from gum_ray.bands import code_index

        tables, present, absent = by_band
        for c, band in chans:
            out = xb[c].view(-1)
            code = codes[band - first, rows]
            if mask is not None:
                m = mask[band, rows]
                lo, hi = (int(v) for v in torch.aminmax(m))
                if hi == 0 and absent[c] is not None:
                    out.fill_(absent[c])
                    continue
                if lo == 0:  # some absent: the whole table, entry TABLE_HALF * present + code
                    torch.index_select(tables[c], 0, code_index(code, m, out=index).view(-1), out=out)
                    continue
            index.copy_(code.view(torch.uint16) if code.dtype == torch.int16 else code)
            torch.index_select(present[c], 0, index.view(-1), out=out)

    def compact_bands(self) -> dict[str, slice] | None:
        """Which bands of each compact part's values the engine reads, for a family whose channels
        each come from one band (GUM 1: not the elevation, ``terrain`` band 0): part -> band range
        (:meth:`~gum_ray.store.cache.ImageryCache.get_compact` then decompresses no other); None
        for a family that reads every band. The masks are always read whole (validity and input
        quality take every band's)."""
        if self._code_tables() is None:
            return None
        spans: dict[str, slice] = {}
        for part, band in self._sources:
            sp = spans.get(part)
            spans[part] = slice(band, band + 1) if sp is None else slice(min(sp.start, band), max(sp.stop, band + 1))
        return spans

    def _code_tables(self) -> torch.Tensor | None:
        """The model's code tables on the device (:func:`gum_ray.bands.code_tables`), made on first
        use; None for a family whose preprocessing is not per band."""
        if not self._tables_made:
            self._tables_made = True
            sources = getattr(self.model, "channel_sources", None)
            if sources is not None:
                from gum_ray.bands import code_tables

                self._sources = tuple(sources())
                self._tables = torch.from_numpy(code_tables(self.model.preprocess, self._sources)).to(self.device)
        return self._tables

    def predict_compact(self, parts: dict[str, np.ndarray], origin: tuple[int, int] | None = None) -> Prediction:
        """Predict a scene given as compact integer parts (the imagery cache's); P(urban) float32,
        NaN where the model does not map the pixel, and the class."""
        x, valid = self.prepare_compact(parts)
        (_, prob, label), = self.predict_scenes([(None, x, valid, origin)])
        return Prediction(prob.cpu().numpy(), label.cpu().numpy())

    @torch.inference_mode()
    def predict_scenes(self, scenes: Iterable[tuple[Any, Any, Any, Any]]
                       ) -> Iterator[tuple[Any, torch.Tensor, torch.Tensor]]:
        """Predict several scenes, batching crops across them (a batch is always full but at the end).

        ``scenes`` yields ``(key, x, valid, origin)``: ``x`` the network input (C, H, W) (numpy or a
        tensor, uploaded once), ``valid`` None or a bool (H, W) mask (crops without a valid pixel are
        not run; P(urban) is NaN and the class 0 outside the mask), ``origin`` as in :meth:`predict`.
        It is read lazily, one scene ahead of the crops that need it, so a producer can decode the
        next scene while this one runs. Yields ``(key, probability, label)`` as device tensors
        (float32 (H, W), uint8 (H, W)) in the order the scenes came.
        """
        pending: collections.deque[_Scene] = collections.deque()
        queue: collections.deque[tuple[_Scene, int, int]] = collections.deque()
        it = iter(scenes)
        exhausted = False
        k = 2 if self.settings.merge == "logits" else 1
        while True:
            while not exhausted and len(queue) < self.batch_size:
                try:
                    key, x, valid, origin = next(it)
                except StopIteration:
                    exhausted = True
                    break
                scene = self._new_scene(key, x, valid, origin, k)
                pending.append(scene)
                queue.extend((scene, y, xx) for y, xx in scene.crops)
            while pending and pending[0].done == len(pending[0].crops):
                yield self._end_scene(pending.popleft())
            if not queue:
                if exhausted and not pending:
                    return
                continue
            batch = [queue.popleft() for _ in range(min(self.batch_size, len(queue)))]
            if self._gather:
                self._run_gathered(batch)
                continue
            scores = self._run_views([sc.x[:, y : y + CROP, xx : xx + CROP] for sc, y, xx in batch])
            t = time.perf_counter()
            for j, (sc, y, xx) in enumerate(batch):
                sc.acc[:, y : y + CROP, xx : xx + CROP] += scores[j]
                sc.done += 1
            self.stage_s["blend"] += time.perf_counter() - t

    def _run_gathered(self, batch: list[tuple[_Scene, int, int]]) -> None:
        """Run and blend a batch the way a GPU does: per scene in it, its crops cut by one gather
        into the batch buffer and their scores added by one scatter (``index_put_`` accumulating:
        on one CPU thread in crop order, as the per-crop adds; on CUDA a stable sort keeps that
        order), so the host launches a few kernels a batch, not two a crop."""
        t = time.perf_counter()
        groups: list[list] = []  # [scene, first crop, crops]: a scene's crops are consecutive
        for sc, _, _ in batch:
            if groups and groups[-1][0] is sc:
                groups[-1][2] += 1
            else:
                groups.append([sc, sc.taken, 1])
        buf = self._batch_buffer()[: len(batch)]
        j = 0
        for sc, a, n in groups:
            # (C, n, 256, 256) in one gather, then into the batch's (channels-last) buffer
            buf[j : j + n].copy_(sc.x[:, sc.rows[a : a + n], sc.cols[a : a + n]].transpose(0, 1))
            sc.taken += n
            j += n
        self.stage_s["crop"] += time.perf_counter() - t
        scores = self._scores(buf)
        t = time.perf_counter()
        j = 0
        for sc, a, n in groups:
            for k in range(sc.acc.shape[0]):
                sc.acc[k].index_put_((sc.rows[a : a + n], sc.cols[a : a + n]), scores[j : j + n, k], accumulate=True)
            sc.done += n
            j += n
        self.stage_s["blend"] += time.perf_counter() - t

    def _new_scene(self, key, x, valid, origin, k: int) -> _Scene:
        self._check_input(tuple(x.shape))
        t = time.perf_counter()
        x = as_device_tensor(x, self.device)
        if x.dtype != torch.float32:
            x = x.float()
        height, width = x.shape[1:]
        if valid is not None:
            valid = as_device_tensor(valid, self.device)
        pad_h, pad_w = max(CROP - height, 0), max(CROP - width, 0)
        if pad_h or pad_w:  # small scenes: numpy's reflection (repeats for pads beyond the size)
            x = as_device_tensor(_reflect_pad(x.cpu().numpy(), pad_h, pad_w), self.device)
        hp, wp, ys, xs = self._geometry(height, width, origin)
        crops = [(y, xx) for y in ys for xx in xs]
        if valid is not None:
            vp = valid
            if pad_h or pad_w:
                vp = torch.nn.functional.pad(valid[None].to(torch.uint8), (0, pad_w, 0, pad_h))[0].bool()
            crops = [c for c, hit in zip(crops, crop_hits(vp, ys, xs)) if hit]
        weight = torch.outer(self._axis_weight(hp, ys), self._axis_weight(wp, xs))
        acc = torch.zeros((k, hp, wp), dtype=torch.float32, device=self.device)
        scene = _Scene(key, x, int(height), int(width), crops, acc, weight, valid)
        if self._gather and crops:
            at = np.array(crops, dtype=np.int64)
            span = np.arange(CROP, dtype=np.int64)
            scene.rows = self.to_device(at[:, 0, None, None] + span[None, :, None])
            scene.cols = self.to_device(at[:, 1, None, None] + span[None, None, :])
        self.stage_s["scene"] += time.perf_counter() - t
        return scene

    def _end_scene(self, sc: _Scene) -> tuple[Any, torch.Tensor, torch.Tensor]:
        t = time.perf_counter()
        prob, label = self._finish(sc.acc[:, : sc.height, : sc.width], sc.weight[: sc.height, : sc.width])
        if sc.valid is not None:  # both are fresh tensors of _finish's: filled in place
            absent = sc.valid.logical_not()
            prob.masked_fill_(absent, float("nan"))
            label.masked_fill_(absent, 0)
        self.stage_s["finish"] += time.perf_counter() - t
        return sc.key, prob, label

    def _check_input(self, shape: tuple[int, ...]) -> None:
        if len(shape) != 3:
            raise InputError(f"expected a (channels, height, width) array, got shape {shape}")
        if shape[0] != self.in_channels:
            raise InputError(
                f"the model takes {self.in_channels} channels, the input has {shape[0]}"
            )
        if shape[1] < 1 or shape[2] < 1:
            raise InputError(f"empty image of shape {shape[1]} x {shape[2]}")

    @torch.inference_mode()
    def predict_rows(
        self,
        read_rows: Callable[[int, int], Any],
        height: int,
        width: int,
        progress: Callable[[int], None] | None = None,
        origin: tuple[int | None, int | None] | None = None,
        keep_crop: Callable[[int, int], bool] | None = None,
        encode: bool = False,
    ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """Stream a scene of ``height`` x ``width`` px through the network.

        ``read_rows(y0, y1)`` returns the preprocessed rows ``[y0, y1)`` as (C, y1 - y0, width)
        float32 (numpy, or a tensor: on the engine's device nothing is copied); with ``encode``, a
        pair (rows, valid) where valid is a bool (y1 - y0, width) mask. ``origin``: see
        :meth:`predict`. Yields ``(y0, probability_rows, label_rows)`` for consecutive, finished row
        blocks, top to bottom; with ``encode``, ``(y0, percent_rows, class_rows)`` as uint8 made on
        the device (P(urban) x 100 rounded, class 0/1, :data:`~gum_ray.imagery.NODATA` where not
        valid). ``progress(n)`` is called with the number of crops done.
        ``keep_crop(y, x)``, asked once the rows of a crop are read, lets the caller skip crops it
        knows are all no data (their pixels come out NaN; no other pixel changes, since a crop only
        contributes to its own pixels).

        Memory: the input rows and accumulator rows that pending crops still touch, in two buffers
        each that are allocated once and reused (no allocation per batch).
        """
        s = self.settings
        self._check_input((self.in_channels, height, width))
        pad_h, pad_w = max(CROP - height, 0), max(CROP - width, 0)
        hp, wp, ys, xs = self._geometry(height, width, origin)
        crops = [(y, x) for y in ys for x in xs]
        k = 2 if s.merge == "logits" else 1
        bs = self.batch_size
        wy, wx = self._axis_weight(hp, ys), self._axis_weight(wp, xs)
        # the most rows one batch needs: input rows [first crop's y, last crop's y + CROP)
        span = max(crops[min(i + bs, len(crops)) - 1][0] + CROP - crops[i][0] for i in range(0, len(crops), bs))
        cap = span + max(s.stride, CROP)
        dev = self.device

        def read_padded(a: int, b: int):
            t = time.perf_counter()
            valid = None
            if pad_h:  # the whole (short) image, padded to one crop high
                got = read_rows(0, height)
                block, valid = got if encode else (got, None)
                block = _reflect_pad(np.asarray(_to_numpy(block), dtype=np.float32), pad_h, pad_w)[:, a:b]
                valid = None if valid is None else np.pad(_to_numpy(valid), ((0, pad_h), (0, pad_w)))[a:b]
            else:
                got = read_rows(a, b)
                block, valid = got if encode else (got, None)
                if pad_w:
                    block = _reflect_pad(np.asarray(_to_numpy(block), dtype=np.float32), 0, pad_w)
                    valid = None if valid is None else np.pad(_to_numpy(valid), ((0, 0), (0, pad_w)))
            self.stage_s["read"] += time.perf_counter() - t
            t = time.perf_counter()
            block = as_device_tensor(block, dev)
            valid = None if valid is None else as_device_tensor(valid, dev)
            self.stage_s["upload"] += time.perf_counter() - t
            return block, valid

        # rolling windows of rows, two buffers each, swapped when the top rows are dropped
        ins = [torch.empty((self.in_channels, cap, wp), dtype=torch.float32, device=dev) for _ in range(2)]
        accs = [torch.zeros((k, cap, wp), dtype=torch.float32, device=dev) for _ in range(2)]
        vals = [torch.ones((cap, wp), dtype=torch.bool, device=dev) for _ in range(2)] if encode else None
        # with keep_crop, which pixels a run crop covered (the others come out as no data)
        covs = [torch.zeros((cap, wp), dtype=torch.bool, device=dev) for _ in range(2)] if keep_crop else None
        in_top = in_n = 0  # rows [in_top, in_top + in_n) held in ins[0]
        acc_top = acc_n = 0  # rows [acc_top, acc_top + acc_n) held in accs[0], the rest of it zero
        emitted = 0
        i = 0
        while i < len(crops):
            batch = crops[i : i + bs]
            i += len(batch)
            need_top, need_bottom = batch[0][0], batch[-1][0] + CROP
            if need_top > in_top:  # drop rows above the batch
                drop = min(need_top - in_top, in_n)
                keep = in_n - drop
                if keep:
                    ins[1][:, :keep].copy_(ins[0][:, drop:in_n])
                    if encode:
                        vals[1][:keep].copy_(vals[0][drop:in_n])
                ins.reverse()
                if encode:
                    vals.reverse()
                in_top, in_n = need_top, keep
            if need_bottom > in_top + in_n:
                block, valid = read_padded(in_top + in_n, need_bottom)
                ins[0][:, in_n : in_n + block.shape[1]].copy_(block)
                if encode:
                    vals[0][in_n : in_n + block.shape[1]].copy_(valid)
                in_n += block.shape[1]
            run = batch if keep_crop is None else [(y, x) for y, x in batch if keep_crop(y, x)]
            if run:
                scores = self._run_views([ins[0][:, y - in_top : y - in_top + CROP, x : x + CROP] for y, x in run])
                t = time.perf_counter()
                for j, (y, x) in enumerate(run):
                    r = y - acc_top
                    accs[0][:, r : r + CROP, x : x + CROP] += scores[j]
                    if covs is not None:
                        covs[0][r : r + CROP, x : x + CROP] = True
                self.stage_s["blend"] += time.perf_counter() - t
            acc_n = max(acc_n, need_bottom - acc_top)
            if progress is not None:
                progress(len(batch))
            # rows above the next crop are final
            frontier = min(crops[i][0] if i < len(crops) else hp, height)
            if frontier > emitted:
                t = time.perf_counter()
                n = frontier - acc_top
                prob, label = self._finish(accs[0][:, :n], wy[acc_top:frontier, None] * wx[None, :])
                if covs is not None:
                    prob = prob.masked_fill(~covs[0][:n], float("nan"))
                if encode:
                    valid = vals[0][acc_top - in_top : frontier - in_top]
                    out_a = _percent(prob, valid)[:, :width].cpu().numpy()
                    out_b = label.masked_fill(~valid, NODATA)[:, :width].cpu().numpy()
                else:
                    out_a, out_b = prob[:, :width].cpu().numpy(), label[:, :width].cpu().numpy()
                self.stage_s["finish"] += time.perf_counter() - t
                yield emitted, out_a, out_b
                emitted = frontier
                # the other buffer is all zero: move the rows still pending there, clear this one
                keep = acc_n - n
                for bufs in (accs, covs) if covs is not None else (accs,):
                    bufs[1][..., :keep, :].copy_(bufs[0][..., n:acc_n, :])
                    bufs[0][..., :acc_n, :].zero_()
                    bufs.reverse()
                acc_top, acc_n = frontier, keep


def crop_hits(mask: torch.Tensor, ys: list[int], xs: list[int]) -> list[bool]:
    """Whether each crop ``(y, x)`` of ``ys`` x ``xs`` (row-major) holds a True pixel of ``mask``
    (H, W). Per crop row, one pass over its rows (which columns have any) and a running count
    along them: one pass over the mask in all, not one per crop, and one read back to the host."""
    if not ys or not xs:
        return []
    x0 = torch.tensor(xs, device=mask.device)
    rows = []
    for y in ys:
        count = torch.cumsum(mask[y : y + CROP].any(0), 0, dtype=torch.int32)
        count = torch.cat([count.new_zeros(1), count])  # count[i]: columns < i with a True pixel
        rows.append(count[x0 + CROP] > count[x0])
    return torch.stack(rows).flatten().tolist()


def _to_numpy(a) -> np.ndarray:
    return a.cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def _percent(prob: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """P(urban) -> uint8 percent 0-100 on the device, NODATA where not valid or NaN
    (:func:`gum_ray.imagery.probability_to_uint8`'s arithmetic: rint(p x 100), clipped)."""
    out = torch.round(torch.nan_to_num(prob, nan=0.0) * 100.0).clamp(0, 100).to(torch.uint8)
    bad = ~torch.isfinite(prob)
    if valid is not None:
        bad |= ~valid
    return out.masked_fill(bad, NODATA)


def _reflect_pad(block: np.ndarray, pad_h: int, pad_w: int) -> np.ndarray:
    """Pad (C, H, W) at the bottom/right by reflection (edge replication where 1 px wide)."""
    if not pad_h and not pad_w:
        return block
    mode = "reflect" if min(block.shape[1:]) > 1 else "edge"
    return np.pad(block, ((0, 0), (0, pad_h), (0, pad_w)), mode=mode)


__all__ = [
    "CROP",
    "DEFAULT_STRIDE",
    "InferenceEngine",
    "InferenceSettings",
    "Prediction",
    "crop_count",
    "crop_starts",
    "probability_to_uint8",
    "window_2d",
]
