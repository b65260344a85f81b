"""A real Ray head on loopback for end-to-end tests (`ray start --head`), stopped afterwards."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from tests.helpers import REPO

RAY = str(REPO / ".venv" / "bin" / "ray") if (REPO / ".venv" / "bin" / "ray").exists() else "ray"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def ray_head(num_cpus: int = 2):
    """Start a Ray head on 127.0.0.1 with its job server; yields (gcs_address, dashboard_url, env).

    ``env`` is the environment for clients (it carries the cluster's auth token).
    """
    tmp = Path(tempfile.mkdtemp(prefix="gumray-", dir="/tmp"))
    port, dash = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # Ray's token authentication, as a production cluster should run it: the head and every client
    # (ray job submit, the job's driver) share the token through the environment
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    cmd = [RAY, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           f"--num-cpus={num_cpus}", "--num-gpus=0", f"--temp-dir={tmp}", "--disable-usage-stats"]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=180, env=env)
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 90
        while True:  # the job server answers once the dashboard is up
            try:
                with urllib.request.urlopen(url + "/api/version", timeout=5):
                    break
            except urllib.error.HTTPError:
                break  # it answers (an auth-enabled dashboard says 401 to anonymous calls)
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError(f"the Ray dashboard at {url} did not come up")
                time.sleep(1)
        yield f"127.0.0.1:{port}", url, env
    finally:
        stop_cluster(tmp)


def stop_cluster(temp_dir: Path) -> None:
    """Stop this head only (not `ray stop`, which would stop every Ray on the machine, including a
    local one the test process itself may be connected to): its processes name its temp dir."""
    import psutil

    ours = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(str(temp_dir) in part for part in (p.info["cmdline"] or [])):
                ours.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    # workers do not name the temp dir: take the children of the head's processes too
    for p in list(ours):
        try:
            ours.extend(p.children(recursive=True))
        except psutil.NoSuchProcess:
            pass
    for p in ours:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(ours, timeout=30)
