"""gum_ray.unet rebuilds mmseg's GUM network in plain torch: same keys, same logits to the bit,
in eval and training, folded or not; and no gum-ray model path imports mmseg any more."""

from __future__ import annotations

import copy
import subprocess
import sys
import warnings

import pytest
import torch

from gum_ray.model import CONFIG_DIR, ModelSpec, build_model, randomize
from gum_ray.unet import PSPHead, UpConvBlock, fold_batchnorm

SPECS = [ModelSpec(10, 8, 4), ModelSpec(13, 8, 4)]


def mmseg_model(spec: ModelSpec) -> torch.nn.Module:
    """GUM 1 as mmseg builds it from the shipped config (what gum-ray did before gum_ray.unet)."""
    from mmengine.config import Config
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    register_all_modules(init_default_scope=True)
    name = "gum_unet_psp_products.py" if spec.in_channels == 13 else "gum_unet_psp.py"
    cfg = Config.fromfile(str(CONFIG_DIR / name))
    cfg.model.backbone.base_channels = spec.base_channels
    cfg.model.decode_head.in_channels = spec.base_channels
    cfg.model.decode_head.channels = spec.psp_channels
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return MODELS.build(cfg.model).eval()


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.encode_decode(x, [dict(img_shape=tuple(x.shape[-2:]))] * x.shape[0])


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.in_channels}ch")
def test_same_state_dict_keys_order_and_random_weights(spec):
    ref, mine = mmseg_model(spec), build_model(spec)
    assert list(ref.state_dict()) == list(mine.state_dict())
    assert [(n, p.shape) for n, p in ref.named_parameters()] == [(n, p.shape) for n, p in mine.named_parameters()]
    a, b = randomize(ref, 3).state_dict(), randomize(mine, 3).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), "randomize must draw the same weights from a seed"


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.in_channels}ch")
def test_fresh_network_initialised_as_mmseg_for_the_same_seed(spec):
    """A network trained from scratch (the demo model) starts from mmcv's init, draw for draw."""
    torch.manual_seed(11)
    ref = mmseg_model(spec).state_dict()
    torch.manual_seed(11)
    mine = build_model(spec).state_dict()
    assert all(torch.equal(ref[k], mine[k]) for k in ref)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.in_channels}ch")
def test_logits_bit_identical_to_mmseg(spec):
    ref = randomize(mmseg_model(spec), 4)
    mine = build_model(spec)
    mine.load_state_dict(ref.state_dict())
    x = torch.rand(2, spec.in_channels, 128, 160, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(_logits(ref, x), _logits(mine, x))
        assert torch.equal(mine(x), _logits(ref, x))
        # folded BN + channels_last (the engine's default layout) on both sides
        rf, mf = copy.deepcopy(ref), copy.deepcopy(mine)
        assert fold_batchnorm(rf) == fold_batchnorm(mf) > 0
        xc = x.contiguous(memory_format=torch.channels_last)
        rf.to(memory_format=torch.channels_last)
        mf.to(memory_format=torch.channels_last)
        assert torch.equal(_logits(rf, xc), _logits(mf, xc))


def test_training_step_bit_identical_to_mmseg():
    spec = SPECS[0]
    ref = randomize(mmseg_model(spec), 5)
    mine = build_model(spec)
    mine.load_state_dict(ref.state_dict())
    x = torch.rand(2, spec.in_channels, 64, 64, generator=torch.Generator().manual_seed(1))
    grads = []
    for model in (ref, mine):
        model.train()
        torch.manual_seed(7)  # the head's dropout
        loss = _logits(model, x).square().mean()
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])
    assert all(torch.equal(ref.state_dict()[k], mine.state_dict()[k]) for k in ref.state_dict()), \
        "BN running statistics must update alike"


def test_gum2_parts_bit_identical_to_mmseg():
    from mmseg.models.backbones.unet import BasicConvBlock, InterpConv
    from mmseg.models.decode_heads import PSPHead as MmsegPSP
    from mmseg.models.utils import UpConvBlock as MmsegUp

    bn = dict(type="BN", requires_grad=True)
    ref_up = MmsegUp(BasicConvBlock, 16, 8, 8, num_convs=2, norm_cfg=bn, upsample_cfg=dict(type=InterpConv))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_head = MmsegPSP(pool_scales=(1, 2, 3, 6), in_channels=8, channels=4, in_index=4, dropout_ratio=0.1,
                            num_classes=2, norm_cfg=bn, align_corners=False)
    up, head = UpConvBlock(16, 8, 8, 2), PSPHead(8, 4, 2, in_index=4)
    for ref, mine in ((ref_up, up), (ref_head, head)):
        assert list(ref.state_dict()) == list(mine.state_dict())
        mine.load_state_dict(randomize_like(ref).state_dict())
        ref.eval(), mine.eval()
    g = torch.Generator().manual_seed(2)
    skip, x = torch.rand(1, 8, 32, 32, generator=g), torch.rand(1, 16, 16, 16, generator=g)
    feats = [torch.rand(1, 8, 24, 24, generator=g) for _ in range(5)]
    with torch.no_grad():
        assert torch.equal(ref_up(skip, x), up(skip, x))
        assert torch.equal(ref_head(feats), head(feats))


