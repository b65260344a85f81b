import torch
import pytest

from gum_ray.errors import CheckpointError
from gum_ray.model import (GUM_10, GUM_13, ModelSpec, build_model, file_sha256, load_checkpoint,
                           random_checkpoint, randomize, save_checkpoint)

TINY = ModelSpec(10, 8, 4)


class HistoryLike:
    """Stands for the Python objects mmengine pickles into training checkpoints."""


def test_gum_network_matches_the_reference_facts():
    model = build_model(GUM_10)
    params = [p for p in model.state_dict().items() if not p[0].endswith("num_batches_tracked")]
    n = sum(v.numel() for k, v in model.named_parameters())
    assert n == 28_976_322
    assert type(model).__name__ == "UNetPSP"  # mmseg's EncoderDecoder rebuilt (tests/test_unet.py)
    assert type(model.backbone).__name__ == "UNet" and type(model.decode_head).__name__ == "PSPHead"
    assert "backbone.encoder.0.0.convs.0.conv.weight" in model.state_dict()
    assert model.state_dict()["backbone.encoder.0.0.convs.0.conv.weight"].shape[1] == 10
    assert len(params) > 100


def test_round_trip_records_sha256_and_spec(tmp_path):
    path = tmp_path / "tiny.pth"
    sha = random_checkpoint(path, TINY, seed=3)
    loaded = load_checkpoint(path)
    assert loaded.spec == TINY and loaded.sha256 == sha == file_sha256(path)
    ref = randomize(build_model(TINY), 3).state_dict()
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, ref[k]), k


def test_bare_state_dict_with_module_prefix(tmp_path):
    model = randomize(build_model(TINY), 1)
    torch.save({"module." + k: v for k, v in model.state_dict().items()}, tmp_path / "bare.pth")
    loaded = load_checkpoint(tmp_path / "bare.pth")
    assert torch.equal(loaded.model.state_dict()["decode_head.conv_seg.weight"],
                       model.state_dict()["decode_head.conv_seg.weight"])


def test_checkpoint_with_unlisted_python_objects_is_refused(tmp_path):
    # objects outside the allow-list could run code when unpickled: refused, named, never loaded
    # (mmengine's own training state loads: tests/test_hostile_checkpoints.py)
    model = randomize(build_model(TINY), 2)

    payload = {"meta": {"epoch": 3, "obj": HistoryLike()}, "state_dict": model.state_dict(),
               "message_hub": {"runtime": HistoryLike()}}
    torch.save(payload, tmp_path / "train.pth")
    with pytest.raises(CheckpointError, match=r"refused.*HistoryLike.*convert-checkpoint --trust"):
        load_checkpoint(tmp_path / "train.pth")


def test_13_channel_detection(tmp_path):
    random_checkpoint(tmp_path / "p.pth", ModelSpec(13, 8, 4))
    assert load_checkpoint(tmp_path / "p.pth").spec.with_products
    with pytest.raises(CheckpointError, match="13-channel.*10 channels"):
        load_checkpoint(tmp_path / "p.pth", expect_channels=10)


@pytest.mark.parametrize("case", ["missing", "empty", "text", "truncated", "list", "wrong_shape",
                                  "missing_key", "extra_key", "classes", "nan"])
def test_bad_checkpoints_are_clear_errors(tmp_path, case):
    path = tmp_path / f"{case}.pth"
    model = randomize(build_model(TINY), 0)
    sd = model.state_dict()
    if case == "empty":
        path.write_bytes(b"")
    elif case == "text":
        path.write_text("this is not a checkpoint\n")
    elif case == "truncated":
        save_checkpoint(model, tmp_path / "full.pth", TINY)
        data = (tmp_path / "full.pth").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case == "list":
        torch.save([1, 2, 3], path)
    elif case == "wrong_shape":
        sd["backbone.encoder.1.1.convs.0.conv.weight"] = torch.zeros(3, 3, 3, 3)
        torch.save({"state_dict": sd}, path)
    elif case == "missing_key":
        del sd["backbone.decoder.0.upsample.interp_upsample.1.conv.weight"]
        torch.save({"state_dict": sd}, path)
    elif case == "extra_key":
        sd["auxiliary_head.conv_seg.weight"] = torch.zeros(2, 4, 1, 1)
        torch.save({"state_dict": sd}, path)
    elif case == "classes":
        sd["decode_head.conv_seg.weight"] = torch.zeros(19, 4, 1, 1)
        torch.save({"state_dict": sd}, path)
    elif case == "nan":
        sd["decode_head.conv_seg.bias"] = torch.full((2,), float("nan"))
        torch.save({"state_dict": sd}, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    msg = str(err.value)
    assert str(path) in msg and "\n" not in msg
