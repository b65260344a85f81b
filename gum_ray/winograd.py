"""Winograd F(4 x 4, 3 x 3) convolution: the engine's fp32 CPU path for the deep 3 x 3 convolutions.

A 3 x 3, stride-1 convolution computed by Lavin and Gray's minimal filtering algorithm (2016): the
input is cut into 6 x 6 tiles that overlap by 2 px, each tile and each filter is moved into the
"Winograd domain" by a fixed 6 x 6 linear map, the convolution becomes 36 independent matrix products
(tiles x in-channels times in-channels x out-channels), and a fixed 4 x 6 map brings each product back
to a 4 x 4 block of output. That is 36 multiplies per 16 outputs per channel pair, against 144 for
the direct convolution: 4x fewer, paid for with the transforms (memory-bound passes over 2.25x the
input) and a little fp32 rounding (the maps' coefficients reach 1/24 and 8; relative error about
1e-5 against 1e-6 for the direct convolution, checked in ``tests/test_winograd.py``).

Why here: oneDNN offers a Winograd convolution only on AVX-512 CPUs; on an AVX2 CPU it runs the
direct algorithm, and on GUM's deep layers (256-1024 channels at 16-64 px) at 55-60 % of what the
same CPU does on a matrix product (``docs/performance.md``). Those layers are half of a GUM 1
crop's time on such a CPU. The matrix products here go to torch's BLAS.

Where not: the shallow layers (64-128 channels at 128-256 px) lose, since there the transforms cost
more than the multiplies they save; bf16 and fp16 lose precision in the transforms (about 8 bits of
mantissa against coefficients up to 8); a GPU's cuDNN picks Winograd itself. The engine swaps the
convolutions in its own folded copy of the model only (:func:`use_winograd`), for fp32 on a CPU and
never under the seed settings, which keep the seed's arithmetic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: output tile side (m) and input tile side (m + 2) of F(4 x 4, 3 x 3)
TILE = 4
ALPHA = TILE + 2

# Lavin & Gray's F(4, 3) matrices (interpolation points 0, +-1, +-2, infinity)
_BT = ((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0),
       (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1))
_G = ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
      (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1))
_AT = ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1))


def eligible(conv: nn.Module) -> bool:
    """True for a convolution this module computes: 3 x 3, stride 1, padding 1, dilation 1, one
    group, zero padding (the GUM UNet's and PSP head's 3 x 3 convolutions)."""
    return (type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros")


class WinogradConv2d(nn.Module):
    """A frozen 3 x 3 convolution computed by Winograd F(4 x 4, 3 x 3), for inference in fp32.

    Keeps the original ``weight`` and ``bias`` parameters (the state dict is the convolution's).
    The filters' transform (36 / 9 = 4x the weights' memory) is made on the first input that takes
    this path and kept: later changes to the weights are not seen.

    Inputs with fewer than ``min_tiles`` 4 x 4 output tiles go to the direct convolution: there
    the 36 products have few rows and stream the transformed filters from memory for little work,
    so the gain is small and the memory is the largest (GUM's 16 px stage at batch 1: 16 tiles,
    226 MB of transformed filters). So do inputs it does not take at all: sides not multiples of
    4, a dtype other than float32, a device other than the CPU, autocast, autograd. The module is
    always correct, and fast where it is used."""

    def __init__(self, conv: nn.Conv2d, min_tiles: int = 64):
        super().__init__()
        if not eligible(conv):
            raise ValueError(f"Winograd F(4x4, 3x3) takes a 3 x 3, stride-1, padding-1 convolution, not {conv}")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.min_tiles = int(min_tiles)
        self.weight = conv.weight
        self.bias = conv.bias
        self._u: torch.Tensor | None = None  # (36, C_in, C_out) transformed filters, made on first use
        bt = torch.tensor(_BT, dtype=torch.float64)
        at = torch.tensor(_AT, dtype=torch.float64)
        self._kb = torch.kron(bt, bt).to(torch.float32)  # (36, 36): vec(BT d B) = kron(BT, BT) vec(d)
        self._ka = torch.kron(at, at).to(torch.float32)  # (16, 36)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size=(3, 3), F(4x4, 3x3), min_tiles={self.min_tiles}"

    @torch.no_grad()
    def filters(self) -> torch.Tensor:
        """The transformed filters, ``G g G^T`` per filter, (36, C_in, C_out) float32: computed in
        float64 and rounded once, a block of output channels at a time (bounded scratch memory)."""
        if self._u is None:
            w = self.weight.detach()
            g = torch.tensor(_G, dtype=torch.float64, device=w.device)
            kg = torch.kron(g, g).T.contiguous()  # (9, 36)
            u = torch.empty((ALPHA * ALPHA, self.in_channels, self.out_channels), dtype=torch.float32,
                            device=w.device)
            step = max(1, (1 << 16) // self.in_channels)
            for o in range(0, self.out_channels, step):
                blk = w[o:o + step].reshape(-1, 9).to(torch.float64) @ kg  # (co * C_in, 36)
                u[:, :, o:o + step] = blk.view(-1, self.in_channels, ALPHA * ALPHA).permute(2, 1, 0)
            self._u = u
        return self._u

    def _direct(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        nh, nw = h // TILE, w // TILE
        tiles = b * nh * nw
        if (h % TILE or w % TILE or tiles < self.min_tiles or x.dtype != torch.float32
                or x.device.type != "cpu" or torch.is_autocast_enabled("cpu")
                or (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))):
            return self._direct(x)
        u = self.filters()
        # (B, H+2, W+2, C), zero padded; its 6 x 6 tiles at stride 4 as a view
        xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1))
        d = xp.unfold(1, ALPHA, TILE).unfold(2, ALPHA, TILE)  # (B, nh, nw, C, 6, 6)
        d = d.permute(4, 5, 0, 1, 2, 3).reshape(ALPHA * ALPHA, tiles * c)
        v = torch.mm(self._kb, d).view(ALPHA * ALPHA, tiles, c)
        m = torch.bmm(v, u)  # (36, tiles, C_out)
        y = torch.mm(self._ka, m.view(ALPHA * ALPHA, tiles * self.out_channels))
        y = y.view(TILE, TILE, b, nh, nw, self.out_channels).permute(2, 3, 0, 4, 1, 5)
        out = torch.empty((b, h, w, self.out_channels), dtype=x.dtype, device=x.device)
        bias = self.bias if self.bias is not None else torch.zeros((), dtype=x.dtype)
        torch.add(y, bias, out=out.view(b, nh, TILE, nw, TILE, self.out_channels))
        return out.permute(0, 3, 1, 2)  # NCHW shape, channels_last memory


def use_winograd(module: nn.Module, min_in: int = 128, min_out: int = 256, min_tiles: int = 64) -> int:
    """Replace, in place, each eligible 3 x 3 convolution of ``module`` with at least ``min_in``
    input and ``min_out`` output channels by a :class:`WinogradConv2d` of the same weights (taking
    inputs of at least ``min_tiles`` tiles); returns how many. The thresholds are where it wins on
    an AVX2 CPU (docs/performance.md): fewer channels, and the transforms cost more than they save."""
    n = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if eligible(child) and child.in_channels >= min_in and child.out_channels >= min_out:
                setattr(parent, name, WinogradConv2d(child, min_tiles))
                n += 1
    return n


__all__ = ["ALPHA", "TILE", "WinogradConv2d", "eligible", "use_winograd"]
