"""One writer per product, fenced: a run's lease on it (DESIGN.md decision 14).

The lease is one compare-and-swap object, ``<product>/_manifest/lease.json``
(:mod:`gum_ray.store.versioned`: the object generation on GCS, numbered versions created with
``link`` locally). Every change is a conditional write against the generation last read:

* **acquire**: create it if there is none; else replace it if it is released, expired, or held by a
  process on this host that is gone. Of runs that try at once exactly one succeeds, the others are
  refused. A new holder's record carries the next **lease generation** (``generation``): the fencing
  token. Write tasks carry it (:func:`assert_lease_held`) and commit markers record it.
* **heartbeat**: rewrite the record against the generation this run last wrote. Refused means
  another run took the lease over: this run has lost it (:class:`LeaseLost`) and stops at once, and
  never writes the lease again. A background thread beats while the driver waits or builds
  overviews (:meth:`RunLease.start_heartbeat`); the driver loop calls :meth:`RunLease.beat`, which
  raises once the thread's beat was refused.
* **release**: a conditional write of a "released" record; a run that lost the lease writes nothing,
  so it never frees (or deletes) another run's lease.

Expiry is judged on the store's clock: the age of the record is the store's time now minus the
store's time of its last write (``updated`` and ``Date`` on GCS, file mtimes locally), so a client
whose clock is off by minutes judges the same as one whose clock is right.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid

from gum_ray.errors import GumError

log = logging.getLogger(__name__)

MAX_BEAT_INTERVAL_S = 10.0


def lease_path(product: str) -> str:
    from gum_ray.store import fs

    return fs.join(fs.normalize(product), "_manifest", "lease.json")


def read_lease(product: str) -> dict:
    """The product's lease record (``{}`` if there is none), with ``age_s`` on the store's clock."""
    from gum_ray.store import versioned

    v = versioned.read(lease_path(product))
    if v is None:
        return {}
    try:
        rec = json.loads(v.data)
    except ValueError:
        rec = {}
    return {**rec, "age_s": v.age, "object_generation": v.generation}


class LeaseLost(GumError):
    """This run no longer holds the product's lease: it must not write."""


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _holder_gone(rec: dict) -> bool:
    """True when the holder ran on this host (same pid namespace) and its process is gone."""
    if rec.get("host") != socket.gethostname() or rec.get("pidns") != _pid_namespace():
        return False
    try:
        pid = int(rec.get("pid"))
    except (TypeError, ValueError):
        return False
    if pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _describe(rec: dict) -> str:
    return f"{rec.get('run_id')}, host {rec.get('host')}, pid {rec.get('pid')}"


def assert_lease_held(product: str, run_id: str, generation: int) -> None:
    """Raise :class:`LeaseLost` unless run ``run_id`` holds the product's lease at ``generation``
    (the fencing token it was given) with a heartbeat younger than the TTL on the store's clock."""
    lease = read_lease(product)
    age = float(lease.get("age_s", 0.0))
    if (lease.get("run_id") != run_id or lease.get("state") != "held"
            or lease.get("generation") != generation or age > float(lease.get("ttl_s", 0))):
        raise LeaseLost(
            f"run {run_id} (lease generation {generation}) no longer holds the lease on {product} "
            f"(holder {lease.get('run_id')}, generation {lease.get('generation')}, "
            f"{lease.get('state', 'no lease')}, heartbeat {age:.0f} s ago); not writing"
        )


