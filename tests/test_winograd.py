"""Winograd F(4 x 4, 3 x 3) convolutions (gum_ray.winograd) and where the engine uses them."""

from __future__ import annotations

import argparse
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gum_ray import bands
from gum_ray.commands.predict import add_inference_arguments, settings_from_args
from gum_ray.errors import InputError
from gum_ray.inference import InferenceEngine, InferenceSettings
from gum_ray.model import GUM_10, Gum1, ModelSpec, build_model, randomize
from gum_ray.winograd import WinogradConv2d, eligible, use_winograd
from tests.test_device_path import fake_export

SMALL = ModelSpec(10, 32, 4)  # channels 32 ... 512: six convs swapped, two of them at 16 px (2 x 2 tiles)


def conv(cin: int, cout: int, bias: bool = True, seed: int = 0) -> nn.Conv2d:
    torch.manual_seed(seed)
    c = nn.Conv2d(cin, cout, 3, padding=1, bias=bias)
    with torch.no_grad():
        c.weight.normal_(0, (2 / (9 * cin)) ** 0.5)
        if bias:
            c.bias.normal_(0, 0.5)
    return c.eval()


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("cin,cout,b,h,w,bias,tile", [
    (256, 512, 1, 32, 32, True, 4), (300, 260, 2, 16, 24, False, 4), (64, 128, 3, 8, 4, True, 4),
    (1, 3, 1, 4, 8, True, 4), (256, 512, 1, 10, 6, True, 2), (96, 40, 2, 14, 18, False, 2)])
def test_winograd_equals_the_direct_convolution_to_fp32_rounding(cin, cout, b, h, w, bias, tile):
    c = conv(cin, cout, bias)
    x = torch.randn(b, cin, h, w).contiguous(memory_format=torch.channels_last)
    wc = WinogradConv2d(c, min_tiles=1)
    with torch.no_grad():
        ref = F.conv2d(x.double(), c.weight.double(), None if c.bias is None else c.bias.double(), padding=1)
        y = wc(x)
        direct = c(x)
    assert wc.tile == tile and wc._u is not None  # the Winograd path ran, with the tile that fits
    assert y.shape == ref.shape and y.dtype == torch.float32
    assert y.is_contiguous(memory_format=torch.channels_last)
    # about 1e-5 (the transforms' coefficients reach 1/24 and 8); the direct fp32 conv is about 1e-6
    assert relative_error(y, ref) < 5e-5
    assert relative_error(direct, ref) < 5e-5
    # and the same from an NCHW input
    with torch.no_grad():
        assert relative_error(wc(x.contiguous()), ref) < 5e-5


def test_a_wrong_transform_would_be_caught():
    c = conv(32, 32)
    x = torch.randn(1, 32, 16, 16)
    wc = WinogradConv2d(c, min_tiles=1)
    wc.prepare(4)
    wc._u = wc._u.roll(1, dims=0)  # the 36 products in the wrong places
    with torch.no_grad():
        ref = F.conv2d(x.double(), c.weight.double(), c.bias.double(), padding=1)
        assert relative_error(wc(x), ref) > 1e-2


def test_what_it_does_not_take_goes_to_the_direct_convolution():
    c = conv(16, 16)
    wc = WinogradConv2d(c, min_tiles=1)
    with torch.no_grad():
        x = torch.randn(1, 16, 17, 9)  # odd sides: no tile fits
        assert torch.equal(wc(x), c(x))
        assert wc._u is None
        few = WinogradConv2d(c, min_tiles=64)
        x = torch.randn(1, 16, 12, 12)  # 9 tiles of 4 x 4, 36 of 2 x 2: the direct conv, no filters
        assert torch.equal(few(x), c(x)) and few._u is None and few.tile == 0
        x = torch.randn(1, 16, 32, 32)  # enough tiles now, but the first input chose: direct
        assert torch.equal(few(x), c(x)) and few._u is None
        for side, tile in ((16, 2), (32, 4)):  # 16 px: 16 tiles of 4 x 4, 64 of 2 x 2; 32 px: 64 of 4 x 4
            m = WinogradConv2d(c, min_tiles=64)
            x = torch.randn(1, 16, side, side)
            assert not torch.equal(m(x), c(x)) and m.tile == tile
            assert relative_error(m(x), F.conv2d(x.double(), c.weight.double(), c.bias.double(), padding=1)) < 5e-5
        fresh = WinogradConv2d(c, min_tiles=1)  # would take 8 x 8 inputs (4 tiles of 4 x 4)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 transforms would lose the precision
            y = fresh(torch.randn(1, 16, 8, 8))
        assert y.dtype == torch.bfloat16 and fresh._u is None
    x = torch.randn(1, 16, 8, 8, requires_grad=True)  # training: autograd through the direct conv
    y = fresh(x)
    assert torch.equal(y, c(x)) and fresh._u is None
    y.sum().backward()
    assert x.grad is not None
    with torch.no_grad():  # and the same module takes the next plain fp32 input
        assert not torch.equal(fresh(x), c(x)) and fresh.tile == 4


