"""cluster/ definitions: checked against Ray's own schema and against each other, so nothing drifts."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

import ray
from tests.helpers import REPO

CLUSTER = REPO / "cluster"
IMAGE = (CLUSTER / "IMAGE").read_text().strip()
MANIFESTS = [CLUSTER / "kuberay" / "raycluster.yaml", CLUSTER / "kuberay" / "rayjob.yaml"]


def _containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"]] + spec.get("workerGroupSpecs", [])
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_launcher_config_validates_against_rays_schema():
    from ray.autoscaler._private.util import validate_config

    config = yaml.safe_load((CLUSTER / "gcp.yaml").read_text())
    validate_config(config)  # raises jsonschema.ValidationError on any drift from Ray's schema
    assert config["docker"]["image"] == IMAGE
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    gpu = [t for t in types.values() if t["resources"].get("GPU")]
    assert gpu and all(t["node_config"]["guestAccelerators"] for t in gpu)


def test_launcher_config_rejects_a_typo():
    from ray.autoscaler._private.util import validate_config

    config = yaml.safe_load((CLUSTER / "gcp.yaml").read_text())
    config["available_node_types"]["head"]["resourses"] = {"CPU": 1}
    with pytest.raises(Exception):
        validate_config(config)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_kuberay_manifests(path: Path):
    doc = yaml.safe_load(path.read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] in ("RayCluster", "RayJob")
    spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
    assert spec["rayVersion"] == ray.__version__, "the manifests must name the Ray version we test"
    containers = _containers(spec)
    assert containers and all(c["image"] == IMAGE for c in containers)
    gpu_groups = [g for g in spec["workerGroupSpecs"]
                  if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert len(gpu_groups) == 1
    for g in spec["workerGroupSpecs"]:
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        res = g["template"]["spec"]["containers"][0]["resources"]
        assert res["requests"] == res["limits"]


def test_rayjob_entrypoint_is_a_valid_continental_job():
    import argparse

    from gum_ray.commands.map import add_job_arguments, job_from_args

    doc = yaml.safe_load((CLUSTER / "kuberay" / "rayjob.yaml").read_text())
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[:2] == ["python", "pipelines/continental.py"]
    assert (REPO / argv[1]).exists()
    parser = argparse.ArgumentParser()
    add_job_arguments(parser)
    job = job_from_args(parser.parse_args(argv[2:]))  # flags that drifted would fail here
    assert job.source == "ee" and job.product.startswith("gs://")


def test_image_definition_matches_the_project():
    docker = (CLUSTER / "Dockerfile").read_text()
    arg = dict(re.findall(r"^ARG (\w+)=(\S+)$", docker, re.M))
    assert arg["RAY_VERSION"] == ray.__version__ and f"ray{ray.__version__}" in IMAGE
    setup = (REPO / "tools" / "setup.sh").read_text()
    assert f"MMCV_VERSION={arg['MMCV_VERSION']}" in setup
    assert f"TORCH_VERSION={arg['TORCH_VERSION']}" in setup
    assert f'"torch=={arg["TORCH_VERSION"]}"' in (REPO / "pyproject.toml").read_text()
    assert "py311" in IMAGE and "FORCE_CUDA=1" in docker
