"""How a scene is cut into crops and merged back: :class:`InferenceSettings` and the crop geometry.

Torch-free on purpose: a mapping job (:class:`gum_ray.mapping.job.MapJob`) carries its
``InferenceSettings`` to every Ray task, and the fetch and write tasks, which never run a network,
then don't import torch (about 1.5 s of CPU and 300 MB per worker process). The engine that runs
these settings is :mod:`gum_ray.inference`.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from gum_ray.errors import InputError

CROP = 256
DEFAULT_STRIDE = 192

Precision = Literal["auto", "fp32", "bf16", "fp16"]


@dataclasses.dataclass(frozen=True)
class InferenceSettings:
    """How a scene is cut into crops and merged back, and how the network runs."""

    stride: int = DEFAULT_STRIDE
    window: Literal["hann", "none"] = "hann"
    merge: Literal["probability", "logits"] = "probability"
    batch_size: int | None = None  # None = per device (default_batch_size)
    precision: Precision = "auto"
    channels_last: bool | None = None  # None = per device (default_channels_last)
    # BN folded into the convs, and folded 1 x 1 upsample convs run before the upsampling
    # (unet.conv_before_upsample); None = with channels_last (all change fp32 rounding vs the seed's)
    fold_bn: bool | None = None
    # the deep 3 x 3 convs by Winograd (gum_ray.winograd); None = on for fp32 on a
    # CPU where BN is folded (it changes fp32 rounding too) and the network is not compiled; only
    # fp32 on a CPU takes it
    winograd: bool | None = None
    compile: bool = False
    device: str = "auto"
    #: preprocess exactly as the family's published notebook, missing modalities included (GUM 2.0:
    #: a missing Sentinel-1 is 0 dB, not the training's mask value 0); GUM 1's always is the notebook's
    notebook_preprocessing: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.stride <= CROP:
            raise InputError(f"stride {self.stride}: must be between 1 and {CROP} px", param="stride")
        if self.batch_size is not None and self.batch_size < 1:
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
                    fold_bn=False, winograd=False, batch_size=1, notebook_preprocessing=True)
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