def test_only_plain_3x3_stride_1_convolutions_are_eligible():
    assert eligible(nn.Conv2d(8, 8, 3, padding=1))
    for other in (nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.Conv2d(8, 8, 3, padding=2, dilation=2),
                  nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.Conv2d(8, 8, 3, padding=0),
                  nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect")):
        assert not eligible(other)
        with pytest.raises(ValueError):
            WinogradConv2d(other)


def test_gum1_deep_convs_swapped_with_the_same_weights_and_logits():
    net = build_model(GUM_10)  # mmcv's initialisation
    fast = copy.deepcopy(net)
    assert use_winograd(fast) == 10  # 128-1024 channels at 16-64 px: both stages' convs
    swapped = [n for n, m in fast.named_modules() if isinstance(m, WinogradConv2d)]
    assert all(n.startswith(("backbone.encoder.2", "backbone.encoder.3", "backbone.encoder.4",
                             "backbone.decoder.2", "backbone.decoder.3")) for n in swapped)
    before, after = net.state_dict(), fast.state_dict()
    assert list(before) == list(after) and all(torch.equal(before[k], after[k]) for k in before)
    x = torch.rand(1, 10, 256, 256)
    with torch.inference_mode():
        ref, y = net(x), fast(x)
    assert (y - ref).abs().max() <= 1e-5 * ref.abs().max() + 1e-4
    tiles = {n: m.tile for n, m in fast.named_modules() if isinstance(m, WinogradConv2d)}
    assert len(tiles) == 10  # 16 px (the deepest stage): 16 tiles of 4 x 4, 64 of 2 x 2
    assert all(t == (2 if n.startswith("backbone.encoder.4") else 4) for n, t in tiles.items()), tiles


def test_engine_uses_winograd_for_fp32_on_a_cpu_only_and_never_at_seed_settings():
    model = Gum1.from_module(randomize(build_model(SMALL), 4))
    x = bands.preprocess(fake_export(300, 280, seed=3))
    fast = InferenceEngine(model, InferenceSettings(precision="fp32", device="cpu"))
    assert fast.winograd_convs == 6 and fast.folded > 0
    assert not any(isinstance(m, WinogradConv2d) for m in model.module.modules())  # on the engine's copy
    plain = InferenceEngine(model, InferenceSettings(precision="fp32", device="cpu", winograd=False))
    assert plain.winograd_convs == 0
    a, b = fast.predict(x), plain.predict(x)
    used = [m for m in fast.model.module.modules() if isinstance(m, WinogradConv2d)]
    assert sorted(m.tile for m in used) == [2, 2, 4, 4, 4, 4]
    assert all(m.weight is None for m in used)  # the engine's copy holds the transformed filters only
    np.testing.assert_allclose(a.probability, b.probability, atol=1e-4)
    assert (a.label != b.label).mean() < 1e-3
    assert InferenceEngine(model, InferenceSettings.seed(device="cpu")).winograd_convs == 0
    assert InferenceEngine(model, InferenceSettings(precision="bf16", device="cpu")).winograd_convs == 0
    assert InferenceEngine(model, InferenceSettings(precision="fp32", device="cpu", channels_last=False)
                           ).winograd_convs == 0  # follows BN folding
    forced = InferenceEngine(model, InferenceSettings(precision="fp32", device="cpu", channels_last=False,
                                                      winograd=True))
    assert forced.winograd_convs == 6 and forced.folded == 0
    with pytest.raises(InputError, match="winograd"):
        InferenceEngine(model, InferenceSettings(precision="bf16", device="cpu", winograd=True))


def test_without_kept_weights_the_direct_path_recovers_them():
    c = conv(64, 96)
    wc = WinogradConv2d(c, min_tiles=1, keep_weight=False)
    with torch.no_grad():
        x = torch.randn(1, 64, 16, 16)
        ref = F.conv2d(x.double(), c.weight.double(), c.bias.double(), padding=1)
        assert relative_error(wc(x), ref) < 5e-5 and wc.tile == 4
        assert wc.weight is None and "weight" not in wc.state_dict()  # held once, transformed
        assert (wc.direct_weight() - c.weight).abs().max() <= 1e-6 * c.weight.abs().max()
        odd = torch.randn(1, 64, 9, 7)  # no tile fits: the direct conv on the recovered weights
        assert relative_error(wc(odd), F.conv2d(odd.double(), c.weight.double(), c.bias.double(), padding=1)) < 1e-5


@pytest.mark.parametrize("flag,expected", [("auto", None), ("on", True), ("off", False)])
def test_the_winograd_flag_reaches_the_settings(flag, expected):
    p = argparse.ArgumentParser()
    add_inference_arguments(p)
    assert settings_from_args(p.parse_args(["--winograd", flag])).winograd is expected
    assert settings_from_args(p.parse_args(["--seed-settings"])).winograd is False
