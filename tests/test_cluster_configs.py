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


# ------------------------------------------------------------------------- authentication


def _commands(config: dict, key: str) -> str:
    return "\n".join(config.get(key) or [])


def test_launcher_starts_ray_with_token_auth_and_a_loopback_dashboard():
    config = yaml.safe_load((CLUSTER / "gcp.yaml").read_text())
    head, workers = _commands(config, "head_start_ray_commands"), _commands(config, "worker_start_ray_commands")
    for start in (head, workers):
        assert "RAY_AUTH_MODE=token" in start and "RAY_AUTH_TOKEN_PATH=" in start
        assert start.index("RAY_AUTH_MODE=token") < start.index("ray start")
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head + workers
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    # the token is put in place on every node before Ray starts, from the environment or Secret Manager
    script = "python ~/gum-cluster/ray_auth_token.py"
    assert script in _commands(config, "head_setup_commands")
    assert script in _commands(config, "worker_setup_commands")
    local = config["file_mounts"]["~/gum-cluster/ray_auth_token.py"]
    assert (REPO / local).is_file()


def test_only_the_head_may_create_machines():
    config = yaml.safe_load((CLUSTER / "gcp.yaml").read_text())
    types = config["available_node_types"]
    head_sa = {a["email"] for a in types[config["head_node_type"]]["node_config"]["serviceAccounts"]}
    for name, t in types.items():
        if name != config["head_node_type"]:
            assert not head_sa & {a["email"] for a in t["node_config"]["serviceAccounts"]}, name
    assert "gum-ray-head@" in next(iter(head_sa))


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_kuberay_manifests_turn_token_auth_on(path: Path):
    doc = yaml.safe_load(path.read_text())
    spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
    assert spec["authOptions"] == {"mode": "token"}
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"
    assert "enableIngress" not in spec["headGroupSpec"] or not spec["headGroupSpec"]["enableIngress"]
    for c in _containers(spec):  # no hand-set auth that could switch it off
        assert all(e["name"] not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN") for e in c.get("env", []))


def test_working_dir_uploads_leave_out_keys_tokens_and_checkpoints(tmp_path):
    """What `ray job submit --working-dir .` would upload, computed with Ray's own packaging code."""
    import shutil

    from ray._private.runtime_env.packaging import _dir_travel

    work = tmp_path / "repo"
    (work / "pipelines").mkdir(parents=True)
    shutil.copy(REPO / ".gitignore", work / ".gitignore")
    for name in ("key.json", "my-sa-key.json", "stage2.pth", "stage2.safetensors", "pipelines/continental.py",
                 "README.md", ".ray/auth_token"):
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_text("x")
    seen = []
    # what `ray job submit` does by default (RAY_RUNTIME_ENV_IGNORE_GITIGNORE unset: .gitignore honoured)
    _dir_travel(work, [], lambda p: seen.append(p.relative_to(work).as_posix()), include_gitignore=True)
    files = {s for s in seen if (work / s).is_file()}
    assert {"pipelines/continental.py", "README.md"} <= files
    assert not files & {"key.json", "my-sa-key.json", "stage2.pth", "stage2.safetensors", ".ray/auth_token"}


# ------------------------------------------------------------------------- the token script


class _FakeGoogle:
    """The metadata server and Secret Manager, on loopback: what the token script talks to on a node."""

    def __init__(self, token: str = "gum-test-token-0123456789abcdef"):
        import base64
        import http.server
        import json
        import threading

        self.seen: list[tuple[str, dict]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                outer.seen.append((self.path, dict(self.headers)))
                if self.path == "/computeMetadata/v1/project/project-id":
                    body = b"gum-proj"
                elif self.path == "/computeMetadata/v1/instance/service-accounts/default/token":
                    body = json.dumps({"access_token": "sa-access-token", "expires_in": 3600}).encode()
                elif self.path == "/v1/projects/gum-proj/secrets/gum-ray-auth-token/versions/latest:access":
                    if self.headers.get("Authorization") != "Bearer sa-access-token":
                        self.send_response(403)
                        self.end_headers()
                        return
                    body = json.dumps({"payload": {"data": base64.b64encode(token.encode()).decode()}}).encode()
                else:
                    self.send_response(404)
                    self.end_headers()
                    return
                self.send_response(200)
                self.end_headers()
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def _run_token_script(home: Path, **env):
    import os
    import subprocess
    import sys

    clean = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "GCE_", "GUM_", "GOOGLE_CLOUD"))}
    return subprocess.run([sys.executable, str(CLUSTER / "ray_auth_token.py")], capture_output=True, text=True,
                          env={**clean, "HOME": str(home), **env}, timeout=60)


def test_token_script_reads_secret_manager_with_the_nodes_service_account(tmp_path):
    fake = _FakeGoogle()
    try:
        r = _run_token_script(tmp_path, GCE_METADATA_HOST=f"127.0.0.1:{fake.port}",
                              GUM_SECRET_MANAGER_URL=f"http://127.0.0.1:{fake.port}")
    finally:
        fake.stop()
    assert r.returncode == 0, r.stderr
    token = tmp_path / ".ray" / "auth_token"
    assert token.read_text() == "gum-test-token-0123456789abcdef"
    assert token.stat().st_mode & 0o777 == 0o600
    assert "gum-test-token" not in r.stderr + r.stdout  # never printed
    assert all(h.get("Metadata-Flavor") == "Google" for p, h in fake.seen if p.startswith("/computeMetadata"))


def test_token_script_prefers_the_environment(tmp_path):
    r = _run_token_script(tmp_path, RAY_AUTH_TOKEN="env-token-0123456789abcdef",
                          GCE_METADATA_HOST="127.0.0.1:9")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / ".ray" / "auth_token").read_text() == "env-token-0123456789abcdef"


def test_no_token_means_no_ray(tmp_path):
    r = _run_token_script(tmp_path, GCE_METADATA_HOST="127.0.0.1:9")  # nothing listens there
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "no Ray auth token" in lines[0] and "will not start" in lines[0]
    assert not (tmp_path / ".ray" / "auth_token").exists()


def test_token_script_refuses_to_send_the_service_account_token_in_clear(tmp_path):
    r = _run_token_script(tmp_path, GCE_METADATA_HOST="127.0.0.1:9",
                          GUM_SECRET_MANAGER_URL="http://secrets.example.com")
    assert r.returncode == 1 and "must be https" in r.stderr
