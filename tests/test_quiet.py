"""What the user sees: gum-ray's own lines, no third-party warnings unless --verbose.

These run the real console script in a fresh process (the way a user meets it): import-time
warnings of mmseg/mmengine, and the stderr Ray relays from its workers, only show up there.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys

import pytest

from gum_ray.model import ModelSpec, random_checkpoint
from tests.helpers import REPO, random_export, write_export

TOWN = ["--bbox", "8.571", "47.371", "8.579", "47.379"]  # one 0.01-degree cell
SMALL = ["--cell-deg", "0.01", "--chunk-px", "40", "--halo", "32", "--no-preview"]
NOISE = ("Warning", "warn(", "warnings.warn", "DeprecationWarning", "UserWarning")


def third_party_lines(text: str) -> list[str]:
    """Lines that are not gum-ray's: warnings, and log lines of other loggers (Ray's start-up
    lines look like ``2026-... INFO worker.py:2038 -- Started a local Ray instance.``)."""
    return [line for line in text.splitlines()
            if any(n in line for n in NOISE) or re.search(r"\s(INFO|WARNING|DEBUG)\s.*\s--\s", line)
            or (line.startswith(("WARNING ", "INFO ", "DEBUG ")) and not line.split()[1].startswith("gum_ray"))]


def gum_cmd() -> list[str]:
    gum_bin = REPO / ".venv" / "bin" / "gum"
    return [str(gum_bin)] if gum_bin.exists() else [sys.executable, "-m", "gum_ray.cli"]


def run_gum(*args, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "GUM_VERBOSE", "RAY_ADDRESS")}
    e.update(env or {})
    return subprocess.run(gum_cmd() + [str(a) for a in args], capture_output=True, text=True,
                          timeout=timeout, env=e)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("quiet")
    random_checkpoint(d / "tiny.pth", ModelSpec(10, 8, 4), seed=1)
    return d / "tiny.pth"


def test_predict_bad_input_is_exactly_one_line_after_the_model_is_built(tmp_path, ckpt):
    # the checkpoint loads (the network is built: where mmseg's warnings fired before gum_ray.unet),
    # then the input is refused: 5 bands, not 11
    bad = write_export(tmp_path / "bad.tif", random_export(40, 50)[:5])
    r = run_gum("predict", bad, tmp_path / "out.tif", "--checkpoint", ckpt)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gum: error: ") and "5 bands" in lines[0], r.stderr
    assert not (tmp_path / "out.tif").exists()


def test_predict_verbose_shows_what_the_default_hides(tmp_path, ckpt):
    scene = write_export(tmp_path / "scene.tif", random_export(40, 50))
    quiet = run_gum("predict", scene, tmp_path / "a.tif", "--checkpoint", ckpt)
    loud = run_gum("--verbose", "predict", scene, tmp_path / "b.tif", "--checkpoint", ckpt)
    assert quiet.returncode == 0 and loud.returncode == 0, (quiet.stderr, loud.stderr)
    assert not third_party_lines(quiet.stderr), quiet.stderr
    # the same run with --verbose shows third-party warnings and debug logs (so the filter, not
    # their absence, is what keeps the default quiet)
    assert any(n in loud.stderr for n in NOISE) or "DEBUG" in loud.stderr, loud.stderr


@pytest.mark.slow
def test_map_prints_no_third_party_warning_from_the_driver_or_the_ray_workers(tmp_path, ckpt):
    data = tmp_path / "data"
    r = run_gum("map", *TOWN, "--year", "2020", "--data-dir", data, "--checkpoint", ckpt, *SMALL,
                "--quiet", timeout=600)
    assert r.returncode == 0, r.stderr
    assert not third_party_lines(r.stderr), r.stderr
    assert not third_party_lines(r.stdout), r.stdout
    assert (data / "product.zarr").exists()


def test_a_local_ray_gets_the_jobs_variables_from_this_process_and_the_environment_is_restored(monkeypatch):
    from gum_ray import quiet

    monkeypatch.setattr(quiet, "_verbose", None)
    monkeypatch.setenv("GUM_TEST_PASSED_ON", "yes")
    monkeypatch.setenv("PYTHONWARNINGS", "default")
    monkeypatch.delenv(quiet.WORKER_SETUP_ENV, raising=False)
    monkeypatch.delenv(quiet.VERBOSE_ENV, raising=False)
    before = dict(os.environ)
    with quiet.local_ray_env():
        assert os.environ[quiet.WORKER_SETUP_ENV] == "1"
        assert os.environ["GUM_TEST_PASSED_ON"] == "yes"
        assert os.environ[quiet.VERBOSE_ENV] == "0"
        assert os.environ["PYTHONWARNINGS"] == "ignore"  # what the runtime env passed on before
    assert dict(os.environ) == before


@pytest.mark.slow
def test_the_workers_of_a_local_ray_started_for_a_map_are_quiet_and_see_the_jobs_variables(monkeypatch, tmp_path):
    """`gum map` on a local Ray: no runtime env (so the job gets Ray's prestarted workers), and yet
    the workers apply the output rule and see the GUM_* variables, as the setup hook gave them."""
    import ray

    from gum_ray import quiet
    from gum_ray.grid import parse_aoi
    from gum_ray.mapping.job import MapJob
    from gum_ray.mapping.runner import connect_ray

    monkeypatch.setattr(quiet, "_verbose", None)
    monkeypatch.setenv("GUM_TEST_PASSED_ON", "yes")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    job = MapJob(aoi=parse_aoi(bbox=(8.571, 47.371, 8.579, 47.379)), years=(2021,), product=str(tmp_path / "p"),
                 cache=str(tmp_path / "c"))
    assert not ray.is_initialized()
    assert connect_ray(None, job)
    try:
        @ray.remote(num_cpus=0.25)
        def probe():
            import logging

            import gum_ray  # noqa: F401 - what a stage's worker imports first

            return (ray.get_runtime_context().get_runtime_env_string(), os.environ.get("GUM_TEST_PASSED_ON"),
                    logging.getLogger("rasterio").level, os.environ.get(quiet.WORKER_SETUP_ENV))

        env, passed, rasterio_level, setup = ray.get(probe.remote())
    finally:
        ray.shutdown()
    assert env in ("{}", ""), env  # no runtime env: Ray's prestarted workers serve the job
    assert passed == "yes" and setup == "1"
    assert rasterio_level == logging.ERROR  # the output rule ran in the worker (quiet.configure)
    assert quiet.WORKER_SETUP_ENV not in os.environ  # the driver's environment is as it was