class RunLease:
    """This run's lease on one product (see the module docstring)."""

    def __init__(self, product: str, ttl_s: float):
        from gum_ray.store import fs

        self.product = fs.normalize(product)
        self.path = lease_path(product)
        self.ttl_s = float(ttl_s)
        self.run_id = uuid.uuid4().hex[:12]
        self.generation: int | None = None  # the lease generation (fencing token) once acquired
        self._object_generation: int | None = None  # the store generation this run last wrote
        self._beats = 0
        self._last_beat = 0.0  # time.monotonic() of the last successful beat
        self._lock = threading.Lock()
        self._lost: LeaseLost | None = None
        self._unsure: list[bytes] = []  # records whose write failed without an answer
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- records

    def _record(self, state: str = "held") -> bytes:
        return json.dumps({
            "run_id": self.run_id, "generation": self.generation, "state": state,
            "ttl_s": self.ttl_s, "host": socket.gethostname(), "pid": os.getpid(),
            "pidns": _pid_namespace(), "beat": self._beats,
            "client_time": time.time(),  # for people reading it; expiry uses the store's clock
            "nonce": uuid.uuid4().hex,
        }).encode()

    @property
    def interval_s(self) -> float:
        return min(MAX_BEAT_INTERVAL_S, self.ttl_s / 3)

    # ---- acquire

    def acquire(self) -> None:
        """Take the lease or raise :class:`GumError` saying who holds it (see the module docstring)."""
        from gum_ray.store import versioned

        for _ in range(5):
            current = versioned.read(self.path)
            if current is None:
                self.generation = 1
                won = versioned.write(self.path, self._record(), 0)
            else:
                try:
                    other = json.loads(current.data)
                except ValueError:
                    other = {}
                ttl = float(other.get("ttl_s", self.ttl_s))
                if other.get("state") == "held" and current.age <= ttl:
                    if not _holder_gone(other):
                        raise GumError(
                            f"another run ({_describe(other)}) is writing this product (heartbeat "
                            f"{current.age:.0f} s ago). Wait for it to finish; if it died, its lease "
                            f"expires {ttl - current.age:.0f} s from now"
                        )
                    log.warning("taking over the lease of run %s: its process %s on this host is gone",
                                other.get("run_id"), other.get("pid"))
                elif other.get("state") == "held":
                    log.warning("taking over the expired lease of run %s (%.0f s old)",
                                other.get("run_id"), current.age)
                self.generation = int(other.get("generation") or 0) + 1
                won = versioned.write(self.path, self._record(), current.generation)
            if won is not None:
                self._object_generation = won.generation
                self._last_beat = time.monotonic()
                return
            # another run changed the lease between our read and write: judge again what it wrote
        raise GumError("the product's lease changed on every try (5 times); try again")

    # ---- heartbeat

    def beat(self) -> None:
        """Keep the lease: raise :class:`LeaseLost` if it was lost; else refresh it when due.

        With the heartbeat thread running, the thread refreshes it and this only checks.
        """
        if self._lost is not None:
            raise self._lost
        if self._thread is None and time.monotonic() - self._last_beat >= self.interval_s:
            self.beat_now()

    def beat_now(self) -> None:
        """Refresh the heartbeat at once (a conditional write); :class:`LeaseLost` if refused."""
        with self._lock:
            if self._lost is not None:
                raise self._lost
            if self._object_generation is None:
                raise GumError("the lease was never acquired")
            self._beats += 1
            won = self._rewrite(self._record())
            if won is None:
                now = read_lease(self.product)
                self._lost = LeaseLost(
                    f"run {self.run_id} lost the lease on {self.product}: run {now.get('run_id')} "
                    f"took it over (generation {now.get('generation')}); stopping, nothing more is "
                    f"written by this run"
                )
                log.error("%s", self._lost)
                raise self._lost
            self._object_generation = won.generation
            self._last_beat = time.monotonic()

    def _rewrite(self, record: bytes):
        """Replace this run's record (under ``_lock``); the new version, or None if refused."""
        from gum_ray.store import versioned

        try:
            won = versioned.write(self.path, record, self._object_generation)
        except Exception:
            self._unsure.append(record)  # it may have landed with the answer lost
            raise
        if won is None and self._unsure:
            current = versioned.read(self.path)
            if current is not None and current.data in self._unsure:  # it had landed: go on from it
                won = versioned.write(self.path, record, current.generation)
        self._unsure.clear()
        return won

    def start_heartbeat(self) -> None:
        """Beat in a background thread every ``interval_s`` until :meth:`release` (or the lease is
        lost). Store errors are retried at the next beat; a refused beat ends the thread."""
        if self._thread is not None:
            return

        def loop() -> None:
            while not self._stop.wait(self.interval_s):
                try:
                    self.beat_now()
                except LeaseLost:
                    return
                except Exception as exc:  # noqa: BLE001 - a store hiccup: the next beat retries
                    log.warning("lease heartbeat failed (%s); retrying in %.0f s", exc, self.interval_s)

        self._stop.clear()
        self._thread = threading.Thread(target=loop, name=f"gum-lease-{self.run_id}", daemon=True)
        self._thread.start()

    def stop_heartbeat(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    @property
    def lost(self) -> bool:
        return self._lost is not None

    # ---- release

    def release(self) -> None:
        """Give the lease up (a conditional write of a released record). A run that lost the lease
        (or never held it) writes nothing: the new holder's lease is left alone."""
        self.stop_heartbeat()
        with self._lock:
            if self._lost is not None or self._object_generation is None:
                return
            won = self._rewrite(self._record("released"))
            if won is None:
                self._lost = LeaseLost(f"run {self.run_id} had lost the lease on {self.product}")
                log.warning("not releasing the lease: %s", self._lost)
                return
            self._object_generation = None
