"""GUM 2.0 (issue 11): the network matches the published facts (names, shapes, parameter count),
layer by layer and class for class against an independent transcription of the authors' notebook
(tests/gum2_reference.py), loads strictly, and preprocesses as the notebook."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
import torch

from gum_ray.export_io import open_export
from gum_ray.gum2 import (
    GUM2_RELEASED,
    Gum2,
    Gum2Spec,
    UNetResMultiEnc,
    build_network,
    preprocess,
    validity_mask,
)
from gum_ray.inference import InferenceEngine, InferenceSettings, flops_per_crop
from gum_ray.network import UrbanModel, detect_family, load_model
from gum_ray.predict import predict_file
from tests.gum2_reference import FunctionalGum2, notebook_classes, notebook_preprocess
from tests.helpers import random_export, require_realdata, write_export
from tests.hostile import gum_cli

# shapes stated on the reference page
PUBLISHED_SHAPES = {
    "s2_encoder.initial_block.convs.0.conv.weight": (64, 4, 3, 3),
    "s2_encoder.encoder.conv1.weight": (64, 64, 7, 7),
    "s2_encoder.encoder.layer2.0.conv1.weight": (128, 64, 3, 3),
    "s2_encoder.encoder.layer2.0.downsample.0.weight": (128, 64, 1, 1),
    "ffm.3.s1_scale.weight": (128,),
    "ffm.3.out.0.weight": (128, 384, 1, 1),
    "decoder.3.upsample.interp_upsample.1.conv.weight": (128, 256, 1, 1),
    "decoder.3.conv_block.convs.0.conv.weight": (128, 256, 3, 3),
    "decode_head.psp_modules.0.1.conv.weight": (16, 64, 1, 1),
    "decode_head.bottleneck.conv.weight": (16, 128, 3, 3),
    "decode_head.conv_seg.weight": (2, 16, 1, 1),
    "decode_head.conv_seg.bias": (2,),
    "topo_encoder.initial_block.convs.0.conv.weight": (64, 2, 3, 3),
}


def training_head(width: int = 64) -> dict[str, torch.Tensor]:
    """The authors' training-only ``kw_decode_head`` (3x3 conv + bias, BN, ReLU, 1x1 conv + bias)."""
    return {
        "kw_decode_head.0.weight": torch.randn(width, width, 3, 3), "kw_decode_head.0.bias": torch.zeros(width),
        "kw_decode_head.1.weight": torch.ones(width), "kw_decode_head.1.bias": torch.zeros(width),
        "kw_decode_head.1.running_mean": torch.zeros(width), "kw_decode_head.1.running_var": torch.ones(width),
        "kw_decode_head.1.num_batches_tracked": torch.tensor(0),
        "kw_decode_head.3.weight": torch.randn(2, width, 1, 1), "kw_decode_head.3.bias": torch.zeros(2),
    }


def authors_checkpoint(path, net: torch.nn.Module, with_head: bool = True, **changes) -> str:
    """A checkpoint in the authors' layout ({"epoch", "state_dict", "lr"}); ``changes`` edit keys
    (a value of None deletes the key)."""
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    if with_head:
        sd.update(training_head(net.spec.width))
    for k, v in changes.items():
        k = k.replace("__", ".")
        if v is None:
            del sd[k]
        else:
            sd[k] = v
    torch.save({"epoch": 41, "state_dict": sd, "lr": 1.5e-5}, path)
    return str(path)


@pytest.fixture(scope="module")
def released():
    return build_network(GUM2_RELEASED)


@pytest.fixture(scope="module")
def tiny() -> Gum2:
    """A width-8 GUM 2.0 with random, calibrated weights."""
    return Gum2.random(8, seed=2, size=32)


def test_released_network_has_the_published_parameter_count_keys_and_shapes(released):
    sd = released.state_dict()
    assert len(sd) == 515
    assert sum(p.numel() for p in released.parameters()) == 10_174_530
    assert len(sd) + len(training_head()) == 524
    for key, shape in PUBLISHED_SHAPES.items():
        assert tuple(sd[key].shape) == shape, key
    assert not any(k.startswith(("s2_encoder.encoder.layer4", "s2_encoder.encoder.fc")) for k in sd)


def test_released_network_costs_about_70_6_gflop_per_crop(released):
    model = Gum2(released)
    assert flops_per_crop(model) / 1e9 == pytest.approx(70.6, rel=0.01)


