"""A model actor holds the CPUs it uses (issue 14): beside a GPU its cache reader threads run flat out
while the GPU is fed, one core each, so the actor reserves one CPU per reader (4 by default, at most
the cluster's CPUs per GPU less one, left to the fetches and writes); on a CPU, one. A Ray that
advertises a GPU this machine does not have shows the reservation: its available CPUs drop by what
the actor holds."""

from __future__ import annotations

import time

import pytest

from gum_ray.grid import parse_aoi
from gum_ray.mapping.job import MapJob
from gum_ray.mapping.stages import GPU_READERS, actor_cpus


class _Beat:
    def beat(self):
        pass


@pytest.mark.parametrize("threads, gpus, cpus, held", [
    (None, 0, 2, 1),            # a CPU actor: one (its torch threads), the other cores fetch and write
    (None, 0, 64, 1),
    (None, 1, 8, GPU_READERS),  # a workstation with a GPU: four readers, four CPUs left
    (None, 1, 4, 3),            # one CPU stays for the fetches and writes
    (None, 1, 2, 1),
    (None, 1, 1, 1),
    (None, 8, 96, GPU_READERS),  # a node of eight GPUs
    (None, 8, 16, 1),
    (3, 1, 64, 3),              # --actor-threads wins
    (6, 0, 2, 6),
])
def test_actor_cpus(threads, gpus, cpus, held):
    assert actor_cpus(threads, gpus, cpus) == held


@pytest.fixture(scope="module")
def ray_with_a_gpu():
    import ray

    from gum_ray.quiet import ray_runtime_env

    # Ray schedules by what a node advertises: one GPU here, none real (the actor's engine runs on the CPU)
    ray.init(address="local", num_cpus=6, num_gpus=1, include_dashboard=False, runtime_env=ray_runtime_env(),
             logging_level="ERROR")
    yield ray
    ray.shutdown()


def _job(tmp_path, **kw):
    return MapJob(aoi=parse_aoi(bbox=(8.571, 47.371, 8.579, 47.379)), years=(2020,),
                  product=str(tmp_path / "p.zarr"), cache=str(tmp_path / "c"), **kw)


@pytest.mark.parametrize("threads", [None, 2])
def test_an_actor_beside_a_gpu_holds_a_cpu_per_reader(ray_with_a_gpu, tmp_path, threads):
    from gum_ray.checkpoint_io import file_sha256
    from gum_ray.mapping.runner import _actor_plan, _ModelActors, _remote_stages
    from gum_ray.model import ModelSpec, random_checkpoint

    ray = ray_with_a_gpu
    ckpt = tmp_path / "tiny.pth"
    random_checkpoint(ckpt, ModelSpec(10, 8, 4), seed=3)
    job = _job(tmp_path, threads_per_actor=threads)
    n, cpus, gpus = _actor_plan(job)
    assert (n, gpus) == (1, 1.0)
    assert cpus == (threads or GPU_READERS)  # 6 CPUs per GPU: the default four readers fit
    _, _, actor_cls = _remote_stages(job, gpus)
    actors = _ModelActors(actor_cls, n, cpus, job, str(ckpt), file_sha256(ckpt))
    actors.wait_all_ready(_Beat())
    free = {}
    for _ in range(50):  # the resource view follows the actor's start by a moment
        free = ray.available_resources()
        if free.get("GPU", 0) == 0 and free.get("CPU", 0) == 6 - cpus:
            break
        time.sleep(0.1)
    assert free.get("GPU", 0) == 0 and free.get("CPU", 0) == 6 - cpus
    ray.kill(actors.actors[0], no_restart=True)
