"""Checkpoints never run code: training checkpoints load, code-running ones are refused, and
``gum convert-checkpoint --trust`` is the one explicit way to convert a file that needs trust."""

from __future__ import annotations

import json

import pytest
import torch

from gum_ray.checkpoint_io import InertState, offending_globals, read_checkpoint
from gum_ray.errors import CheckpointError, InputError
from gum_ray.model import ModelSpec, build_model, file_sha256, load_checkpoint, randomize, save_checkpoint
from tests.helpers import random_export, write_export
from tests.hostile import error_lines, gum_cli, hostile_checkpoint, mmengine_training_checkpoint

TINY = ModelSpec(10, 8, 4)


@pytest.fixture(scope="module")
def tiny_model():
    return randomize(build_model(TINY), 7)


@pytest.fixture
def scene(tmp_path):
    return write_export(tmp_path / "scene.tif", random_export(64, 64))


def test_mmengine_training_checkpoint_loads_without_trust(tmp_path):
    trained = randomize(build_model(TINY), 7)
    path = mmengine_training_checkpoint(tmp_path / "iter_3.pth", trained)  # one AdamW step, saved
    raw = read_checkpoint(path)
    # the inert state is there as data: a HistoryBuffer's numpy arrays, numpy scalars, optimizer state
    buf = raw["message_hub"]["log_scalars"]["train/loss"]
    assert isinstance(buf, InertState)
    assert buf.state["_log_history"].tolist() == pytest.approx([1.0, 0.5, 1 / 3])
    assert raw["meta"]["best_score"] == pytest.approx(0.8123) and int(raw["meta"]["seed"]) == 42
    assert raw["optimizer"]["state"][0]["step"] == 1
    assert raw["param_schedulers"][0]["power"] == 0.9
    loaded = load_checkpoint(path)
    assert loaded.spec == TINY and loaded.sha256 == file_sha256(path)
    assert loaded.meta["experiment_name"] == "gum_stage2"
    for k, v in trained.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v), k


def test_mmengine_training_checkpoint_predicts_from_the_command_line(tmp_path, scene):
    ckpt = mmengine_training_checkpoint(tmp_path / "iter_3.pth", randomize(build_model(TINY), 7))
    out = tmp_path / "out.tif"
    r = gum_cli("predict", scene, out, "--checkpoint", ckpt, "--quiet")
    assert r.returncode == 0, r.stderr
    assert out.exists()
    assert "Traceback" not in r.stderr and "Warning" not in r.stderr


@pytest.mark.parametrize("how", ["system", "eval"])
def test_code_running_checkpoint_is_refused_and_runs_nothing(tmp_path, tiny_model, scene, how):
    marker = tmp_path / "PWNED"
    evil = hostile_checkpoint(tmp_path / "evil.pth", tiny_model.state_dict(), marker, how)
    out = tmp_path / "out"
    out.mkdir()
    r = gum_cli("predict", scene, out / "x.tif", "--checkpoint", evil, "--quiet")
    lines = error_lines(r.stderr)
    assert r.returncode == 2
    assert len(lines) == 1 and lines[0].startswith(f"gum: error: checkpoint {evil}: refused"), lines
    assert ("posix.system" if how == "system" else "builtins.eval") in lines[0]
    assert "gum convert-checkpoint --trust" in lines[0]
    assert not marker.exists(), "the checkpoint's code ran"
    assert list(out.iterdir()) == []


def test_offending_globals_are_listed_without_running_anything(tmp_path, tiny_model):
    marker = tmp_path / "PWNED"
    evil = hostile_checkpoint(tmp_path / "evil.pth", tiny_model.state_dict(), marker)
    assert offending_globals(evil) == {"posix.system"}
    assert not marker.exists()


def test_unknown_python_class_is_refused_by_name(tmp_path, tiny_model):
    torch.save({"meta": {"obj": HoldsNothing()}, "state_dict": tiny_model.state_dict()}, tmp_path / "c.pth")
    with pytest.raises(CheckpointError, match=r"refused.*HoldsNothing") as err:
        load_checkpoint(tmp_path / "c.pth")
    assert "\n" not in str(err.value)


class HoldsNothing:
    """A harmless class that is still outside the allow-list: the loader cannot know it is harmless."""


def test_cluster_actor_loads_only_safely(tmp_path, tiny_model):
    from gum_ray.grid import AOI
    from gum_ray.mapping.job import MapJob
    from gum_ray.mapping.stages import CellPredictor

    marker = tmp_path / "PWNED"
    evil = hostile_checkpoint(tmp_path / "evil.pth", tiny_model.state_dict(), marker)
    job = MapJob(aoi=AOI.from_bbox(8.5, 47.3, 8.6, 47.4), years=(2020,), product=str(tmp_path / "p.zarr"),
                 cache=str(tmp_path / "c"), checkpoint=str(evil))
    actor = CellPredictor(job, str(evil))  # the loading error is kept for ready(), the driver's check
    with pytest.raises(CheckpointError, match="refused"):
        actor.ready()
    assert not marker.exists()


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_truncated_checkpoint_is_one_line(tmp_path, tiny_model, scene, fmt):
    full = tmp_path / f"full.{fmt}"
    if fmt == "pth":
        save_checkpoint(tiny_model, full, TINY)
    else:
        save_checkpoint(tiny_model, tmp_path / "src.pth", TINY)
        assert gum_cli("convert-checkpoint", tmp_path / "src.pth", full).returncode == 0
    cut = tmp_path / f"cut.{fmt}"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    out = tmp_path / "out"
    out.mkdir()
    r = gum_cli("predict", scene, out / "x.tif", "--checkpoint", cut, "--quiet")
    lines = error_lines(r.stderr)
    assert r.returncode == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"gum: error: checkpoint {cut}: not a readable") and "truncated" in lines[0]
    assert list(out.iterdir()) == []


