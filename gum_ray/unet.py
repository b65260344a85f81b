"""The GUM networks' building blocks in plain torch: mmsegmentation's UNet parts and PSP head.

GUM 1 is mmsegmentation's ``EncoderDecoder`` (UNet backbone + PSP head, ``gum_ray/configs``) and
GUM 2.0's decoder and head are the same mmseg parts. This module rebuilds those parts with mmseg's
module names, registration order and arithmetic, op for op, so

* a checkpoint's state dict loads as is (the same keys, in the same order, of the same shapes), and
  :func:`gum_ray.model.randomize` draws the same weights from a seed;
* the logits are bit-identical to the mmseg-built network's, in eval and in training mode
  (``tests/test_unet.py`` builds both and compares them).

Why not mmseg itself: importing it registers every model, dataset and mmcv op, 3-5 s in every
process that loads a model (``gum predict``, each model actor of ``gum map``), on top of a 2.5 s
torch import; for a 20 s prediction that was a fifth of the wall time (docs/performance.md). mmseg
stays what the seed path (``tools/seed_predict.py``) and the fidelity tests run.

mmcv's ``ConvModule`` here is :class:`ConvModule`: conv (no bias) -> BatchNorm (``bn``) -> ReLU,
keeping mmcv's ``norm_name`` and ``order`` so :func:`fold_batchnorm` folds it.
"""

from __future__ import annotations

import contextvars
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

#: the UNet's input sides must be multiples of this (four 2 x 2 max-pools)
DOWNSAMPLE = 16

# False while :func:`uninitialised` builds a network on the meta device: ConvModule then skips
# mmcv's initialisation (on meta tensors ``normal_`` goes through torch's Python reference, which
# imports torch._dynamo: 1.3 s of a 20 s prediction, for values never computed)
_INITIALISE = contextvars.ContextVar("gum_ray_unet_initialise", default=True)


def resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """mmseg's ``resize`` as GUM uses it: bilinear, ``align_corners=False``."""
    return F.interpolate(x, tuple(int(s) for s in size), None, "bilinear", False)


class ConvModule(nn.Module):
    """mmcv's ``ConvModule`` with BN and ReLU: ``conv`` (bias-free), ``bn``, ``activate`` (in place)."""

    norm_name = "bn"
    order = ("conv", "norm", "act")

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1,
                 padding: int = 0, dilation: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                              dilation=dilation, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.activate = nn.ReLU(inplace=True)
        # mmcv's own initialisation, in its order (a fresh network, e.g. the demo model's start, is
        # then mmseg's for the same torch seed): kaiming normal, fan_out, ReLU; BN weight 1, bias 0
        if not _INITIALISE.get():
            return
        nn.init.kaiming_normal_(self.conv.weight, a=0, mode="fan_out", nonlinearity="relu")
        nn.init.constant_(self.bn.weight, 1.0)
        nn.init.constant_(self.bn.bias, 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.bn(self.conv(x)))


