"""`gum predict`: COG outputs on the input's grid, folders, skipping, and clear errors on bad input."""

import subprocess
import sys

import numpy as np
import pytest
import rasterio
from rio_cogeo.cogeo import cog_validate

from gum_ray.cli import main
from gum_ray.model import ModelSpec, random_checkpoint
from tests.helpers import REPO, bigearthnet_files, random_export, require_realdata, write_export

TINY = ModelSpec(10, 8, 4)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    random_checkpoint(path, TINY, seed=5)
    return path


@pytest.fixture(scope="module")
def ckpt13(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt13") / "tiny13.pth"
    random_checkpoint(path, ModelSpec(13, 8, 4), seed=5)
    return path


def gum(*args):
    return main([str(a) for a in args])


def test_predict_real_patch_writes_a_valid_cog_on_the_input_grid(tmp_path, ckpt):
    src = bigearthnet_files()[0]  # 120 x 120: the seed notebook fails on this size
    out = tmp_path / "out.tif"
    assert gum("predict", src, out, "--checkpoint", ckpt, "--quiet") == 0
    valid, errors, warnings = cog_validate(str(out), strict=True)
    assert valid, (errors, warnings)
    with rasterio.open(src) as a, rasterio.open(out) as b:
        assert b.count == 3 and b.dtypes == ("uint8", "uint8", "uint8") and b.nodata == 255
        assert (b.crs, b.transform, b.shape) == (a.crs, a.transform, a.shape)
        assert b.descriptions == ("urban_probability_percent", "urban_class", "input_quality")
        assert len(b.tags()["checkpoint_sha256"]) == 64
        prob, cls, quality = b.read()
        export = a.read(out_dtype="float32")
    # band 3: which inputs each pixel had (bits 1 = S2, 2 = S1, 4 = terrain), from the input's NaNs
    expect = (np.isfinite(export[0:4]).all(0) * 1 + np.isfinite(export[4:8]).all(0) * 2
              + np.isfinite(export[8:11]).all(0) * 4)
    np.testing.assert_array_equal(quality, expect)
    assert prob.max() <= 100 and set(np.unique(cls)) <= {0, 1}
    np.testing.assert_array_equal(cls, (prob > 50).astype(np.uint8) | ((prob == 50) & (cls == 1)))


def test_no_sentinel2_is_no_data_and_big_scene_streams(tmp_path, ckpt):
    path = require_realdata()
    out = tmp_path / "aber.tif"
    assert gum("predict", path, out, "--checkpoint", ckpt, "--quiet", "--batch-size", "4") == 0
    with rasterio.open(path) as a, rasterio.open(out) as b:
        s2 = a.read(1)
        prob, cls, quality = b.read()
    nodata = ~np.isfinite(s2)
    assert nodata[:, 0].all()  # the README says column 0 has no S2
    np.testing.assert_array_equal(prob == 255, nodata)
    np.testing.assert_array_equal(cls == 255, nodata)
    assert ((quality[nodata] & 1) == 0).all() and ((quality[~nodata] & 1) == 1).all()


def test_folder_mode_skip_and_overwrite(tmp_path, ckpt, capsys):
    files = bigearthnet_files()[:3]
    folder = tmp_path / "in"
    folder.mkdir()
    for f in files:
        (folder / f.name).symlink_to(f)
    out = tmp_path / "out"
    assert gum("predict", folder, out, "--checkpoint", ckpt, "--quiet") == 0
    outputs = sorted(out.glob("*_gum.tif"))
    assert [p.name for p in outputs] == [f.stem + "_gum.tif" for f in files]
    mtimes = [p.stat().st_mtime_ns for p in outputs]
    assert gum("predict", folder, out, "--checkpoint", ckpt, "--quiet") == 0
    assert "3 skipped" in capsys.readouterr().err
    assert [p.stat().st_mtime_ns for p in outputs] == mtimes
    assert gum("predict", folder, out, "--checkpoint", ckpt, "--quiet", "--overwrite") == 0
    assert "3 written" in capsys.readouterr().err
    assert not list(out.glob(".*"))  # no temporary leftovers


def test_seed_settings_and_stride_flags(tmp_path, ckpt):
    src = bigearthnet_files()[1]
    for flags in (["--seed-settings"], ["--stride", "64", "--window", "none", "--precision", "bf16"]):
        out = tmp_path / f"o{len(flags)}.tif"
        assert gum("predict", src, out, "--checkpoint", ckpt, "--quiet", *flags) == 0
        assert out.exists()


def _bad_input(tmp_path, case, ckpt, ckpt13):
    good = random_export(64, 64)
    path = tmp_path / f"{case}.tif"
    checkpoint = ckpt
    if case == "band_count":
        write_export(path, good[:9])
    elif case == "integer":
        write_export(path, (good * 100).astype(np.int16))
    elif case == "not_georeferenced":
        write_export(path, good, crs=None, transform=rasterio.Affine.identity())
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "corrupt":
        write_export(tmp_path / "ok.tif", good)
        path.write_bytes((tmp_path / "ok.tif").read_bytes()[:3000])
    elif case == "missing":
        path = tmp_path / "nope.tif"
    elif case == "not_a_checkpoint":
        write_export(path, good)
        checkpoint = tmp_path / "ckpt.pth"
        checkpoint.write_text("hello")
    elif case == "products_ckpt_11_bands":
        write_export(path, good)
        checkpoint = ckpt13
    return path, checkpoint


@pytest.mark.parametrize("case", ["band_count", "integer", "not_georeferenced", "empty", "corrupt",
                                  "missing", "not_a_checkpoint", "products_ckpt_11_bands"])
def test_bad_input_is_one_clear_line_and_no_output(tmp_path, case, ckpt, ckpt13, capsys):
    path, checkpoint = _bad_input(tmp_path, case, ckpt, ckpt13)
    out = tmp_path / "out"
    out.mkdir()
    code = gum("predict", path, out / "x.tif", "--checkpoint", checkpoint, "--quiet")
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert len(err) == 1 and err[0].startswith("gum: error: "), err
    assert "Traceback" not in err[0]
    assert list(out.iterdir()) == []


def test_console_script_reports_errors_without_traceback(tmp_path, ckpt):
    gum_bin = REPO / ".venv" / "bin" / "gum"
    cmd = [str(gum_bin)] if gum_bin.exists() else [sys.executable, "-m", "gum_ray.cli"]
    r = subprocess.run(cmd + ["predict", str(tmp_path / "missing.tif"), str(tmp_path / "o.tif"),
                              "--checkpoint", str(ckpt)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == f"gum: error: input {tmp_path / 'missing.tif'}: no such file or folder"


def test_folder_with_one_bad_file_predicts_the_rest_and_fails(tmp_path, ckpt, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    write_export(folder / "a_good.tif", random_export(40, 50))
    write_export(folder / "b_bad.tif", random_export(40, 50)[:5])
    out = tmp_path / "out"
    assert gum("predict", folder, out, "--checkpoint", ckpt, "--quiet") == 2
    err = capsys.readouterr().err
    assert "b_bad.tif: has 5 bands" in err and "1 written" in err and "1 failed" in err
    assert [p.name for p in out.iterdir()] == ["a_good_gum.tif"]


def test_predict_process_imports_only_what_it_needs(tmp_path, ckpt):
    """`gum predict` builds its own parser only and loads the checkpoint without torch's compiler
    stack: none of the product store (zarr), the grid (odc-geo), Ray, torch._dynamo or sympy is
    imported (they cost a 20 s prediction about 2.5 s; docs/performance.md)."""
    code = (
        "import sys\n"
        "from gum_ray.cli import main\n"
        f"assert main(['predict', {str(bigearthnet_files()[0])!r}, {str(tmp_path / 'o.tif')!r}, "
        f"'--checkpoint', {str(ckpt)!r}, '--quiet']) == 0\n"
        "heavy = ('zarr', 'odc', 'ray', 'xarray', 'dask', 'sympy', 'torch._dynamo', 'gum_ray.grid',"
        " 'gum_ray.store.product', 'mmseg', 'mmcv', 'mmengine')\n"
        "print(sorted(k for k in sys.modules if k in heavy or k.split('.')[0] in heavy))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "[]"


def test_winograd_on_outside_fp32_on_a_cpu_is_one_clear_line(tmp_path, ckpt, capsys):
    path = tmp_path / "in.tif"
    write_export(path, random_export(64, 64))
    out = tmp_path / "out"
    out.mkdir()
    code = gum("predict", path, out / "x.tif", "--checkpoint", ckpt, "--quiet", "--winograd", "on",
               "--precision", "bf16")
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1
    assert err[0] == ("gum: error: --winograd on takes fp32 on a CPU only; use --precision fp32 with "
                      "--device cpu, or leave it on auto")
    assert list(out.iterdir()) == []


def test_the_console_script_exits_with_the_commands_code_after_freezing_the_collector(monkeypatch):
    """`gum` (gum_ray.cli.run): main's exit code, and gc.freeze() first (the interpreter's last
    collections would walk every object torch made, 0.7 s per command); main() itself, what tests
    and library users call, freezes nothing."""
    import gc

    from gum_ray import cli

    calls = []
    monkeypatch.setattr(gc, "freeze", lambda: calls.append("freeze"))
    monkeypatch.setattr(cli, "main", lambda argv=None: calls.append("main") or 3)
    with pytest.raises(SystemExit) as exc:
        cli.run()
    assert exc.value.code == 3
    assert calls == ["main", "freeze"]
    assert gc.get_freeze_count() == 0  # nothing frozen in this process
