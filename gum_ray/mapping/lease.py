"""One writer per product: a run's lease on it (create-only object + heartbeat).

A run takes the lease before it writes anything and refreshes its heartbeat while it runs. A second
run is refused while the heartbeat is fresh and takes over once it is older than the TTL (the first
run died). Write tasks check the lease before writing (:func:`assert_lease_held`), so work left
running by a dead driver stops once its lease is stale or taken over.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid

from gum_ray.errors import GumError

log = logging.getLogger(__name__)


def lease_path(product: str) -> str:
    from gum_ray.store import fs

    return fs.join(fs.normalize(product), "_manifest", "lease.json")


def read_lease(product: str) -> dict:
    from gum_ray.store import fs

    try:
        return json.loads(fs.read_bytes(lease_path(product)))
    except (FileNotFoundError, ValueError):
        return {}


class LeaseLost(GumError):
    """This run no longer holds the product's lease: it must not write."""


def assert_lease_held(product: str, run_id: str) -> None:
    """Raise :class:`LeaseLost` unless ``run_id`` holds the product's lease with a fresh heartbeat."""
    lease = read_lease(product)
    age = time.time() - float(lease.get("heartbeat", 0))
    if lease.get("run_id") != run_id or age > float(lease.get("ttl_s", 0)):
        raise LeaseLost(
            f"run {run_id} no longer holds the lease on {product} (holder {lease.get('run_id')}, "
            f"heartbeat {age:.0f} s ago); not writing"
        )


class RunLease:
    """One writer per product: a create-only lease object with a heartbeat."""

    def __init__(self, product: str, ttl_s: float):
        from gum_ray.store import fs

        self.fs = fs
        self.path = lease_path(product)
        self.ttl_s = ttl_s
        self.run_id = uuid.uuid4().hex[:12]
        self.last_beat = 0.0

    def _record(self) -> bytes:
        return json.dumps({"run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(),
                           "heartbeat": time.time(), "ttl_s": self.ttl_s}).encode()

    def acquire(self) -> None:
        if self.fs.create_only(self.path, self._record()):
            self.last_beat = time.time()
            return
        try:
            other = json.loads(self.fs.read_bytes(self.path))
        except (FileNotFoundError, ValueError):
            other = {}
        age = time.time() - float(other.get("heartbeat", 0))
        if age < float(other.get("ttl_s", self.ttl_s)):
            raise GumError(
                f"another run ({other.get('run_id')}, host {other.get('host')}, pid {other.get('pid')}) "
                f"is writing this product (heartbeat {age:.0f} s ago). Wait for it to finish; if it "
                f"died, its lease expires {float(other.get('ttl_s', self.ttl_s)) - age:.0f} s from now"
            )
        log.warning("taking over the expired lease of run %s (%.0f s old)", other.get("run_id"), age)
        self.fs.remove(self.path)
        if not self.fs.create_only(self.path, self._record()):
            raise GumError("another run took the product's lease at the same moment; try again")
        self.last_beat = time.time()

    def beat(self) -> None:
        if time.time() - self.last_beat > min(10.0, self.ttl_s / 3):
            self.fs.write_bytes(self.path, self._record())
            self.last_beat = time.time()

    def release(self) -> None:
        try:
            self.fs.remove(self.path)
        except FileNotFoundError:
            pass