class BasicConvBlock(nn.Module):
    """mmseg's UNet ``BasicConvBlock``: ``num_convs`` 3 x 3 ConvModules in ``convs``."""

    def __init__(self, in_channels: int, out_channels: int, num_convs: int = 2, stride: int = 1,
                 dilation: int = 1) -> None:
        super().__init__()
        self.convs = nn.Sequential(*(
            ConvModule(in_channels if i == 0 else out_channels, out_channels, 3,
                       stride=stride if i == 0 else 1, dilation=1 if i == 0 else dilation,
                       padding=1 if i == 0 else dilation)
            for i in range(num_convs)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(x)


class Upsample(nn.Module):
    """mmseg's ``Upsample`` wrapper at a scale factor: bilinear, ``align_corners=False``."""

    def __init__(self, scale_factor: float = 2.0) -> None:
        super().__init__()
        self.scale_factor = float(scale_factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return resize(x, [int(t * self.scale_factor) for t in x.shape[-2:]])


class InterpConv(nn.Module):
    """mmseg's ``InterpConv``: ``interp_upsample`` = (2x bilinear upsample, 1 x 1 ConvModule).

    :func:`conv_before_upsample` turns a folded one (its BN an identity) into conv -> upsample ->
    ReLU, the same function in real arithmetic on a quarter of the pixels."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.interp_upsample = nn.Sequential(Upsample(2.0), ConvModule(in_channels, out_channels, 1))
        self.conv_first = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv_first:
            upsample, cm = self.interp_upsample
            return cm.activate(upsample(cm.conv(x)))
        return self.interp_upsample(x)


class UpConvBlock(nn.Module):
    """mmseg's ``UpConvBlock``: upsample ``x`` to ``skip_channels``, concatenate after ``skip``, convs."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, num_convs: int = 2) -> None:
        super().__init__()
        self.conv_block = BasicConvBlock(2 * skip_channels, out_channels, num_convs)
        self.upsample = InterpConv(in_channels, skip_channels)

    def forward(self, skip: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.conv_block(torch.cat([skip, self.upsample(x)], dim=1))


class UNet(nn.Module):
    """mmseg's ``UNet`` as GUM configures it: ``num_stages`` stages of two 3 x 3 convs, 2 x 2
    max-pool between stages, bilinear ``InterpConv`` upsampling; channels ``base * 2**i``.
    ``forward`` returns mmseg's list: the deepest stage, then each decoder stage up to full size."""

    def __init__(self, in_channels: int, base_channels: int = 64, num_stages: int = 5) -> None:
        super().__init__()
        self.encoder = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for i in range(num_stages):
            stage: list[nn.Module] = []
            if i != 0:
                stage.append(nn.MaxPool2d(kernel_size=2))
                self.decoder.append(UpConvBlock(base_channels * 2**i, base_channels * 2 ** (i - 1),
                                                base_channels * 2 ** (i - 1)))
            stage.append(BasicConvBlock(in_channels, base_channels * 2**i))
            self.encoder.append(nn.Sequential(*stage))
            in_channels = base_channels * 2**i

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h, w = x.shape[-2:]
        if h % DOWNSAMPLE or w % DOWNSAMPLE:
            raise ValueError(f"the GUM UNet takes sides that are multiples of {DOWNSAMPLE} px, got {h} x {w}")
        enc_outs = []
        for enc in self.encoder:
            x = enc(x)
            enc_outs.append(x)
        dec_outs = [x]
        for i in reversed(range(len(self.decoder))):
            x = self.decoder[i](enc_outs[i], x)
            dec_outs.append(x)
        return dec_outs


class PPM(nn.ModuleList):
    """mmseg's pooling pyramid: per scale, adaptive average pool -> 1 x 1 ConvModule, upsampled back."""

    def __init__(self, pool_scales: Sequence[int], in_channels: int, channels: int) -> None:
        super().__init__(nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvModule(in_channels, channels, 1))
                         for s in pool_scales)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # type: ignore[override]
        return [resize(ppm(x), x.size()[2:]) for ppm in self]


class PSPHead(nn.Module):
    """mmseg's ``PSPHead`` (``conv_seg``, ``dropout``, ``psp_modules``, ``bottleneck``, in mmseg's
    registration order) on the ``in_index``-th of the backbone's outputs."""

    def __init__(self, in_channels: int, channels: int, num_classes: int = 2, *, in_index: int = 4,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout_ratio: float = 0.1) -> None:
        super().__init__()
        self.in_index = in_index
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        self.dropout = nn.Dropout2d(dropout_ratio) if dropout_ratio > 0 else None
        self.psp_modules = PPM(pool_scales, in_channels, channels)
        self.bottleneck = ConvModule(in_channels + len(pool_scales) * channels, channels, 3, padding=1)

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        x = inputs[self.in_index]
        feats = self.bottleneck(torch.cat([x, *self.psp_modules(x)], dim=1))
        if self.dropout is not None:
            feats = self.dropout(feats)
        return self.conv_seg(feats)


class UNetPSP(nn.Module):
    """GUM 1's network (mmseg ``EncoderDecoder``: ``backbone`` UNet, ``decode_head`` PSPHead).

    ``forward(x)``: (B, C, H, W) -> logits (B, 2, H, W). :meth:`encode_decode` keeps mmseg's
    signature (``batch_img_metas`` with ``img_shape``: the logits are resized to it, bilinear, as mmseg does).
    """

    def __init__(self, in_channels: int = 10, base_channels: int = 64, psp_channels: int = 16,
                 num_classes: int = 2) -> None:
        super().__init__()
        self.backbone = UNet(in_channels, base_channels)
        self.decode_head = PSPHead(base_channels, psp_channels, num_classes)

    def encode_decode(self, inputs: torch.Tensor, batch_img_metas: list[dict[str, Any]]) -> torch.Tensor:
        logits = self.decode_head(self.backbone(inputs))
        return resize(logits, batch_img_metas[0]["img_shape"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode_decode(x, [{"img_shape": tuple(x.shape[-2:])}])


def fold_batchnorm(module: nn.Module) -> int:
    """Fold every eval-mode BatchNorm that directly follows a conv into that conv, in place.

    Covers mmcv ``ConvModule`` (conv, then its norm) and ``nn.Sequential`` (a Conv2d followed by a
    BatchNorm2d), which is how GUM 1 (and GUM 2.0's fusion and decoder blocks) are built. Returns the
    number folded. This changes fp32 rounding (the folded weights are rounded once more), so the
    engine (:mod:`gum_ray.inference`) folds only where the arithmetic is not bound to the seed
    path's (see ``InferenceSettings.fold_bn``).
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    n = 0
    for mod in list(module.modules()):
        conv, norm_name = getattr(mod, "conv", None), getattr(mod, "norm_name", None)
        if isinstance(conv, nn.Conv2d) and norm_name and getattr(mod, "order", None) == ("conv", "norm", "act"):
            bn = getattr(mod, norm_name, None)
            if isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats:
                mod.conv = fuse_conv_bn_eval(conv, bn)
                setattr(mod, norm_name, nn.Identity())
                n += 1
        if isinstance(mod, nn.Sequential):
            for i in range(len(mod) - 1):
                if isinstance(mod[i], nn.Conv2d) and isinstance(mod[i + 1], nn.BatchNorm2d):
                    mod[i] = fuse_conv_bn_eval(mod[i], mod[i + 1])
                    mod[i + 1] = nn.Identity()
                    n += 1
    return n


def conv_before_upsample(module: nn.Module) -> int:
    """Run each :class:`InterpConv` of ``module`` whose BatchNorm is folded into its conv
    (:func:`fold_batchnorm`) as 1 x 1 conv -> 2x bilinear upsample -> ReLU instead
    of upsample -> conv -> ReLU; returns how many. A 1 x 1 conv (with its bias) and a bilinear
    upsample commute in real arithmetic (the bilinear weights sum to 1), so this changes only
    rounding (logits within about 5e-4, as folding does) and runs the conv on a quarter of the
    pixels: 4-5 % less time per GUM 1 crop on an AVX2 CPU (docs/performance.md). The weights and
    the state dict are unchanged."""
    n = 0
    for mod in module.modules():
        if isinstance(mod, InterpConv) and not mod.conv_first:
            cm = mod.interp_upsample[1]
            if isinstance(cm.bn, nn.Identity):
                mod.conv_first = True
                n += 1
    return n


def uninitialised(factory: Callable[[], nn.Module]) -> nn.Module:
    """``factory()``'s module on the CPU without its random initialisation, for weights about to be
    loaded from a checkpoint (initialising GUM 1's 29 M parameters costs a quarter of a second per
    load). Every tensor is left as allocated except BatchNorm's ``num_batches_tracked`` counters,
    which a checkpoint may omit: they start at 0. The caller loads every other key."""
    token = _INITIALISE.set(False)
    try:
        with torch.device("meta"):
            module = factory()
    finally:
        _INITIALISE.reset(token)
    # each tensor allocated on the CPU by hand: Module.to_empty goes through torch's Python
    # reference of empty_like for meta tensors, which imports sympy (0.5 s)
    for m in module.modules():
        for name, p in m._parameters.items():
            if p is not None:
                m._parameters[name] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype), p.requires_grad)
        for name, b in m._buffers.items():
            if b is not None:
                m._buffers[name] = (torch.zeros if name == "num_batches_tracked" else torch.empty)(
                    b.shape, dtype=b.dtype)
    return module


__all__ = ["BasicConvBlock", "ConvModule", "InterpConv", "PPM", "PSPHead", "UNet", "UNetPSP", "UpConvBlock",
           "conv_before_upsample", "fold_batchnorm", "resize", "uninitialised"]
