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

import dataclasses
import logging
import math
from collections.abc import Callable, Iterator
from typing import Literal

import numpy as np
import torch

from gum_ray.errors import InputError
from gum_ray.imagery import Imagery, Prediction, probability_to_uint8  # noqa: F401 - re-exported
from gum_ray.network import UrbanModel, as_model

log = logging.getLogger(__name__)

CROP = 256
DEFAULT_STRIDE = 192
WINDOW_FLOOR = 0.02

Precision = Literal["auto", "fp32", "bf16", "fp16"]


def cpu_supports_bf16() -> bool:
    """True where the CPU has native bf16 arithmetic (AVX512-BF16 or AMX), so autocast pays."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # noqa: BLE001 - older torch builds
        return False


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InputError(f"device {device!r}: not a device; use auto, cpu, cuda or cuda:N", param="device") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device}: no CUDA GPU is visible here; use the cpu device", param="device")
    return dev


def resolve_precision(precision: Precision, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (None = plain fp32)."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        if device.type != "cuda":
            raise InputError("precision fp16 needs a CUDA GPU; on the CPU use bf16 or fp32", param="precision")
        return torch.float16
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_supports_bf16() else None
    raise InputError(f"precision {precision!r}: use auto, fp32, bf16 or fp16", param="precision")


@dataclasses.dataclass(frozen=True)
class InferenceSettings:
    """How a scene is cut into crops and merged back, and how the network runs."""

    stride: int = DEFAULT_STRIDE
    window: Literal["hann", "none"] = "hann"
    merge: Literal["probability", "logits"] = "probability"
    batch_size: int = 8
    precision: Precision = "auto"
    channels_last: bool | None = None  # None = on with mixed precision, off in fp32 (exactness)
    compile: bool = False
    device: str = "auto"
    #: preprocess exactly as the family's published notebook, missing modalities included (GUM 2.0:
    #: a missing Sentinel-1 is 0 dB, not the training's mask value 0); GUM 1's always is the notebook's
    notebook_preprocessing: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.stride <= CROP:
            raise InputError(f"stride {self.stride}: must be between 1 and {CROP} px", param="stride")
        if self.batch_size < 1:
            raise InputError(f"batch_size {self.batch_size}: must be at least 1", param="batch_size")
        if self.window not in ("hann", "none"):
            raise InputError(f"window {self.window!r}: use hann or none", param="window")
        if self.merge not in ("probability", "logits"):
            raise InputError(f"merge {self.merge!r}: use probability or logits", param="merge")

    @classmethod
    def seed(cls, **overrides) -> "InferenceSettings":
        """The seed notebook's settings: stride 256, equal weights, logits averaged, fp32, NCHW, one
        crop per forward pass, and the notebook's preprocessing (``notebook_preprocessing``).

        With these, the class output equals mmsegmentation's own ``test_step`` pixel for pixel (GUM 1),
        and the GUM 2.0 mapping notebook's inference (GUM 2.0), on every pixel the model maps. Batch 1
        because oneDNN's fp32 convolutions round differently at other batch sizes (at batch 8, GUM 2.0
        logits moved by up to 6e-6 and one near-tie pixel of 879,780 flipped class on the real scene).
        """
        base = dict(stride=CROP, window="none", merge="logits", precision="fp32", channels_last=False,
                    batch_size=1, notebook_preprocessing=True)
        base.update(overrides)
        return cls(**base)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def crop_starts(n: int, stride: int, crop: int = CROP, origin: int | None = None) -> list[int]:
    """Crop origins along an axis of ``n`` px (``n`` at least ``crop``).

    ``origin`` None: mmseg's slide rule (0, s, 2s, ..., the last pulled back to ``n - crop``).
    ``origin`` given (the image's first pixel's index on a larger grid, e.g. a UTM zone's 10 m
    lattice): interior crops sit on that grid's multiples of the stride, so two overlapping images
    of one grid see the same crops where they overlap; one crop at 0 and one at ``n - crop`` cover
    the edges.
    """
    if origin is None:
        grids = max(n - crop + stride - 1, 0) // stride + 1
        return [max(min(i * stride, n - crop), 0) for i in range(grids)]
    phase = (-origin) % stride
    starts = {0, n - crop}
    starts.update(range(phase, n - crop + 1, stride))
    return sorted(starts)


def crop_count(height: int, width: int, stride: int) -> int:
    """Crops the engine runs over a ``height`` x ``width`` scene (mmseg's rule; small sides padded)."""
    return len(crop_starts(max(height, CROP), stride)) * len(crop_starts(max(width, CROP), stride))


def window_2d(kind: str, crop: int = CROP) -> np.ndarray:
    if kind == "none":
        return np.ones((crop, crop), np.float32)
    i = np.arange(crop, dtype=np.float64)
    w1 = WINDOW_FLOOR + (1.0 - WINDOW_FLOOR) * np.sin(np.pi * (i + 0.5) / crop) ** 2
    return np.outer(w1, w1).astype(np.float32)


class _Forward(torch.nn.Module):
    """A model's forward on a batch of full crops, as a module (what ``torch.compile`` takes)."""

    def __init__(self, model: UrbanModel):
        super().__init__()
        self.net = model.module
        self._model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._model.forward(x)


class InferenceEngine:
    """Runs a model (:class:`~gum_ray.network.UrbanModel`) over whole scenes with :class:`InferenceSettings`.

    ``model`` may also be a bare GUM 1 network (an mmseg module), which is wrapped.
    """

    def __init__(self, model: UrbanModel | torch.nn.Module, settings: InferenceSettings | None = None):
        self.settings = settings or InferenceSettings()
        self.device = resolve_device(self.settings.device)
        self.autocast_dtype = resolve_precision(self.settings.precision, self.device)
        channels_last = self.settings.channels_last
        if channels_last is None:
            # channels_last changes fp32 rounding against mmseg's NCHW path (a few near-tie pixels
            # flip class); under autocast the rounding is bf16/fp16's anyway and it is faster.
            channels_last = self.autocast_dtype is not None
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = as_model(model)
        if self.settings.notebook_preprocessing and hasattr(self.model, "as_notebook"):
            self.model = self.model.as_notebook()  # a family whose default differs from its notebook
        self.model.module.to(self.device).eval()
        self.model.module.to(memory_format=self.memory_format)
        self.in_channels = int(self.model.in_channels)
        forward = _Forward(self.model)
        self._forward = torch.compile(forward, dynamic=False) if self.settings.compile else forward
        self._window = torch.from_numpy(window_2d(self.settings.window)).to(self.device)
        self.crops_run = 0

    # -- the network on one batch ---------------------------------------------------------
    @torch.inference_mode()
    def _run_batch(self, crops: np.ndarray) -> torch.Tensor:
        """(B, C, 256, 256) float32 -> per-crop scores on the device (B, K, 256, 256) float32.

        K = 2 logits for merge="logits"; K = 1 window-weighted P(urban) for merge="probability".
        """
        x = torch.from_numpy(crops)
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        x = x.contiguous(memory_format=self.memory_format)
        if self.autocast_dtype is not None:
            with torch.autocast(self.device.type, dtype=self.autocast_dtype):
                logits = self._forward(x)
        else:
            logits = self._forward(x)
        logits = logits.float()
        self.crops_run += crops.shape[0]
        if self.settings.merge == "logits":
            return logits
        return (torch.softmax(logits, dim=1)[:, 1:2] * self._window).contiguous()

    # -- whole scenes ---------------------------------------------------------------------
    def predict(self, x: np.ndarray, origin: tuple[int, int] | None = None) -> Prediction:
        """Predict a preprocessed scene (C, H, W) float32 held in memory.

        ``origin`` = (row, col) of the scene's first pixel on a larger pixel grid: crops are then
        placed on that grid's stride lattice (see :func:`crop_starts`), so overlapping scenes of one
        grid (neighbouring cells with their halos) agree where they overlap.
        """
        self._check_input(x.shape)
        prob = np.empty(x.shape[1:], np.float32)
        label = np.empty(x.shape[1:], np.uint8)
        for y0, p, lab in self.predict_rows(lambda a, b: x[:, a:b], x.shape[1], x.shape[2], origin=origin):
            prob[y0 : y0 + p.shape[0]] = p
            label[y0 : y0 + p.shape[0]] = lab
        return Prediction(prob, label)

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

    def _check_input(self, shape: tuple[int, ...]) -> None:
        if len(shape) != 3:
            raise InputError(f"expected a (channels, height, width) array, got shape {shape}")
        if shape[0] != self.in_channels:
            raise InputError(
                f"the model takes {self.in_channels} channels, the input has {shape[0]}"
            )
        if shape[1] < 1 or shape[2] < 1:
            raise InputError(f"empty image of shape {shape[1]} x {shape[2]}")

    def predict_rows(
        self,
        read_rows: Callable[[int, int], np.ndarray],
        height: int,
        width: int,
        progress: Callable[[int], None] | None = None,
        origin: tuple[int | None, int | None] | None = None,
        keep_crop: Callable[[int, int], bool] | None = None,
    ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """Stream a scene of ``height`` x ``width`` px through the network.

        ``read_rows(y0, y1)`` returns the preprocessed rows ``[y0, y1)`` as (C, y1 - y0, width)
        float32. ``origin``: see :meth:`predict`. Yields ``(y0, probability_rows, label_rows)`` for consecutive, finished row
        blocks, top to bottom. ``progress(n)`` is called with the number of crops done.
        ``keep_crop(y, x)``, asked once the rows of a crop are read, lets the caller skip crops it
        knows are all no data (their pixels come out NaN; no other pixel changes, since a crop only
        contributes to its own pixels).
        """
        s = self.settings
        self._check_input((self.in_channels, height, width))
        pad_h, pad_w = max(CROP - height, 0), max(CROP - width, 0)
        hp, wp = height + pad_h, width + pad_w
        oy, ox = origin if origin is not None else (None, None)
        ys, xs = crop_starts(hp, s.stride, origin=oy), crop_starts(wp, s.stride, origin=ox)
        crops = [(y, x) for y in ys for x in xs]
        k = 2 if s.merge == "logits" else 1

        def read_padded(a: int, b: int) -> np.ndarray:
            if pad_h:  # the whole (short) image, padded to one crop high
                block = np.asarray(read_rows(0, height), dtype=np.float32)
                block = _reflect_pad(block, pad_h, pad_w)
                return block[:, a:b]
            block = np.asarray(read_rows(a, b), dtype=np.float32)
            return _reflect_pad(block, 0, pad_w) if pad_w else block

        in_top, in_buf = 0, np.zeros((self.in_channels, 0, wp), np.float32)
        acc_top = 0
        acc = torch.zeros((k, 0, wp), dtype=torch.float32, device=self.device)
        weight = torch.zeros((1, 0, wp), dtype=torch.float32, device=self.device)
        emitted = 0
        i = 0
        while i < len(crops):
            batch = crops[i : i + s.batch_size]
            i += len(batch)
            # input rows these crops need: [batch[0].y, batch[-1].y + CROP)
            need_top, need_bottom = batch[0][0], batch[-1][0] + CROP
            if need_top > in_top:
                in_buf = in_buf[:, need_top - in_top :]
                in_top = need_top
            have = in_top + in_buf.shape[1]
            if need_bottom > have:
                in_buf = np.concatenate([in_buf, read_padded(have, need_bottom)], axis=1)
            run = batch if keep_crop is None else [(y, x) for y, x in batch if keep_crop(y, x)]
            if run:
                tiles = np.stack([in_buf[:, y - in_top : y - in_top + CROP, x : x + CROP] for y, x in run])
                scores = self._run_batch(tiles)
            # grow the accumulators down to the lowest crop of the batch
            acc_bottom = acc_top + acc.shape[1]
            if need_bottom > acc_bottom:
                extra = need_bottom - acc_bottom
                acc = torch.cat([acc, acc.new_zeros((k, extra, wp))], dim=1)
                weight = torch.cat([weight, weight.new_zeros((1, extra, wp))], dim=1)
            for j, (y, x) in enumerate(run):
                r = y - acc_top
                acc[:, r : r + CROP, x : x + CROP] += scores[j]
                if s.merge == "logits":
                    weight[:, r : r + CROP, x : x + CROP] += 1
                else:
                    weight[:, r : r + CROP, x : x + CROP] += self._window
            if progress is not None:
                progress(len(batch))
            # rows above the next crop are final
            frontier = crops[i][0] if i < len(crops) else hp
            frontier = min(frontier, height)
            if frontier > emitted:
                n = frontier - acc_top
                prob, label = self._finish(acc[:, :n], weight[:, :n])
                yield emitted, prob[:, :width], label[:, :width]
                emitted = frontier
                acc, weight = acc[:, n:], weight[:, n:]
                acc_top = frontier

    def _finish(self, acc: torch.Tensor, weight: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        if self.settings.merge == "logits":
            mean = acc / weight  # as mmseg: sum of logits / count
            label = (mean[1] > mean[0]).to(torch.uint8)  # argmax, ties -> class 0
            prob = torch.softmax(mean, dim=0)[1]
        else:
            prob = acc[0] / weight[0]
            label = (prob > 0.5).to(torch.uint8)
        return prob.cpu().numpy(), label.cpu().numpy()


def _reflect_pad(block: np.ndarray, pad_h: int, pad_w: int) -> np.ndarray:
    """Pad (C, H, W) at the bottom/right by reflection (edge replication where 1 px wide)."""
    if not pad_h and not pad_w:
        return block
    mode = "reflect" if min(block.shape[1:]) > 1 else "edge"
    return np.pad(block, ((0, 0), (0, pad_h), (0, pad_w)), mode=mode)


def flops_per_crop(model: UrbanModel | torch.nn.Module) -> float:
    """Multiply-adds x 2 of one 256 x 256 crop, counted from the conv layers."""
    model = as_model(model)
    total = 0.0
    hooks = []

    def conv_hook(mod, inp, out):
        nonlocal total
        k = math.prod(mod.kernel_size) * (mod.in_channels // mod.groups)
        total += 2.0 * out.numel() * k

    for m in model.module.modules():
        if isinstance(m, torch.nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
    try:
        dev = next(model.module.parameters()).device
        with torch.inference_mode():
            model.forward(torch.zeros(1, model.in_channels, CROP, CROP, device=dev))
    finally:
        for h in hooks:
            h.remove()
    return total


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
