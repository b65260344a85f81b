"""Winograd convolution: the engine's fp32 CPU path for the deep 3 x 3 convolutions.

A 3 x 3, stride-1 convolution computed by Lavin and Gray's minimal filtering algorithm (2016),
F(4 x 4, 3 x 3): the input is cut into 6 x 6 tiles that overlap by 2 px, each tile and each filter
is moved into the "Winograd domain" by a fixed linear map, the convolution becomes 36 independent
matrix products (tiles x in-channels times in-channels x out-channels), and a fixed map brings each
product back to a 4 x 4 block of output. That is 36 multiplies per 16 outputs per channel pair,
against 144 for the direct convolution: 4x fewer, paid for with the transforms (memory-bound
passes over 2.25x the input) and a little fp32 rounding (the maps' coefficients reach 1/24 and 8;
relative error about 1e-5 against 1e-6 for the direct convolution, checked in
``tests/test_winograd.py``). F(2 x 2, 3 x 3) (4 x 4 tiles, 16 products, 2.25x fewer multiplies)
takes inputs too small for enough 4 x 4 tiles.

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

# Lavin & Gray's matrices: F(4, 3) (interpolation points 0, +-1, +-2, infinity) and F(2, 3)
# (0, +-1, infinity), as (BT, G, AT) by output tile side m; input tiles are m + 2 px
_MATRICES: dict[int, tuple[tuple[tuple[float, ...], ...], ...]] = {
    4: (((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0),
         (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1)),
        ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
         (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1)),
        ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1))),
    2: (((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1)),
        ((1, 0, 0), (1 / 2, 1 / 2, 1 / 2), (1 / 2, -1 / 2, 1 / 2), (0, 0, 1)),
        ((1, 1, 1, 0), (0, 1, -1, -1))),
}
#: output tile sides, in the order they are tried: F(4 x 4, 3 x 3) first (4x fewer multiplies,
#: filters 36 / 9 of the weights), then F(2 x 2, 3 x 3) (2.25x fewer, 16 / 9)
TILES = (4, 2)


def eligible(conv: nn.Module) -> bool:
    """True for a convolution this module computes: 3 x 3, stride 1, padding 1, dilation 1, one
    group, zero padding (the GUM UNet's and PSP head's 3 x 3 convolutions)."""
    return (type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros")


class WinogradConv2d(nn.Module):
    """A frozen 3 x 3 convolution computed by Winograd, for inference in fp32.

    Keeps the original ``weight`` and ``bias`` parameters (the state dict is the convolution's).
    The first input that takes this path chooses the tile: F(4 x 4, 3 x 3) when the input makes at
    least ``min_tiles`` 4 x 4 output tiles, else F(2 x 2, 3 x 3) when it makes that many 2 x 2
    tiles, else none (the direct convolution). The filters' transform for that tile (4x the
    weights' memory for F(4 x 4), 1.8x for F(2 x 2)) is made then and kept: later changes to the
    weights are not seen. Few tiles make the 36 (or 16) products short and bound by streaming
    the transformed filters from memory, for little work: GUM 1's 16 px stage at batch 1 makes 16
    tiles of 4 x 4 and 64 of 2 x 2, and its F(4 x 4) filters would take 226 MB, F(2 x 2) 100 MB.

    Inputs it does not take go to the direct convolution: sides not multiples of the tile, too
    few tiles, a dtype other than float32, a device other than the CPU, autocast, autograd. The
    module is always correct, and fast where it is used.

    ``keep_weight=False`` (the engine's private copy) drops ``weight`` once the filters are
    transformed, so the module holds them once; the direct convolution then recovers the weights
    from the transform (a left inverse of ``G``, float64; equal to about 1e-7) on each such call."""

    def __init__(self, conv: nn.Conv2d, min_tiles: int = 64, keep_weight: bool = True):
        super().__init__()
        if not eligible(conv):
            raise ValueError(f"Winograd takes a 3 x 3, stride-1, padding-1 convolution, not {conv}")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.min_tiles = int(min_tiles)
        self.keep_weight = bool(keep_weight)
        self.weight: nn.Parameter | None = conv.weight
        self.bias = conv.bias
        #: output tile side chosen on first use (None: not yet, 0: this module runs direct)
        self.tile: int | None = None
        self._u: torch.Tensor | None = None  # (a * a, C_in, C_out) transformed filters, a = tile + 2
        self._kb: torch.Tensor | None = None  # (a * a, a * a): vec(BT d B) = kron(BT, BT) vec(d)
        self._ka: torch.Tensor | None = None  # (tile * tile, a * a)

    def extra_repr(self) -> str:
        tile = {None: "tile chosen on first use", 0: "direct"}.get(self.tile, f"F({self.tile}x{self.tile}, 3x3)")
        return f"{self.in_channels}, {self.out_channels}, kernel_size=(3, 3), {tile}, min_tiles={self.min_tiles}"

    def _tiles(self, m: int, b: int, h: int, w: int) -> int:
        return 0 if h % m or w % m else b * (h // m) * (w // m)

    @torch.no_grad()
    def prepare(self, tile: int) -> None:
        """Make the transforms for output tiles of ``tile`` px: the filters ``G g G^T`` per filter,
        (a * a, C_in, C_out) float32, computed in float64 and rounded once, a block of output
        channels at a time (bounded scratch memory)."""
        bt, g, at = (torch.tensor(t, dtype=torch.float64) for t in _MATRICES[tile])
        a = tile + 2
        w = self.direct_weight().detach()
        kg = torch.kron(g, g).T.contiguous()  # (9, a * a)
        u = torch.empty((a * a, self.in_channels, self.out_channels), dtype=torch.float32)
        step = max(1, (1 << 16) // self.in_channels)
        for o in range(0, self.out_channels, step):
            blk = w[o:o + step].reshape(-1, 9).to(torch.float64) @ kg  # (co * C_in, a * a)
            u[:, :, o:o + step] = blk.view(-1, self.in_channels, a * a).permute(2, 1, 0)
        self._u = u
        self._kb = torch.kron(bt, bt).to(torch.float32)
        self._ka = torch.kron(at, at).to(torch.float32)
        self.tile = tile
        if not self.keep_weight:
            self.weight = None

    def direct_weight(self) -> torch.Tensor:
        """The convolution's weights: kept, or recovered from the transformed filters."""
        if self.weight is not None:
            return self.weight
        g = torch.tensor(_MATRICES[self.tile][1], dtype=torch.float64)
        kp = torch.kron(torch.linalg.pinv(g), torch.linalg.pinv(g))  # (9, a * a)
        w9 = (kp @ self._u.to(torch.float64).flatten(1)).T  # (C_in * C_out, 9)
        return w9.reshape(self.in_channels, self.out_channels, 3, 3).transpose(0, 1).to(torch.float32)

    def _direct(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.direct_weight(), self.bias, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        if (x.dtype != torch.float32 or x.device.type != "cpu" or torch.is_autocast_enabled("cpu")
                or (torch.is_grad_enabled() and (x.requires_grad or (self.weight is not None and self.weight.requires_grad)))):
            return self._direct(x)
        if self.tile is None:  # the first input chooses
            tile = next((m for m in TILES if self._tiles(m, b, h, w) >= self.min_tiles), 0)
            if tile:
                self.prepare(tile)
            else:
                self.tile = 0
        m = self.tile
        if not m or self._tiles(m, b, h, w) < self.min_tiles:
            return self._direct(x)
        a = m + 2
        nh, nw = h // m, w // m
        tiles = b * nh * nw
        # (B, H+2, W+2, C), zero padded; its a x a tiles at stride m as a view
        xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1))
        d = xp.unfold(1, a, m).unfold(2, a, m)  # (B, nh, nw, C, a, a)
        d = d.permute(4, 5, 0, 1, 2, 3).reshape(a * a, tiles * c)
        v = torch.mm(self._kb, d).view(a * a, tiles, c)
        prod = torch.bmm(v, self._u)  # (a * a, tiles, C_out)
        y = torch.mm(self._ka, prod.view(a * a, tiles * self.out_channels))
        y = y.view(m, m, b, nh, nw, self.out_channels).permute(2, 3, 0, 4, 1, 5)
        out = torch.empty((b, h, w, self.out_channels), dtype=x.dtype, device=x.device)
        bias = self.bias if self.bias is not None else torch.zeros((), dtype=x.dtype)
        torch.add(y, bias, out=out.view(b, nh, m, nw, m, self.out_channels))
        return out.permute(0, 3, 1, 2)  # NCHW shape, channels_last memory


def use_winograd(module: nn.Module, min_in: int = 128, min_out: int = 256, min_tiles: int = 64,
                 keep_weights: bool = True) -> int:
    """Replace, in place, each eligible 3 x 3 convolution of ``module`` with at least ``min_in``
    input and ``min_out`` output channels by a :class:`WinogradConv2d` of the same weights (taking
    inputs of at least ``min_tiles`` tiles; ``keep_weights``: see the class); returns how many. The
    thresholds are where it wins on an AVX2 CPU (docs/performance.md): with fewer channels the
    transforms cost more than they save."""
    n = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if eligible(child) and child.in_channels >= min_in and child.out_channels >= min_out:
                setattr(parent, name, WinogradConv2d(child, min_tiles, keep_weights))
                n += 1
    return n


__all__ = ["TILES", "WinogradConv2d", "eligible", "use_winograd"]