def test_convert_without_trust_refuses_and_writes_nothing(tmp_path, tiny_model):
    marker = tmp_path / "PWNED"
    evil = hostile_checkpoint(tmp_path / "evil.pth", tiny_model.state_dict(), marker)
    dst = tmp_path / "evil.safetensors"
    r = gum_cli("convert-checkpoint", evil, dst)
    lines = error_lines(r.stderr)
    assert r.returncode == 2 and len(lines) == 1 and "refused" in lines[0] and "--trust" in lines[0], lines
    assert not marker.exists() and not dst.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["evil.pth"]


def test_convert_with_trust_is_explicit_and_the_result_loads_everywhere(tmp_path, tiny_model, scene):
    marker = tmp_path / "RAN_ONCE"
    src = hostile_checkpoint(tmp_path / "stage2.pth", tiny_model.state_dict(), marker)
    dst = tmp_path / "stage2.safetensors"
    r = gum_cli("convert-checkpoint", "--trust", src, dst)
    assert r.returncode == 0, r.stderr
    assert marker.exists(), "--trust unpickles the source fully (the user vouched for it)"
    marker.unlink()
    loaded = load_checkpoint(dst)  # no pickle at all in a safetensors file
    assert loaded.meta["source_sha256"] == file_sha256(src)
    assert loaded.meta["source_needed_trust"] is True and loaded.meta["gum_ray_spec"] == TINY.as_dict()
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v), k
    r = gum_cli("predict", scene, tmp_path / "o.tif", "--checkpoint", dst, "--quiet")
    assert r.returncode == 0, r.stderr
    assert not marker.exists()
    from safetensors import safe_open

    with safe_open(str(dst), framework="pt") as f:
        assert json.loads(f.metadata()["source_sha256"]) == file_sha256(src)


def test_convert_of_a_safe_checkpoint_needs_no_trust(tmp_path, tiny_model):
    save_checkpoint(tiny_model, tmp_path / "ok.pth", TINY)
    from gum_ray.checkpoint_convert import convert_checkpoint

    sha, loaded = convert_checkpoint(tmp_path / "ok.pth", tmp_path / "ok.safetensors")
    assert sha == file_sha256(tmp_path / "ok.safetensors")
    assert loaded.meta["source_needed_trust"] is False
    with pytest.raises(InputError, match="exists"):
        convert_checkpoint(tmp_path / "ok.pth", tmp_path / "ok.safetensors")


def test_checkpoints_pickled_under_numpy_1_load(tmp_path):
    """The authors' checkpoints were saved with numpy 1.x, which names ``numpy.core.multiarray``."""
    import zipfile

    import numpy as np

    torch.save({"meta": {"score": np.float64(0.5), "hist": np.arange(3)}, "state_dict": {"w": torch.ones(2)}},
               tmp_path / "np2.pth")
    with zipfile.ZipFile(tmp_path / "np2.pth") as zin, zipfile.ZipFile(tmp_path / "np1.pth", "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("data.pkl"):
                assert b"numpy._core.multiarray" in data
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            zout.writestr(info, data)
    raw = read_checkpoint(tmp_path / "np1.pth")
    assert raw["meta"]["score"] == 0.5 and raw["meta"]["hist"].tolist() == [0, 1, 2]


class GetattrGadget:
    """Unpickles as ``getattr(OrderedDict, 'fromkeys')``: getattr on an allowed class, a gadget step."""

    def __reduce__(self):
        import builtins
        from collections import OrderedDict

        return (builtins.getattr, (OrderedDict, "fromkeys"))


def test_getattr_is_only_ever_a_name_on_the_inert_stand_in(tmp_path, tiny_model):
    torch.save({"meta": {"g": GetattrGadget()}, "state_dict": tiny_model.state_dict()}, tmp_path / "g.pth")
    with pytest.raises(CheckpointError, match=r"refused.*builtins\.getattr") as err:
        load_checkpoint(tmp_path / "g.pth")
    assert "\n" not in str(err.value)


def test_damaged_pickle_inside_a_valid_archive_is_not_readable_not_refused(tmp_path, tiny_model):
    import zipfile

    save_checkpoint(tiny_model, tmp_path / "ok.pth", TINY)
    with zipfile.ZipFile(tmp_path / "ok.pth") as zin, zipfile.ZipFile(tmp_path / "bad.pth", "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            zout.writestr(info, data[: len(data) // 2] if info.filename.endswith("data.pkl") else data)
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint") as err:
        load_checkpoint(tmp_path / "bad.pth")
    assert "refused" not in str(err.value) and "\n" not in str(err.value)