def test_layer_by_layer_features_equal_the_independent_functional_reference():
    model = Gum2.random(GUM2_RELEASED, seed=4, size=64)
    x = torch.from_numpy(np.random.default_rng(0).uniform(0, 1, (2, 10, 64, 64)).astype(np.float32))
    ref = FunctionalGum2(model.module.state_dict())
    want_logits = ref(x)
    got: dict[str, torch.Tensor] = {}
    net = model.module
    hooks = []
    for name in ("s2_encoder", "s1_encoder", "topo_encoder"):
        hooks.append(getattr(net, name).register_forward_hook(
            lambda m, i, o, name=name: got.update({f"{name}.{j}": t.clone() for j, t in enumerate(o)})))
    for i in range(5):
        hooks.append(net.ffm[i].register_forward_hook(lambda m, a, o, i=i: got.update({f"ffm.{i}": o.clone()})))
    for k in range(4):
        hooks.append(net.decoder[k].register_forward_hook(lambda m, a, o, k=k: got.update({f"decoder.{k}": o.clone()})))
    with torch.no_grad():
        logits = model.forward(x)
    for h in hooks:
        h.remove()
    assert set(ref.trace) - {"logits"} == set(got), "the reference and the module name the same stages"
    for name, want in ref.trace.items():
        have = logits if name == "logits" else got[name]
        assert have.shape == want.shape, name
        torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    assert torch.equal(logits, want_logits)
    # the five decoder-side features have the published channels and scales
    assert [tuple(got[f"ffm.{i}"].shape[1:]) for i in range(5)] == [
        (64, 64, 64), (64, 32, 32), (64, 16, 16), (128, 8, 8), (256, 4, 4)]


def test_preprocessing_is_the_notebooks_to_the_bit_and_masks_a_missing_s1():
    export = random_export(40, 50, seed=2)
    export[4:8] += np.float32(8.0)  # past vmax on some pixels: clipped
    export[0, :3] = np.nan
    export[1, 3:5] = np.inf
    export[5, 5:7] = -np.inf
    export[4:8, 7:9] = np.nan  # no S1 at all
    export[4, 9:11] = np.nan  # one S1 band missing
    export[0:4, 11:13] = np.nan  # no S2
    export[9, 13] = np.nan
    want = notebook_preprocess(export)
    assert np.array_equal(preprocess(export, mask_missing=False), want)
    got = preprocess(export)
    assert got.dtype == np.float32 and got.shape == (10, 40, 50)
    assert (got[4:8, 7:9] == 0).all(), "no S1: the four S1 channels are the training's mask value 0"
    rest = np.ones((40, 50), bool)
    rest[7:9] = False
    assert np.array_equal(got[:, rest], want[:, rest])
    assert (got[0:4, 11:13] == 0).all(), "no S2: NaN -> 0 is already the mask value"
    # 14 bands: the products are ignored
    assert np.array_equal(preprocess(random_export(8, 8, bands=14, seed=1)), preprocess(random_export(8, 8, seed=1)))


def test_validity_maps_a_pixel_with_s2_or_s1():
    export = random_export(4, 4)
    export[0:4, 0] = np.nan  # no S2, S1 present: mapped
    export[4:8, 1] = np.nan  # no S1: mapped
    export[0:8, 2] = np.nan  # neither: no data
    export[8:11, 3] = np.nan  # no terrain: mapped (terrain 0, as in the notebook)
    assert validity_mask(export).tolist() == [[True] * 4, [True] * 4, [False] * 4, [True] * 4]


def test_a_demo_width_model_saves_loads_and_is_detected_as_gum2(tmp_path):
    model = Gum2.random(8, seed=1, size=32)
    assert isinstance(model, UrbanModel) and model.spec == Gum2Spec(8, 2)
    sha = model.save(tmp_path / "demo2.pth", {"note": "demo"})
    back = load_model(tmp_path / "demo2.pth")
    assert isinstance(back, Gum2) and back.family == "gum2"
    assert back.provenance() == {"family": "gum2", "checkpoint": "demo2.pth", "checkpoint_sha256": sha,
                                 "spec": {"in_channels": 10, "width": 8, "psp_channels": 2}}
    assert back.meta["note"] == "demo"
    x = torch.rand(1, 10, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.forward(x), back.forward(x))
    assert {id(m) for m in back.encoder} == {id(back.module.s2_encoder), id(back.module.s1_encoder),
                                             id(back.module.topo_encoder)}


def test_the_authors_layout_loads_strictly_dropping_only_the_training_head(tmp_path, tiny):
    net = tiny.module
    path = authors_checkpoint(tmp_path / "GUM_2p0.pth", net)
    model = load_model(path)
    assert isinstance(model, Gum2) and model.meta == {"epoch": 41, "lr": 1.5e-5}
    for k, v in net.state_dict().items():
        assert torch.equal(model.module.state_dict()[k], v), k
    # DataParallel's prefix and a bare state dict load too (as for GUM 1)
    bare = {f"module.{k}": v for k, v in net.state_dict().items()}
    torch.save(bare, tmp_path / "bare.pth")
    assert detect_family(bare) == "gum2" and isinstance(load_model(tmp_path / "bare.pth"), Gum2)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"ffm__3__out__0__weight": None}, "key 'ffm.3.out.0.weight' of the GUM 2.0 network (width 8) is missing"),
        ({"decoder__1__conv_block__convs__0__conv__weight": torch.zeros(8, 8, 3, 3)},
         "key 'decoder.1.conv_block.convs.0.conv.weight' has shape (8, 8, 3, 3), the GUM 2.0 network "
         "(width 8) needs (8, 16, 3, 3)"),
        ({"s1_encoder__encoder__layer4__0__conv1__weight": torch.zeros(1)},
         "unexpected key 's1_encoder.encoder.layer4.0.conv1.weight'"),
        ({"decode_head__conv_seg__bias": torch.tensor([0.0, float("nan")])},
         "key 'decode_head.conv_seg.bias' contains NaN or inf values"),
    ],
    ids=["missing", "misshapen", "unknown", "nan"],
)
def test_a_broken_gum2_checkpoint_is_one_line_naming_the_key(tmp_path, tiny, change, message):
    from gum_ray.errors import CheckpointError

    path = authors_checkpoint(tmp_path / "bad.pth", tiny.module, **change)
    with pytest.raises(CheckpointError) as exc:
        load_model(path)
    assert str(exc.value).startswith(f"checkpoint {path}: ") and message in str(exc.value)
    assert "\n" not in str(exc.value)


