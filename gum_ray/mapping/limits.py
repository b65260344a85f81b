"""Caps on requests in flight, shared by every fetch of a job: per process, or per Ray cluster.

A source that needs one (:meth:`~gum_ray.sources.base.ImagerySource.request_limit`, Earth Engine's
concurrent-request quota) gets a limiter from the job that runs it (:func:`limiter_for`):

* :class:`LocalLimiter` - a counting semaphore shared by the threads of one process;
* :class:`RayLimiter` - a named Ray actor acting as a semaphore with leases, shared by the whole
  cluster. The mapping driver creates it before the run (so it lives as long as the run) and every
  worker finds it by name.

A limiter has ``acquire() -> token`` and ``release(token)``.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any, Protocol

from gum_ray.errors import InputError
from gum_ray.sources.base import RequestLimit


class InFlightLimiter(Protocol):
    """At most ``cap`` requests in flight among all holders of the limiter."""

    cap: int

    def acquire(self) -> Any: ...

    def release(self, token: Any) -> None: ...


class LocalLimiter:
    """A counting semaphore shared by every fetch in this process (threads)."""

    def __init__(self, cap: int) -> None:
        if cap < 1:
            raise InputError(f"max_in_flight must be at least 1, got {cap}")
        self.cap = int(cap)
        self._sem = threading.BoundedSemaphore(self.cap)
        self._lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0

    def acquire(self) -> None:
        self._sem.acquire()
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def release(self, token: Any = None) -> None:
        with self._lock:
            self.in_flight -= 1
        self._sem.release()


_LOCAL_LIMITERS: dict[tuple[str, int], LocalLimiter] = {}
_LOCAL_LOCK = threading.Lock()


def local_limiter(cap: int, name: str = "earthengine") -> LocalLimiter:
    """The process-wide limiter for ``name`` and ``cap`` (created on first use)."""
    with _LOCAL_LOCK:
        lim = _LOCAL_LIMITERS.get((name, cap))
        if lim is None:
            lim = _LOCAL_LIMITERS[(name, cap)] = LocalLimiter(cap)
        return lim


class RayLimiter:
    """A cluster-wide cap: a named Ray actor acting as a semaphore with leases.

    Every worker that builds a ``RayLimiter`` with the same name and cap shares one actor, created on
    first use (``get_if_exists``, detached so it does not die with the worker that happened to create
    it). A lease not released within ``lease_s`` (a worker that died mid-request) is reclaimed, so the
    cap cannot leak away; a lost actor is re-created.
    """

    NAMESPACE = "gum_ray"

    def __init__(self, cap: int, name: str = "earthengine", lease_s: float = 900.0) -> None:
        if cap < 1:
            raise InputError(f"max_in_flight must be at least 1, got {cap}")
        self.cap = int(cap)
        self.lease_s = float(lease_s)
        self.name = f"gum_ray_inflight_{name}_{cap}"
        self._actor = self._connect()

    def _connect(self) -> Any:
        actor_cls = _semaphore_actor_class()
        return actor_cls.options(
            name=self.name, namespace=self.NAMESPACE, get_if_exists=True, lifetime="detached",
            max_concurrency=100_000, num_cpus=0,
        ).remote(self.cap, self.lease_s)

    def acquire(self) -> str:
        import ray

        token = uuid.uuid4().hex
        try:
            ray.get(self._actor.acquire.remote(token))
        except ray.exceptions.RayActorError:
            self._actor = self._connect()
            ray.get(self._actor.acquire.remote(token))
        return token

    def release(self, token: Any) -> None:
        import ray

        try:
            self._actor.release.remote(token)
        except ray.exceptions.RayActorError:  # pragma: no cover - the lease died with the actor
            pass

    def stats(self) -> dict[str, Any]:
        import ray

        return ray.get(self._actor.stats.remote())

    def __getstate__(self) -> dict[str, Any]:
        return {"cap": self.cap, "lease_s": self.lease_s, "name": self.name}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._actor = self._connect()


_ACTOR_CLS: Any = None


def _semaphore_actor_class() -> Any:
    global _ACTOR_CLS
    if _ACTOR_CLS is None:
        import asyncio

        import ray

        @ray.remote
        class _InFlightSemaphore:
            def __init__(self, cap: int, lease_s: float) -> None:
                self.cap = cap
                self.lease_s = lease_s
                self.leases: dict[str, float] = {}
                self.waiters: list[tuple[str, asyncio.Future]] = []
                self.max_in_flight = 0
                self.granted = 0

            def _grant(self) -> None:
                now = time.monotonic()
                for tok, t0 in list(self.leases.items()):
                    if now - t0 > self.lease_s:
                        del self.leases[tok]
                while self.waiters and len(self.leases) < self.cap:
                    tok, fut = self.waiters.pop(0)
                    if fut.done():
                        continue
                    self.leases[tok] = time.monotonic()
                    self.granted += 1
                    self.max_in_flight = max(self.max_in_flight, len(self.leases))
                    fut.set_result(None)

            async def acquire(self, token: str) -> None:
                fut = asyncio.get_running_loop().create_future()
                self.waiters.append((token, fut))
                self._grant()
                while not fut.done():
                    try:
                        await asyncio.wait_for(asyncio.shield(fut), timeout=min(self.lease_s, 30.0))
                    except asyncio.TimeoutError:
                        self._grant()  # reclaim expired leases while waiting

            async def release(self, token: str) -> None:
                self.leases.pop(token, None)
                self._grant()

            async def stats(self) -> dict:
                return {
                    "cap": self.cap,
                    "in_flight": len(self.leases),
                    "waiting": len(self.waiters),
                    "max_in_flight": self.max_in_flight,
                    "granted": self.granted,
                }

        _ACTOR_CLS = _InFlightSemaphore
    return _ACTOR_CLS


def default_limiter(cap: int, scope: str = "auto", name: str = "earthengine") -> Any:
    """``scope``: ``process`` (threads of this process), ``cluster`` (a Ray actor; Ray must be
    initialised) or ``auto`` (cluster when this process is part of a running Ray job)."""
    if scope not in ("auto", "process", "cluster"):
        raise InputError(f"limiter scope must be 'auto', 'process' or 'cluster', got {scope!r}")
    if scope == "auto":
        import sys

        ray = sys.modules.get("ray")
        scope = "cluster" if ray is not None and getattr(ray, "is_initialized", lambda: False)() else "process"
    if scope == "cluster":
        return RayLimiter(cap, name=name)
    return local_limiter(cap, name=name)


def limiter_for(limit: RequestLimit) -> Any:
    """The limiter for a source's :class:`~gum_ray.sources.base.RequestLimit`."""
    return default_limiter(limit.cap, limit.scope, limit.name)