def randomize_like(module: torch.nn.Module) -> torch.nn.Module:
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for t in module.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
    return module


def test_sides_not_multiple_of_16_are_refused_in_one_line():
    with pytest.raises(ValueError, match="multiples of 16"):
        build_model(SPECS[0])(torch.zeros(1, 10, 40, 64))


def test_loading_and_running_models_imports_no_mmseg(tmp_path):
    """The 3-5 s mmseg/mmcv import is gone from every model path (GUM 1 and GUM 2.0), and so is
    torch._dynamo's 1.3 s (building a network on the meta device without mmcv's init)."""
    code = (
        "import sys, torch\n"
        "from gum_ray.model import random_checkpoint, ModelSpec\n"
        "from gum_ray.network import load_model\n"
        "from gum_ray.gum2 import Gum2Spec, build_network, save_network\n"
        "from gum_ray.inference import InferenceEngine, InferenceSettings\n"
        f"random_checkpoint({str(tmp_path / 'g1.pth')!r}, ModelSpec(10, 8, 4), seed=1)\n"
        f"save_network(build_network(Gum2Spec(8, 4)), {str(tmp_path / 'g2.pth')!r}, Gum2Spec(8, 4))\n"
        "for name in ('g1.pth', 'g2.pth'):\n"
        f"    m = load_model({str(tmp_path)!r} + '/' + name)\n"
        "    InferenceEngine(m, InferenceSettings(device='cpu')).predict(torch.rand(10, 64, 64).numpy())\n"
        "bad = sorted(k for k in sys.modules if k.split('.')[0] in ('mmseg', 'mmcv', 'mmengine'))\n"
        "assert not bad, bad[:5]\n"
        "assert not {'torch._dynamo', 'sympy'} & set(sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_loaded_networks_skip_random_init_and_keep_nothing_unset(tmp_path):
    """Checkpoints load into networks built without their random init (gum_ray.unet.uninitialised):
    every tensor equals the file's, and BN counters a file omits start at 0."""
    from gum_ray.gum2 import Gum2Spec, build_network, load_network
    from gum_ray.model import load_checkpoint

    nets = {"gum1": randomize(build_model(SPECS[0]), 6), "gum2": build_network(Gum2Spec(8, 4))}
    for family, net in nets.items():
        with torch.no_grad():  # recognisable values everywhere, counters included
            for t in net.state_dict().values():
                t.copy_(torch.arange(t.numel()).reshape(t.shape) % 7 + 1)
        sd = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
        torch.save({"state_dict": sd}, tmp_path / f"{family}.pth")
        if family == "gum1":
            loaded = load_checkpoint(tmp_path / "gum1.pth").model
        else:
            loaded = load_network(torch.load(tmp_path / "gum2.pth"), tmp_path / "gum2.pth")[0]
        got = loaded.state_dict()
        assert got.keys() == net.state_dict().keys()
        for k, v in got.items():
            if k.endswith("num_batches_tracked"):
                assert int(v) == 0, k
            else:
                assert torch.equal(v, sd[k]), k
        assert not loaded.training


def test_conv_before_upsample_only_where_folded_and_the_same_function():
    from gum_ray.gum2 import Gum2Spec, build_network
    from gum_ray.gum2 import randomize as randomize2
    from gum_ray.unet import InterpConv, conv_before_upsample

    x = torch.rand(1, 10, 64, 96, generator=torch.Generator().manual_seed(3))
    for net in (randomize(build_model(SPECS[0]), 8), randomize2(build_network(Gum2Spec(8, 4)), 8)):
        assert conv_before_upsample(net) == 0, "BN not folded: the order must stay mmseg's"
        fold_batchnorm(net)
        with torch.no_grad():
            ref = net(x)
            assert conv_before_upsample(net) == 4  # one per decoder stage
            got = net(x)
        assert all(m.conv_first for m in net.modules() if isinstance(m, InterpConv))
        assert not torch.equal(got, ref), "the conv must run before the upsampling"
        assert (got - ref).abs().max() <= 1e-4 * max(1.0, float(ref.abs().max()))
