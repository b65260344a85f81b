"""An independent transcription of the GUM 2.0 mapping notebook, written from the facts of
``../shared/GUM2_REFERENCE.md`` only: plain ``torch.nn.functional`` reading the state dict by name.

It imports nothing of :mod:`gum_ray.gum2` (no module class, no constant), so a wrong layer, order,
stride, padding, normalisation constant or inference rule in gum-ray shows up as a difference.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# the notebook's constants, typed from the reference page
VMIN = [-23.62251091003418, -37.2230110168457, -24.20653533935547, -37.36018753051758]
VMAX = [2.138315200805664, 0.0, 2.071335747242074, 0.0]
EPS = 1e-5  # BatchNorm's default (timm's and mmcv's)
CROP = 256


def notebook_preprocess(export: np.ndarray) -> np.ndarray:
    """(11, H, W) GUM export -> (10, H, W) float32, step by step as the reference page lists them."""
    x = export.astype(np.float32).copy()
    x[~np.isfinite(x)] = 0.0  # 1. NaN, +inf, -inf -> 0
    x[0:4] = np.clip(x[0:4], 0.0, 1.0)  # 2. S2
    for i in range(4):  # 3. S1 per band
        lo, hi = np.float32(VMIN[i]), np.float32(VMAX[i])
        b = np.clip(x[4 + i], lo, hi)
        x[4 + i] = (b - lo) / (hi - lo)
    slope = np.clip(x[9] / np.float32(90.0), 0.0, 1.0)  # 4. slope, aspect; elevation dropped
    aspect = np.clip(x[10] / np.float32(360.0), 0.0, 1.0)
    return np.concatenate([x[0:8], slope[None], aspect[None]]).astype(np.float32)


class FunctionalGum2:
    """The GUM 2.0 forward pass as functions of a state dict (eval mode). ``trace`` collects every
    named intermediate output, for layer-by-layer comparisons."""

    def __init__(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.sd = state_dict
        self.trace: dict[str, torch.Tensor] = {}

    def _bn(self, x: torch.Tensor, p: str) -> torch.Tensor:
        sd = self.sd
        return F.batch_norm(x, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"],
                            sd[f"{p}.bias"], training=False, momentum=0.0, eps=EPS)

    def _conv_bn_relu(self, x: torch.Tensor, p: str, padding: int) -> torch.Tensor:
        """An mmcv ConvModule: ``p.conv`` (no bias), ``p.bn``, ReLU."""
        return F.relu(self._bn(F.conv2d(x, self.sd[f"{p}.conv.weight"], None, 1, padding), f"{p}.bn"))

    def _block(self, x: torch.Tensor, p: str, stride: int) -> torch.Tensor:
        """A ResNet BasicBlock (timm names)."""
        sd = self.sd
        y = F.relu(self._bn(F.conv2d(x, sd[f"{p}.conv1.weight"], None, stride, 1), f"{p}.bn1"))
        y = self._bn(F.conv2d(y, sd[f"{p}.conv2.weight"], None, 1, 1), f"{p}.bn2")
        if f"{p}.downsample.0.weight" in sd:
            x = self._bn(F.conv2d(x, sd[f"{p}.downsample.0.weight"], None, stride, 0), f"{p}.downsample.1")
        return F.relu(y + x)

    def encoder(self, x: torch.Tensor, p: str) -> list[torch.Tensor]:
        """[initial 1/1, act1 1/2, layer1 1/4, layer2 1/8, layer3 1/16]."""
        sd = self.sd
        x0 = self._conv_bn_relu(x, f"{p}.initial_block.convs.0", 1)
        x0 = self._conv_bn_relu(x0, f"{p}.initial_block.convs.1", 1)
        t = F.relu(self._bn(F.conv2d(x0, sd[f"{p}.encoder.conv1.weight"], None, 2, 3), f"{p}.encoder.bn1"))
        l1 = F.max_pool2d(t, 3, 2, 1)
        for j in range(2):
            l1 = self._block(l1, f"{p}.encoder.layer1.{j}", 1)
        l2 = l1
        for j in range(2):
            l2 = self._block(l2, f"{p}.encoder.layer2.{j}", 2 if j == 0 else 1)
        l3 = l2
        for j in range(2):
            l3 = self._block(l3, f"{p}.encoder.layer3.{j}", 2 if j == 0 else 1)
        outs = [x0, t, l1, l2, l3]
        for i, o in enumerate(outs):
            self.trace[f"{p}.{i}"] = o
        return outs

    def fuse(self, i: int, s2: torch.Tensor, s1: torch.Tensor, topo: torch.Tensor) -> torch.Tensor:
        p = f"ffm.{i}"
        cat = torch.cat([self._bn(s2, f"{p}.s2_scale"), self._bn(s1, f"{p}.s1_scale"),
                         self._bn(topo, f"{p}.srtm_scale")], dim=1)
        out = F.relu(self._bn(F.conv2d(cat, self.sd[f"{p}.out.0.weight"]), f"{p}.out.1"))
        self.trace[p] = out
        return out

    def decode(self, k: int, skip: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        p = f"decoder.{k}"
        up = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        up = self._conv_bn_relu(up, f"{p}.upsample.interp_upsample.1", 0)
        y = torch.cat([skip, up], dim=1)
        y = self._conv_bn_relu(y, f"{p}.conv_block.convs.0", 1)
        y = self._conv_bn_relu(y, f"{p}.conv_block.convs.1", 1)
        self.trace[p] = y
        return y

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """PSP head: pools (1, 2, 3, 6) -> 1x1 ConvModule -> bilinear back; concat; 3x3 bottleneck;
        (dropout: identity in eval); 1x1 classifier with bias."""
        outs = [x]
        for j, scale in enumerate((1, 2, 3, 6)):
            y = self._conv_bn_relu(F.adaptive_avg_pool2d(x, scale), f"decode_head.psp_modules.{j}.1", 0)
            outs.append(F.interpolate(y, size=x.shape[2:], mode="bilinear", align_corners=False))
        y = self._conv_bn_relu(torch.cat(outs, dim=1), "decode_head.bottleneck", 1)
        logits = F.conv2d(y, self.sd["decode_head.conv_seg.weight"], self.sd["decode_head.conv_seg.bias"])
        self.trace["logits"] = logits
        return logits

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        s2 = self.encoder(x[:, 0:4], "s2_encoder")
        s1 = self.encoder(x[:, 4:8], "s1_encoder")
        topo = self.encoder(x[:, 8:10], "topo_encoder")
        y = self.fuse(4, s2[4], s1[4], topo[4])
        for i in (3, 2, 1, 0):
            y = self.decode(i, self.fuse(i, s2[i], s1[i], topo[i]), y)
        return self.head(y)


def _windows(n: int) -> list[int]:
    """0, 256, 512, ...; a window past the edge pulled back to end at it; a short axis: one window."""
    if n <= CROP:
        return [0]
    starts = list(range(0, n, CROP))
    return sorted({min(s, n - CROP) for s in starts})


def notebook_classes(state_dict: dict[str, torch.Tensor], export: np.ndarray) -> np.ndarray:
    """The mapping notebook's inference: preprocess, 256 windows without overlap (the last pulled
    back), batch 1, fp32, raw logits summed per pixel / window count, argmax (ties -> class 0)."""
    net = FunctionalGum2(state_dict)
    x = torch.from_numpy(notebook_preprocess(export))
    _, h, w = x.shape
    total = torch.zeros((2, h, w), dtype=torch.float32)
    count = torch.zeros((1, h, w), dtype=torch.float32)
    for y0 in _windows(h):
        for x0 in _windows(w):
            crop = x[:, y0 : y0 + CROP, x0 : x0 + CROP][None]
            total[:, y0 : y0 + CROP, x0 : x0 + CROP] += net(crop)[0]
            count[:, y0 : y0 + CROP, x0 : x0 + CROP] += 1
    return (total / count).argmax(0).numpy().astype(np.uint8)
