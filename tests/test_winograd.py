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

SMALL = ModelSpec(10, 32, 4)  # channels 32 ... 512: six convs swapped, four of them at 32 px used


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


@pytest.mark.parametrize("cin,cout,b,h,w,bias", [
    (256, 512, 1, 32, 32, True), (300, 260, 2, 16, 24, False), (64, 128, 3, 8, 4, True), (1, 3, 1, 4, 8, True)])
def test_winograd_equals_the_direct_convolution_to_fp32_rounding(cin, cout, b, h, w, bias):
    c = conv(cin, cout, bias)
    x = torch.randn(b, cin, h, w).contiguous(memory_format=torch.channels_last)
    wc = WinogradConv2d(c, min_tiles=1)
    with torch.no_grad():
        ref = F.conv2d(x.double(), c.weight.double(), None if c.bias is None else c.bias.double(), padding=1)
        y = wc(x)
        direct = c(x)
    assert wc._u is not None  # the Winograd path ran
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
    wc._u = wc.filters().roll(1, dims=0)  # the 36 products in the wrong places
    with torch.no_grad():
        ref = F.conv2d(x.double(), c.weight.double(), c.bias.double(), padding=1)
        assert relative_error(wc(x), ref) > 1e-2


def test_what_it_does_not_take_goes_to_the_direct_convolution():
    c = conv(16, 16)
    wc = WinogradConv2d(c, min_tiles=1)
    with torch.no_grad():
        x = torch.randn(1, 16, 18, 10)  # sides not multiples of 4
        assert torch.equal(wc(x), c(x))
        few = WinogradConv2d(c, min_tiles=64)
        x = torch.randn(1, 16, 28, 32)  # 56 tiles, fewer than 64: the direct conv, no filters made
        assert torch.equal(few(x), c(x)) and few._u is None
        x = torch.randn(2, 16, 28, 32)  # 112 tiles
        assert not torch.equal(few(x), c(x)) and few._u is not None
        assert wc._u is None
        with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 transforms would lose the precision
            y = wc(torch.randn(1, 16, 8, 8))
        assert y.dtype == torch.bfloat16
    x = torch.randn(1, 16, 8, 8, requires_grad=True)  # training: autograd through the direct conv
    y = wc(x)
    assert torch.equal(y, c(x))
    y.sum().backward()
    assert x.grad is not None


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
    used = {n for n, m in fast.named_modules() if isinstance(m, WinogradConv2d) and m._u is not None}
    assert len(used) == 8 and not any(n.startswith("backbone.encoder.4") for n in used)  # 16 px: 16 tiles


def test_engine_uses_winograd_for_fp32_on_a_cpu_only_and_never_at_seed_settings():
    model = Gum1.from_module(randomize(build_model(SMALL), 4))
    x = bands.preprocess(fake_export(300, 280, seed=3))
    fast = InferenceEngine(model, InferenceSettings(precision="fp32", device="cpu"))
    assert fast.winograd_convs == 6 and fast.folded > 0
    assert not any(isinstance(m, WinogradConv2d) for m in model.module.modules())  # on the engine's copy
    plain = InferenceEngine(model, InferenceSettings(precision="fp32", device="cpu", winograd=False))
    assert plain.winograd_convs == 0
    a, b = fast.predict(x), plain.predict(x)
    assert sum(m._u is not None for m in fast.model.module.modules() if isinstance(m, WinogradConv2d)) == 4
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


@pytest.mark.parametrize("flag,expected", [("auto", None), ("on", True), ("off", False)])
def test_the_winograd_flag_reaches_the_settings(flag, expected):
    p = argparse.ArgumentParser()
    add_inference_arguments(p)
    assert settings_from_args(p.parse_args(["--winograd", flag])).winograd is expected
    assert settings_from_args(p.parse_args(["--seed-settings"])).winograd is False
