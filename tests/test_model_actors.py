"""Model actors load and warm up (while the first cells are fetched); a checkpoint that cannot be
loaded on the cluster stops the run at once with one line; a lost actor is replaced (issue 12); the
start deadline counts from the last start, so a replacement late in a run gets its own (issue 14)."""

from __future__ import annotations

import pytest

from gum_ray.errors import GumError
from gum_ray.grid import parse_aoi
from gum_ray.mapping.job import MapJob


class _Beat:
    def beat(self):
        pass


@pytest.fixture(scope="module")
def local_ray():
    import ray

    from gum_ray.quiet import ray_runtime_env

    ray.init(address="local", num_cpus=2, include_dashboard=False, runtime_env=ray_runtime_env(),
             logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from gum_ray.model import ModelSpec, random_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    random_checkpoint(path, ModelSpec(10, 8, 4), seed=3)
    return path


def _job(tmp_path):
    return MapJob(aoi=parse_aoi(bbox=(8.571, 47.371, 8.579, 47.379)), years=(2020,),
                  product=str(tmp_path / "p.zarr"), cache=str(tmp_path / "c"))


def test_unloadable_checkpoint_stops_the_run_with_one_line(local_ray, tmp_path, ckpt):
    from gum_ray.checkpoint_io import file_sha256
    from gum_ray.mapping.runner import _ModelActors, _remote_stages

    _, _, actor_cls = _remote_stages(_job(tmp_path), 0)
    # the file the actors find is not the one the driver checked (its sha256 differs)
    with pytest.raises(GumError, match=r"^the model cannot be loaded on the cluster: checkpoint .*"
                                       r"sha256 is .* but this run started with") as err:
        _ModelActors(actor_cls, 1, 1, _job(tmp_path), str(ckpt), "0" * 64).wait_all_ready(_Beat())
    assert "\n" not in str(err.value)
    with pytest.raises(GumError, match="cannot be loaded on the cluster: checkpoint .*: no such file"):
        _ModelActors(actor_cls, 1, 1, _job(tmp_path), str(tmp_path / "nope.pth"), None).wait_all_ready(_Beat())
    actors = _ModelActors(actor_cls, 1, 1, _job(tmp_path), str(ckpt), file_sha256(ckpt))
    actors.wait_all_ready(_Beat())
    assert actors.ready == [True] and actors.pick() == 0


def test_a_lost_actor_leaves_the_rotation_and_is_replaced(local_ray, tmp_path, ckpt):
    import ray

    from gum_ray.checkpoint_io import file_sha256
    from gum_ray.mapping.runner import _ModelActors, _remote_stages, _stage_failed

    _, _, actor_cls = _remote_stages(_job(tmp_path), 0)
    actors = _ModelActors(actor_cls, 1, 1, _job(tmp_path), str(ckpt), file_sha256(ckpt))
    actors.wait_all_ready(_Beat())
    old = actors.actors[0]
    ray.kill(old, no_restart=True)
    with pytest.raises(Exception) as died:
        ray.get(old.predict.remote(2020, 0, 0))
    err = _stage_failed("predict", died.value)
    assert err.cluster and err.stage == "predict"  # not counted against the cell
    actors.replace(0, 0)
    assert actors.pick() is None  # out of the rotation until the new one is loaded
    actors.replace(0, 0)  # a second report of the same lost actor replaces nothing
    assert actors.replaced == 1
    actors.wait_all_ready(_Beat())
    assert actors.pick() == 0 and actors.actors[0] is not old


def test_the_start_deadline_counts_from_the_last_start(monkeypatch, tmp_path):
    """No Ray needed: a stand-in actor class. The run fails when no actor is ready in time after the
    first start, and a replacement of the last actor late in a run gets its own time to load."""
    import time

    from gum_ray.mapping import runner

    class _Ref:
        pass

    class _Actor:
        def __init__(self):
            self.ready = type("M", (), {"remote": staticmethod(lambda: _Ref())})()

    class _Cls:
        @staticmethod
        def options(**_):
            return type("R", (), {"remote": staticmethod(lambda *a: _Actor())})()

    import ray

    killed = []
    monkeypatch.setattr(ray, "kill", lambda actor, **_: killed.append(actor))  # (ray.kill would start a Ray)
    monkeypatch.setattr(runner, "ACTOR_START_TIMEOUT_S", 0.3)
    actors = runner._ModelActors(_Cls, 1, 1, _job(tmp_path), "ckpt", "0" * 64)
    actors.check_start_deadline()  # in time
    time.sleep(0.4)
    with pytest.raises(GumError, match="did not start within"):
        actors.check_start_deadline()
    actors.starting.clear()
    actors.ready[0] = True  # it did start; much later the actor is lost and replaced
    time.sleep(0.4)
    actors.replace(0, actors.gen[0])
    assert len(killed) == 1 and not any(actors.ready)
    actors.check_start_deadline()  # the replacement has its own 0.3 s, not the first start's
    time.sleep(0.4)
    with pytest.raises(GumError, match="did not start within"):
        actors.check_start_deadline()