def _aberystwyth(rows: slice, cols: slice) -> np.ndarray:
    with open_export(require_realdata()) as src:
        return src.read_rows(0, src.height)[:, rows, cols]


def _calibration(export: np.ndarray, seed: int) -> np.ndarray:
    """The scene as the notebook preprocesses it, with smooth random S1 (the scene has none: its
    constant S1 would leave the S1 encoder's BatchNorm statistics degenerate). The classifier is
    then centred on the scene itself, so that both classes appear."""
    x = notebook_preprocess(export)
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.uniform(0, 1, (1, 4, 16, 16)).astype(np.float32))
    x[4:8] = torch.nn.functional.interpolate(coarse, size=x.shape[1:], mode="bilinear")[0].numpy()
    return x


def _seed_run(tmp_path, export: np.ndarray, spec: Gum2Spec, seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    """(the reference's classes, the export, the checkpoint: a random GUM 2.0 at ``spec``)."""
    ckpt = str(tmp_path / "gum2_random.pth")
    model = Gum2.random(spec, seed=seed, calibrate_on=_calibration(export, seed),
                        centre_on=notebook_preprocess(export))
    model.save(ckpt)
    reference = notebook_classes(torch.load(ckpt, weights_only=True)["state_dict"], export)
    assert 0.02 < reference.mean() < 0.98, "random weights must give both classes"
    return reference, export, ckpt


def test_seed_settings_equal_the_notebook_on_a_window_of_real_imagery(tmp_path):
    """Fast version (a 256 x 300 window: 2 crops, the second pulled back; width 16)."""
    export = _aberystwyth(slice(600, 856), slice(0, 300))
    reference, export, ckpt = _seed_run(tmp_path, export, Gum2Spec(16, 4), seed=5)
    scene = write_export(tmp_path / "scene.tif", export)
    engine = InferenceEngine(load_model(ckpt, family="gum2"), InferenceSettings.seed(device="cpu"))
    predict_file(engine, scene, tmp_path / "out.tif")
    with rasterio.open(tmp_path / "out.tif") as out:
        label = out.read(2)
        assert out.tags()["model_family"] == "gum2"
    mapped = validity_mask(export)
    assert (label[~mapped] == 255).all()
    differ = int((label[mapped] != reference[mapped]).sum())
    assert differ == 0, f"{differ} pixels differ from the notebook's inference"


@pytest.mark.slow
def test_gum_predict_seed_settings_equals_the_notebook_on_the_whole_real_scene(tmp_path):
    """The released width on the whole Aberystwyth scene (947 x 931: 4 x 4 crops), through the CLI."""
    export = _aberystwyth(slice(None), slice(None))
    reference, export, ckpt = _seed_run(tmp_path, export, GUM2_RELEASED, seed=11)
    out = tmp_path / "aber_gum2.tif"
    r = gum_cli("predict", require_realdata(), out, "--checkpoint", ckpt, "--model", "gum2",
                "--seed-settings", "--device", "cpu", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and "Warning" not in r.stderr
    with rasterio.open(out) as src:
        label = src.read(2)
    mapped = validity_mask(export)
    assert mapped.mean() > 0.99 and (label[~mapped] == 255).all()
    differ = int((label[mapped] != reference[mapped]).sum())
    assert differ == 0, f"{differ} of {int(mapped.sum())} pixels differ from the notebook's inference"


def test_convert_checkpoint_writes_a_tensors_only_gum2_file(tmp_path, tiny):
    from gum_ray.checkpoint_convert import convert_checkpoint
    from gum_ray.checkpoint_io import file_sha256

    src = authors_checkpoint(tmp_path / "GUM_2p0.pth", tiny.module)
    sha, loaded = convert_checkpoint(src, tmp_path / "GUM_2p0.safetensors")
    model = load_model(tmp_path / "GUM_2p0.safetensors")
    assert isinstance(model, Gum2) and model.provenance()["checkpoint_sha256"] == sha
    assert model.meta["source_sha256"] == file_sha256(src) and model.meta["family"] == "gum2"
    for k, v in tiny.module.state_dict().items():
        assert torch.equal(model.module.state_dict()[k], v), k
