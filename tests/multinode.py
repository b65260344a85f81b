"""A multi-node Ray cluster on loopback: a head and worker nodes, each its own `ray start` (its own
raylet, object store and workers), token auth on, as tests/raycluster.py starts a head.

Each node has its own temp dir under the cluster's (so every process of the cluster names the
cluster's folder and :func:`tests.raycluster.stop_cluster` stops exactly them) and its own ports.
:meth:`LoopbackCluster.kill_node` SIGKILLs a worker node's raylet and every process under it (its
workers, agents), as a machine that dies; :meth:`add_worker` adds a node back.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.raycluster import RAY, free_port, stop_cluster


class LoopbackCluster:
    def __init__(self, workers: int = 2, num_cpus: int = 1, env: dict[str, str] | None = None,
                 head_cpus: int | None = None) -> None:
        self.n_workers = workers
        self.num_cpus = num_cpus
        self.head_cpus = num_cpus if head_cpus is None else head_cpus
        self.tmp = Path(tempfile.mkdtemp(prefix="gumray-mn-", dir="/tmp"))
        self.port, self.dash = free_port(), free_port()
        base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        base.update({
            "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
            # a dead node is noticed in a few seconds, not a minute
            "RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
            "RAY_health_check_failure_threshold": "3",
        })
        base.update(env or {})
        self.env = base
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard = f"http://127.0.0.1:{self.dash}"
        self.workers: dict[str, int] = {}  # node name -> its raylet's node-manager port
        self._n = 0

    def _node_ports(self) -> list[str]:
        return [f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
                f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]

    def start(self) -> "LoopbackCluster":
        cmd = [RAY, "start", "--head", f"--port={self.port}", "--node-ip-address=127.0.0.1",
               "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dash}",
               f"--num-cpus={self.head_cpus}", "--num-gpus=0", f"--temp-dir={self.tmp / 'head'}",
               "--disable-usage-stats", *self._node_ports()]
        self._run(cmd, "head")
        self._wait_dashboard()
        for _ in range(self.n_workers):
            self.add_worker()
        return self

    def _run(self, cmd: list[str], name: str) -> None:
        env = {**self.env, **self.node_env(name)}
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
        if r.returncode != 0:
            raise RuntimeError(f"ray start ({name}) failed: {r.stdout[-1500:]} {r.stderr[-1500:]}")

    def node_env(self, name: str) -> dict[str, str]:
        """Per-node environment: each node has its own checkpoint cache (one fetch per node)."""
        return {"GUM_CHECKPOINT_CACHE": str(self.tmp / name / "checkpoints")}

    def add_worker(self) -> str:
        self._n += 1
        name = f"worker{self._n}"
        ports = self._node_ports()
        cmd = [RAY, "start", f"--address={self.address}", "--node-ip-address=127.0.0.1",
               f"--num-cpus={self.num_cpus}", "--num-gpus=0", f"--temp-dir={self.tmp / name}",
               "--disable-usage-stats", *ports]
        self._run(cmd, name)
        self.workers[name] = int(ports[0].split("=")[1])
        return name

    def _wait_dashboard(self) -> None:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(self.dashboard + "/api/version", timeout=5):
                    return
            except urllib.error.HTTPError:
                return  # it answers (401 to anonymous calls with token auth)
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError(f"the Ray dashboard at {self.dashboard} did not come up")
                time.sleep(1)

    def node_processes(self, name: str) -> list:
        """The raylet of worker node ``name`` and every process under it (workers, agents), plus
        any process of that node's temp dir."""
        import psutil

        folder = str(self.tmp / name)
        port = f"--node_manager_port={self.workers[name]}"
        roots = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                cmd = p.info["cmdline"] or []
                if any(port == part or folder in part for part in cmd):
                    roots.append(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        procs = {p.pid: p for p in roots}
        for p in roots:
            try:
                procs.update({c.pid: c for c in p.children(recursive=True)})
            except psutil.NoSuchProcess:
                pass
        return list(procs.values())

    def node_running(self, title: str) -> str | None:
        """The worker node one of whose processes has ``title`` in its command line (Ray names an
        actor's process ``ray::<Class>``), or None."""
        import psutil

        for name in sorted(self.workers):
            for p in self.node_processes(name):
                try:
                    if title in " ".join(p.cmdline()):
                        return name
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
        return None

    def kill_node(self, name: str) -> int:
        """SIGKILL worker node ``name`` (its raylet, workers and agents); returns how many processes."""
        import psutil

        procs = self.node_processes(name)
        for p in procs:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=30)
        del self.workers[name]
        return len(procs)

    def alive_nodes(self) -> int:
        import json

        r = subprocess.run([RAY, "list", "nodes", "--address", self.dashboard, "--format", "json",
                            "--filter", "state=ALIVE"], capture_output=True, text=True, timeout=60, env=self.env)
        return len(json.loads(r.stdout)) if r.returncode == 0 else -1

    def submit(self, entrypoint: list[str], *, env_vars: dict[str, str] | None = None, cwd=None,
               timeout: float = 1200, wait: bool = True):
        """``ray job submit`` of ``entrypoint``; env_vars go to the job's runtime_env (driver and
        workers). Returns the CompletedProcess (``wait``) or the Popen."""
        import json

        cmd = [RAY, "job", "submit", "--address", self.dashboard]
        if env_vars:
            cmd += ["--runtime-env-json", json.dumps({"env_vars": env_vars})]
        cmd += ["--", *entrypoint]
        if not wait:
            return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    cwd=cwd, env=self.env)
        for _ in range(30):  # the head's job agent may need a few more seconds after start
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=self.env)
            if "No available agent" not in r.stdout + r.stderr:
                return r
            time.sleep(2)
        return r

    def stop(self) -> None:
        import shutil

        stop_cluster(self.tmp)
        shutil.rmtree(self.tmp, ignore_errors=True)  # its logs and object spill folders

    def __enter__(self) -> "LoopbackCluster":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()
