"""The Earth Engine source: the GUM recipe, fetched through the high-volume endpoint.

What it does, in order:

1. **Recipe** (:func:`build_recipe`): the GUM Earth Engine export built as ``ee.Image`` objects in
   Python, one per modality: the cloud- and shadow-masked Sentinel-2 median (s2cloudless join,
   ``directionalDistanceTransform`` shadows, ``focalMin``/``focalMax`` buffer), Sentinel-1
   ascending/descending means (IW at 10 m, else EW resampled bilinear, an empty pass -> constant 0),
   SRTM filled with GMTED and ``ee.Terrain.products``, and the optional built-up products. Building
   the expressions makes no request.
2. **Wire encoding** (:data:`ENCODINGS`): each modality is cast on the server to compact integers
   (reflectance x 10000 as uint16, dB x 100 as int16, elevation in m as int16, slope in
   centi-degrees as int16, aspect in centi-degrees as uint16, products as uint8), missing values
   carried by a sentinel (65535, -32768, 255), so a pixel costs 22 bytes (11 bands) instead of 44.
3. **Planner** (:func:`plan_tiles`): one request per modality and tile, each at most 48 MiB as
   Earth Engine counts it (band bytes plus one mask byte per band) and at most 32768 px a side.
4. **Fetcher** (:class:`EarthEngineSource`): ``ee.data.computePixels`` with ``NUMPY_NDARRAY``
   results, a thread pool under an in-flight cap shared by the whole process, or by the whole Ray
   cluster (a named actor) when running inside Ray; exponential backoff with jitter on 429, quota,
   5xx and transport errors (truncated bodies included); requests that fail for size, memory or
   time are split in halves until they fit, never dropped.

Credentials come from the usual places (an explicit key file or credentials object,
``GOOGLE_APPLICATION_CREDENTIALS``, ``earthengine authenticate``, application default
credentials) and are never logged. Tests and offline demos point ``url`` at the loopback emulator
(:mod:`gum_ray.sources.ee_emulator`); nothing else changes.

The ``ee`` package is imported lazily: importing this module is cheap and needs no credentials.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import random
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from odc.geo.geobox import GeoBox

from gum_ray.bands import S1_SCALE, S2_SCALE, SLOPE_ASPECT_SCALE, export_band_names
from gum_ray.errors import GumError, InputError
from gum_ray.sources.options import check_earthengine_url
from gum_ray.sources.base import (
    MODALITY_BANDS,
    MODALITY_SLICES,
    Imagery,
    ImagerySource,
    check_geobox,
    masks_from_export,
    modalities,
)

log = logging.getLogger(__name__)

HIGH_VOLUME_URL = "https://earthengine-highvolume.googleapis.com"
MAX_REQUEST_BYTES = 48 * 1024 * 1024  # Earth Engine's computePixels limit: 50331648 bytes
MAX_GRID_SIDE = 32768  # Earth Engine's limit on a request's width and height, and ours on a grid
DEFAULT_MAX_IN_FLIGHT = 40  # the default Earth Engine project quota of concurrent requests
MARKER_MODALITY = "gum_modality"
MARKER_YEAR = "gum_year"
MARKER_ENCODING = "gum_encoding"
MARKER_COUNTS = "gum_image_counts"
EE_SCOPES = (
    "https://www.googleapis.com/auth/earthengine",
    "https://www.googleapis.com/auth/cloud-platform",
)

# ----------------------------------------------------------------------------------------------
# Wire encodings
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BandCode:
    """How one GUM band travels: ``stored = clamp(round(value * scale) [mod modulo], lo, hi)``,
    ``nodata`` where the value is missing; decoded as ``float32(stored) / scale``."""

    name: str
    dtype: str
    scale: float
    nodata: float
    lo: float
    hi: float
    modulo: int | None = None

    @property
    def itemsize(self) -> int:
        return np.dtype(self.dtype).itemsize


ENCODINGS: dict[str, dict[str, tuple[BandCode, ...]]] = {
    # the default: compact integers (DESIGN.md decision 5)
    "compact": {
        "s2": tuple(BandCode(b, "uint16", S2_SCALE, 65535, 0, 65534) for b in MODALITY_BANDS["s2"]),
        "s1": tuple(BandCode(b, "int16", S1_SCALE, -32768, -32767, 32767) for b in MODALITY_BANDS["s1"]),
        "terrain": (
            BandCode("elevation", "int16", 1.0, -32768, -32767, 32767),
            BandCode("slope", "int16", SLOPE_ASPECT_SCALE, -32768, 0, 9000),
            # 0 <= aspect < 360 deg is 0..35999 centi-degrees: more than int16 holds, so uint16
            BandCode("aspect", "uint16", SLOPE_ASPECT_SCALE, 65535, 0, 35999, modulo=36000),
        ),
        "products": tuple(BandCode(b, "uint8", 1.0, 255, 0, 1) for b in MODALITY_BANDS["products"]),
    },
    # the float32 baseline (for benchmarks): the export as Earth Engine computes it, -9999 = missing
    "float32": {
        m: tuple(BandCode(b, "float32", 1.0, -9999.0, -3.0e38, 3.0e38) for b in bands)
        for m, bands in MODALITY_BANDS.items()
    },
}


def band_codes(modality: str, encoding: str = "compact") -> tuple[BandCode, ...]:
    try:
        return ENCODINGS[encoding][modality]
    except KeyError:
        raise InputError(
            f"unknown encoding {encoding!r} or modality {modality!r}; encodings: {sorted(ENCODINGS)}, "
            f"modalities: {sorted(MODALITY_BANDS)}"
        ) from None


def request_bytes_per_pixel(codes: tuple[BandCode, ...]) -> int:
    """Bytes per pixel as Earth Engine counts a request: each band's bytes plus its mask byte."""
    return sum(c.itemsize + 1 for c in codes)


def wire_bytes_per_pixel(codes: tuple[BandCode, ...]) -> int:
    """Bytes per pixel in the NPY response body."""
    return sum(c.itemsize for c in codes)


def encode_numpy(values: np.ndarray, codes: tuple[BandCode, ...]) -> np.ndarray:
    """float32 (n, h, w) GUM values (NaN = missing) -> structured (h, w) array of the wire encoding.

    The emulator answers with this; Earth Engine computes the same on its side of the wire.
    """
    dtype = np.dtype([(c.name, c.dtype) for c in codes])
    out = np.empty(values.shape[1:], dtype)
    for k, c in enumerate(codes):
        v = values[k].astype(np.float64)
        missing = ~np.isfinite(v)
        if np.dtype(c.dtype).kind == "f":
            q = v
        else:
            q = np.rint(v * c.scale)
            if c.modulo:
                q = np.mod(q, c.modulo)
            q = np.clip(q, c.lo, c.hi)
        q[missing] = c.nodata
        out[c.name] = q.astype(c.dtype)
    return out


def decode_numpy(arr: np.ndarray, codes: tuple[BandCode, ...]) -> np.ndarray:
    """Structured (h, w) array of the wire encoding -> float32 (n, h, w), NaN where missing.

    Same arithmetic as :func:`gum_ray.bands.decode_compact`: ``float32(stored) / scale``.
    """
    names = arr.dtype.names or ()
    missing = [c.name for c in codes if c.name not in names]
    if missing:
        raise _CorruptResponse(f"response lacks bands {missing}")
    out = np.empty((len(codes),) + arr.shape, np.float32)
    for k, c in enumerate(codes):
        raw = arr[c.name]
        x = raw.astype(np.float32)
        if c.scale != 1.0:
            x /= np.float32(c.scale)
        x[raw == raw.dtype.type(c.nodata)] = np.nan
        out[k] = x
    return out


# ----------------------------------------------------------------------------------------------
# The request planner
# ----------------------------------------------------------------------------------------------

Window = tuple[int, int, int, int]  # row0, row1, col0, col1


def check_grid_size(height: int, width: int, *, max_side: int = MAX_GRID_SIDE) -> None:
    """Reject grids the source will not fetch in one go (more than ``max_side`` px a side)."""
    if height <= 0 or width <= 0:
        raise InputError(
            f"Earth Engine source: the grid is empty ({width} x {height} px); give an area of interest "
            "with west < east and south < north"
        )
    if height > max_side or width > max_side:
        raise InputError(
            f"Earth Engine source: the grid is {width} x {height} px, over the {max_side} px a side "
            f"that one fetch (and one Earth Engine request) allows; split the area into cells "
            f"(e.g. the product's 0.25-degree cells) or fetch a coarser grid"
        )


def plan_tiles(
    height: int,
    width: int,
    bytes_per_pixel: int,
    *,
    max_request_bytes: int = MAX_REQUEST_BYTES,
    max_side: int = MAX_GRID_SIDE,
    tile_side: int | None = None,
) -> list[Window]:
    """Cover a ``height x width`` grid with the fewest balanced tiles that each fit one request.

    A tile holds at most ``max_request_bytes // bytes_per_pixel`` pixels (``bytes_per_pixel`` as
    Earth Engine counts it, mask bytes included) and at most ``max_side`` (or ``tile_side``) px a
    side. Tiles do not overlap and cover the grid exactly.
    """
    check_grid_size(height, width)
    if bytes_per_pixel <= 0:
        raise ValueError("bytes_per_pixel must be positive")
    max_px = max_request_bytes // bytes_per_pixel
    if max_px < 1:
        raise InputError(
            f"Earth Engine source: max_request_bytes={max_request_bytes} cannot hold one pixel "
            f"({bytes_per_pixel} bytes); raise it (Earth Engine allows {MAX_REQUEST_BYTES})"
        )
    side = max(1, min(max_side, MAX_GRID_SIDE, tile_side or MAX_GRID_SIDE))
    if height * width <= max_px and height <= side and width <= side:
        return [(0, height, 0, width)]
    s = max(1, min(side, math.isqrt(max_px)))
    if height <= s:
        th, tw = height, min(width, side, max_px // height)
    elif width <= s:
        tw, th = width, min(height, side, max_px // width)
    else:
        th = tw = s
    nx, ny = math.ceil(width / tw), math.ceil(height / th)
    tw, th = math.ceil(width / nx), math.ceil(height / ny)
    assert th * tw <= max_px and th <= side and tw <= side
    return [
        (r, min(r + th, height), c, min(c + tw, width))
        for r in range(0, height, th)
        for c in range(0, width, tw)
    ]


def split_window(win: Window) -> list[Window]:
    """Two halves of a window, cut across its longer side (one pixel cannot be split)."""
    r0, r1, c0, c1 = win
    h, w = r1 - r0, c1 - c0
    if h <= 1 and w <= 1:
        return []
    if w >= h:
        m = c0 + w // 2
        return [(r0, r1, c0, m), (r0, r1, m, c1)]
    m = r0 + h // 2
    return [(r0, m, c0, c1), (m, r1, c0, c1)]


# ----------------------------------------------------------------------------------------------
# Error classification
# ----------------------------------------------------------------------------------------------


class _CorruptResponse(Exception):
    """A response body that is not the expected array (truncated, wrong shape): retried."""


SPLIT = "split"
RETRY = "retry"
FATAL = "fatal"

_SPLIT_WORDS = (
    "total request size",
    "too large",
    "memory limit",
    "memory capacity",
    "timed out",
    "pixel grid dimensions",
    "too many pixels",
)
_RETRY_WORDS = (
    "too many concurrent",
    "too many requests",
    "quota exceeded",
    "rate limit",
    "resource_exhausted",
    "internal error",
    "unavailable",
    "backend error",
    "deadline exceeded",
    "try again",
    "bad gateway",
    "connection reset",
)


def _http_status(exc: BaseException) -> int | None:
    """The HTTP status behind an ``EEException`` (ee raises it while handling the HttpError)."""
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        resp = getattr(e, "resp", None)
        status = getattr(resp, "status", None)
        if status is not None:
            try:
                return int(status)
            except (TypeError, ValueError):
                return None
        e = e.__cause__ or e.__context__
    return None


def classify_error(exc: BaseException) -> str:
    """``split`` (too big, out of memory, timed out), ``retry`` (429, quota, 5xx, transport) or
    ``fatal`` (anything else: a bad recipe, a missing asset, no permission)."""
    if isinstance(exc, (_CorruptResponse, ConnectionError, TimeoutError)):
        return RETRY  # transport: a client-side read timeout is not Earth Engine's "timed out"
    msg = str(exc).lower()
    if any(w in msg for w in _SPLIT_WORDS):
        return SPLIT
    status = _http_status(exc)
    if status is not None and (status == 429 or status >= 500):
        return RETRY
    if any(w in msg for w in _RETRY_WORDS):
        return RETRY
    try:  # transport errors of the HTTP stack
        import google.auth.exceptions as gae
        import requests

        if isinstance(exc, (requests.exceptions.RequestException, gae.TransportError)):
            return RETRY
    except ImportError:  # pragma: no cover
        pass
    if isinstance(exc, OSError):
        return RETRY
    return FATAL


# ----------------------------------------------------------------------------------------------
# The in-flight cap: per process, or per Ray cluster
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# Credentials and initialisation
# ----------------------------------------------------------------------------------------------

_NO_CREDENTIALS = (
    "no Earth Engine credentials found: set GOOGLE_APPLICATION_CREDENTIALS to a service-account key "
    "file (JSON), pass credentials=<key file>, or run `earthengine authenticate` once on this machine"
)


def resolve_credentials(credentials: Any = None) -> tuple[Any, str | None]:
    """Credentials for Earth Engine and the project they name (if any); never logged.

    ``credentials``: a google-auth credentials object, a path to a key file (service account or
    authorized user JSON), ``"anonymous"`` (no credentials: only for an emulator), or None to look
    in the usual places: ``GOOGLE_APPLICATION_CREDENTIALS``, then ``earthengine authenticate``'s
    stored credentials and application default credentials.
    """
    if credentials == "anonymous":
        return None, None
    if credentials is not None and not isinstance(credentials, (str, os.PathLike)):
        project = getattr(credentials, "quota_project_id", None) or getattr(credentials, "project_id", None)
        return credentials, project
    path = os.fspath(credentials) if credentials is not None else os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    if path:
        return _credentials_from_file(path, explicit=credentials is not None)
    try:
        import ee

        creds = ee.data.get_persistent_credentials()
    except Exception as exc:  # EEException ("Please authorize ..."), google.auth errors
        raise GumError(_NO_CREDENTIALS) from exc
    return creds, getattr(creds, "quota_project_id", None)


def _credentials_from_file(path: str, *, explicit: bool) -> tuple[Any, str | None]:
    where = "credentials" if explicit else "GOOGLE_APPLICATION_CREDENTIALS"
    if not os.path.isfile(path):
        raise GumError(
            f"{where} points to {path!r}, which does not exist; give the path of a service-account key "
            "file (JSON) or unset it and run `earthengine authenticate`"
        )
    try:
        import google.auth

        creds, project = google.auth.load_credentials_from_file(path, scopes=list(EE_SCOPES))
    except Exception as exc:
        raise GumError(
            f"{where}: {path!r} is not a usable Google credentials file ({type(exc).__name__}); "
            "download a service-account key (JSON) from the Cloud console, or run `earthengine authenticate`"
        ) from None
    return creds, project


_INIT_LOCK = threading.Lock()
_INIT_KEY: tuple | None = None


def initialize_ee(*, url: str, project: str | None, credentials: Any = None, pool_size: int = 64,
                  timeout_s: float | None = None) -> str:
    """Initialise the ``ee`` client once per process for (url, project, credentials, timeout).

    ``timeout_s`` bounds each HTTP request (a stalled connection fails and is retried instead of
    holding an in-flight slot forever).

    Returns the project used. Raises :class:`GumError` with what to fix when credentials or the
    project are missing or rejected.
    """
    global _INIT_KEY
    url = check_earthengine_url(url)  # before any credential is resolved or sent
    with _INIT_LOCK:
        creds, cred_project = resolve_credentials(credentials)
        project = project or os.environ.get("EE_PROJECT") or os.environ.get("GOOGLE_CLOUD_PROJECT") or cred_project
        key = (url, project, id(creds) if creds is not None else None, timeout_s)
        if _INIT_KEY == key:
            _ensure_pool(pool_size)
            return project or ""
        import ee

        if not project and creds is not None and "service_account" not in type(creds).__module__:
            raise GumError(
                "no Earth Engine project: pass project=... (the Cloud project registered for Earth Engine) "
                "or set EE_PROJECT"
            )
        try:
            ee.data.setMaxRetries(1)  # an unreachable endpoint fails in seconds, not minutes
            # anonymous (emulator) sessions still need a syntactically valid project id; a service
            # account without a project uses its own project
            init_project = project or ("gum-ray-anonymous" if creds is None else None)
            ee.Initialize(credentials=creds, project=init_project, url=url)
        except ee.EEException as exc:
            raise GumError(
                f"Earth Engine at {url} refused to start: {exc}. Check the project and credentials"
            ) from None
        except Exception as exc:
            if "auth" in type(exc).__module__ or "Refresh" in type(exc).__name__:
                raise GumError(
                    f"Earth Engine at {url} rejected the credentials ({type(exc).__name__}); refresh them "
                    "(`earthengine authenticate`) or check the service-account key"
                ) from None
            raise GumError(
                f"cannot reach Earth Engine at {url} ({type(exc).__name__}: {exc}); check the network and the url"
            ) from None
        ee.data.setMaxRetries(0)  # retries are ours (backoff, jitter, splitting, the in-flight cap)
        if timeout_s:
            ee.data.setDeadline(int(timeout_s * 1000))  # per-request timeout of the HTTP session
        _POOL["size"] = 0
        _ensure_pool(pool_size)
        _INIT_KEY = key
        return project or ""


_POOL = {"size": 0}


def _ensure_pool(size: int) -> None:
    """Give the ee client's HTTP session a connection pool at least ``size`` deep (one connection per
    thread in flight), so connections are reused rather than opened and discarded."""
    size = max(int(size), DEFAULT_MAX_IN_FLIGHT)
    if _POOL["size"] >= size:
        return
    try:
        import ee
        import requests.adapters

        session = ee.data._get_state().requests_session  # noqa: SLF001 (no public accessor)
        adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=size)
        session.mount("https://", adapter)
        session.mount("http://", adapter)
        _POOL["size"] = size
    except Exception:  # pragma: no cover - a newer ee without this private state
        pass


# ----------------------------------------------------------------------------------------------
# The GUM recipe as ee.Image objects
# ----------------------------------------------------------------------------------------------

S2_COLLECTION = "COPERNICUS/S2_SR_HARMONIZED"
S2_CLOUD_COLLECTION = "COPERNICUS/S2_CLOUD_PROBABILITY"
S1_COLLECTION = "COPERNICUS/S1_GRD"
SRTM_IMAGE = "USGS/SRTMGL1_003"
GMTED_IMAGE = "USGS/GMTED2010_FULL"
WORLDCOVER_COLLECTION = "ESA/WorldCover/v100"
GISA_COLLECTION = "projects/sat-io/open-datasets/GISA_1972_2019"
WSF_COLLECTION = "projects/sat-io/open-datasets/WSF/WSF_2019"

CLOUDY_PIXEL_PERCENTAGE_MAX = 90
CLOUD_PROBABILITY_THRESHOLD = 50
NIR_DARK_THRESHOLD = 0.15
CLOUD_PROJECTION_DISTANCE_KM = 1
CLOUD_BUFFER_M = 50


def collections(with_products: bool) -> dict[str, Any]:
    """The collections the recipe reads (for provenance)."""
    out: dict[str, Any] = {
        "s2": [S2_COLLECTION, S2_CLOUD_COLLECTION],
        "s1": [S1_COLLECTION],
        "terrain": [SRTM_IMAGE, f"{GMTED_IMAGE}:be75"],
    }
    if with_products:
        out["products"] = [WORLDCOVER_COLLECTION, GISA_COLLECTION, WSF_COLLECTION]
    return out


def _s2_median(ee: Any, region: Any, start: str, end: str) -> tuple[Any, Any]:
    """The cloud/shadow-masked Sentinel-2 SR median (B4, B3, B2, B8 reflectance) and its collection."""
    s2 = (
        ee.ImageCollection(S2_COLLECTION)
        .filterBounds(region)
        .filterDate(start, end)
        .filter(ee.Filter.lte("CLOUDY_PIXEL_PERCENTAGE", CLOUDY_PIXEL_PERCENTAGE_MAX))
    )
    prob = ee.ImageCollection(S2_CLOUD_COLLECTION).filterBounds(region).filterDate(start, end)
    joined = ee.ImageCollection(
        ee.Join.saveFirst("s2cloudless").apply(
            primary=s2,
            secondary=prob,
            condition=ee.Filter.equals(leftField="system:index", rightField="system:index"),
        )
    )

    def mask_clouds_and_shadows(img: Any) -> Any:
        cloud_prob = ee.Image(img.get("s2cloudless")).select("probability")
        is_cloud = cloud_prob.gt(CLOUD_PROBABILITY_THRESHOLD)
        not_water = img.select("SCL").neq(6)
        dark = img.select("B8").lt(NIR_DARK_THRESHOLD * 1e4).multiply(not_water)
        azimuth = ee.Number(90).subtract(ee.Number(img.get("MEAN_SOLAR_AZIMUTH_ANGLE")))
        cloud_projection = (
            is_cloud.directionalDistanceTransform(azimuth, CLOUD_PROJECTION_DISTANCE_KM * 10)
            .reproject(crs=img.select(0).projection(), scale=100)
            .select("distance")
            .mask()
        )
        shadow = cloud_projection.multiply(dark)
        cloud_or_shadow = (
            is_cloud.add(shadow)
            .gt(0)
            .focalMin(2)
            .focalMax(CLOUD_BUFFER_M * 2 / 20)
            .reproject(crs=img.select([0]).projection(), scale=20)
        )
        return img.select(list(MODALITY_BANDS["s2"])).updateMask(cloud_or_shadow.Not())

    masked = joined.map(mask_clouds_and_shadows)
    # an empty year gives a fully masked image (missing), not a band-less one
    empty = ee.Image.constant([0, 0, 0, 0]).rename(list(MODALITY_BANDS["s2"])).updateMask(0)
    median = masked.merge(ee.ImageCollection([empty])).median().divide(10000).toFloat()
    return median.rename(list(MODALITY_BANDS["s2"])), joined


def _s1_means(ee: Any, region: Any, start: str, end: str) -> tuple[Any, dict[str, Any]]:
    """Sentinel-1 VV/VH means by orbit pass, IW 10 m preferred, EW 40 m resampled, empty -> 0."""
    s1 = (
        ee.ImageCollection(S1_COLLECTION)
        .filterBounds(region)
        .filterDate(start, end)
        .filter(ee.Filter.listContains("transmitterReceiverPolarisation", "VV"))
        .filter(ee.Filter.listContains("transmitterReceiverPolarisation", "VH"))
    )
    iw = s1.filter(ee.Filter.eq("instrumentMode", "IW")).filter(ee.Filter.eq("resolution_meters", 10))
    ew = (
        s1.filter(ee.Filter.eq("instrumentMode", "EW"))
        .filter(ee.Filter.eq("resolution_meters", 40))
        .map(lambda img: img.resample("bilinear"))
    )
    col = ee.ImageCollection(ee.Algorithms.If(iw.size().gt(0), iw, ew)).select(["VV", "VH"])
    passes = {}
    images = []
    for orbit, suffix in (("ASCENDING", "ascending"), ("DESCENDING", "descending")):
        p = col.filter(ee.Filter.eq("orbitProperties_pass", orbit))
        passes[suffix] = p
        mean = ee.Image(ee.Algorithms.If(p.size().gt(0), p.mean(), ee.Image.constant([0, 0])))
        images.append(mean.rename([f"VV_{suffix}", f"VH_{suffix}"]).toFloat())
    return ee.Image.cat(images), passes


def _terrain(ee: Any) -> Any:
    srtm = ee.Image(SRTM_IMAGE).select("elevation")
    gmted = ee.Image(GMTED_IMAGE).select("be75").rename("elevation")
    dem = srtm.unmask(gmted)
    return ee.Terrain.products(dem).select(["elevation", "slope", "aspect"]).resample("bilinear").toFloat()


def _products(ee: Any) -> Any:
    worldcover = ee.ImageCollection(WORLDCOVER_COLLECTION).first().select(0).remap([50], [1], 0)
    gisa = ee.ImageCollection(GISA_COLLECTION).mosaic().select(0).lte(37).unmask(0)
    wsf = ee.ImageCollection(WSF_COLLECTION).mosaic().select(0).eq(255).unmask(0)
    return ee.Image.cat([worldcover, gisa, wsf]).rename(list(MODALITY_BANDS["products"])).toUint8()


def region_geometry(ee: Any, geobox: GeoBox) -> Any:
    """The grid's footprint as a planar polygon in the grid's own CRS."""
    crs = geobox.crs
    crs_code = f"EPSG:{crs.epsg}" if crs.epsg is not None else crs.to_wkt()
    coords = [list(map(float, p)) for p in geobox.extent.geom.exterior.coords]
    return ee.Geometry.Polygon([coords], proj=crs_code, geodesic=False)


def build_recipe(ee: Any, geobox: GeoBox, year: int, *, with_products: bool) -> dict[str, Any]:
    """The GUM export as one ``ee.Image`` per modality (GUM units: reflectance, dB, m, degrees)."""
    region = region_geometry(ee, geobox)
    start, end = f"{year}-01-01", f"{year + 1}-01-01"
    s2, s2_col = _s2_median(ee, region, start, end)
    s1, s1_passes = _s1_means(ee, region, start, end)
    recipe = {"s2": s2, "s1": s1, "terrain": _terrain(ee)}
    if with_products:
        recipe["products"] = _products(ee)
    recipe["_counts"] = ee.Dictionary(
        {
            MARKER_COUNTS: 1,
            "s2": s2_col.size(),
            "s1_ascending": s1_passes["ascending"].size(),
            "s1_descending": s1_passes["descending"].size(),
        }
    )
    return recipe


def encode_image(ee: Any, image: Any, modality: str, year: int, encoding: str = "compact") -> Any:
    """Cast a modality image to its wire encoding; missing values become the sentinel."""
    bands = []
    for c in band_codes(modality, encoding):
        b = image.select(c.name)
        if c.dtype == "float32":
            b = b.toFloat().unmask(c.nodata, False)
        else:
            if c.scale != 1.0:
                b = b.multiply(c.scale)
            b = b.round()
            if c.modulo:
                b = b.mod(c.modulo)
            b = b.clamp(c.lo, c.hi).unmask(c.nodata, False)
            b = {"uint16": b.toUint16, "int16": b.toInt16, "uint8": b.toUint8}[c.dtype]()
        bands.append(b)
    names = [c.name for c in band_codes(modality, encoding)]
    return (
        ee.Image.cat(bands)
        .rename(names)
        .set(MARKER_MODALITY, modality)
        .set(MARKER_YEAR, year)
        .set(MARKER_ENCODING, encoding)
    )


def grid_params(geobox: GeoBox) -> dict[str, Any]:
    """The ``grid`` of a computePixels request for this GeoBox (PixelGrid of the REST API)."""
    a = geobox.affine
    h, w = geobox.shape
    grid: dict[str, Any] = {
        "dimensions": {"width": int(w), "height": int(h)},
        "affineTransform": {
            "scaleX": a.a, "shearX": a.b, "translateX": a.c,
            "shearY": a.d, "scaleY": a.e, "translateY": a.f,
        },
    }
    if geobox.crs.epsg is not None:
        grid["crsCode"] = f"EPSG:{geobox.crs.epsg}"
    else:
        grid["crsWkt"] = geobox.crs.to_wkt()
    return grid


# ----------------------------------------------------------------------------------------------
# The fetcher
# ----------------------------------------------------------------------------------------------


@dataclass
class FetchStats:
    """What a fetch cost."""

    requests: int = 0  # successful requests
    attempts: int = 0  # all requests sent
    retries: dict[str, int] = field(default_factory=dict)  # by reason
    splits: int = 0
    bytes: int = 0  # payload bytes received (successful requests)
    pixels: int = 0  # pixels received, summed over modalities
    seconds: float = 0.0
    max_in_flight: int = 0  # seen by this fetch
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _in_flight: int = field(default=0, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "attempts": self.attempts,
            "retries": dict(self.retries),
            "splits": self.splits,
            "bytes": self.bytes,
            "pixels": self.pixels,
            "seconds": round(self.seconds, 3),
            "max_in_flight": self.max_in_flight,
        }


@dataclass(frozen=True)
class _Piece:
    modality: str
    window: Window
    depth: int = 0


class EarthEngineSource(ImagerySource):
    """Imagery from Earth Engine (or its emulator), the GUM recipe through ``computePixels``.

    Args:
        project: the Cloud project registered for Earth Engine (else ``EE_PROJECT``,
            ``GOOGLE_CLOUD_PROJECT`` or the credentials' project).
        credentials: a key-file path, a google-auth credentials object, ``"anonymous"`` (emulator
            only), or None for the usual places (see :func:`resolve_credentials`).
        url: the API root; the high-volume endpoint by default, an emulator's URL in tests.
        with_products: fetch the three built-up product bands too (14-band export).
        max_in_flight: the cap on requests in flight (per process, or per Ray cluster).
        limiter_scope: ``auto`` (cluster-wide inside Ray, else per process), ``process``, ``cluster``.
        threads: worker threads of this process (default: ``max_in_flight``).
        max_request_bytes / tile_side: planner limits (48 MiB and 32768 px by default).
        max_attempts: attempts per request on retryable errors before giving up.
        backoff_s / backoff_max_s: exponential backoff base and ceiling (jittered).
        encoding: ``compact`` (default) or ``float32`` (the baseline, for benchmarks).
        count_images: one extra request for the number of images per collection (provenance).
        timeout_s: per-request HTTP timeout; a request that stalls longer is retried.
    """

    name = "ee"

    def __init__(
        self,
        *,
        project: str | None = None,
        credentials: Any = None,
        url: str = HIGH_VOLUME_URL,
        with_products: bool = False,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        limiter_scope: str = "auto",
        limiter: Any = None,
        threads: int | None = None,
        max_request_bytes: int = MAX_REQUEST_BYTES,
        tile_side: int | None = None,
        max_attempts: int = 12,
        backoff_s: float = 1.0,
        backoff_max_s: float = 60.0,
        encoding: str = "compact",
        count_images: bool = False,
        timeout_s: float | None = 300.0,
    ) -> None:
        super().__init__(with_products=with_products)
        if encoding not in ENCODINGS:
            raise InputError(f"unknown encoding {encoding!r}; use one of {sorted(ENCODINGS)}")
        if max_in_flight < 1:
            raise InputError(f"max_in_flight must be at least 1, got {max_in_flight}")
        if max_attempts < 1:
            raise InputError(f"max_attempts must be at least 1, got {max_attempts}")
        self.project = project
        self._credentials = credentials
        self.url = check_earthengine_url(url)  # the bearer token goes there: Google or loopback only
        self.max_in_flight = int(max_in_flight)
        self.limiter_scope = limiter_scope
        self._limiter = limiter
        self.threads = int(threads or max_in_flight)
        self.max_request_bytes = int(max_request_bytes)
        self.tile_side = tile_side
        self.max_attempts = int(max_attempts)
        self.backoff_s = float(backoff_s)
        self.backoff_max_s = float(backoff_max_s)
        self.encoding = encoding
        self.count_images = bool(count_images)
        self.timeout_s = timeout_s
        self.last_stats: FetchStats | None = None

    # -- pickling (Ray ships sources to workers): runtime state stays behind -------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_limiter"] = None  # re-made where the source lands (cluster-wide inside Ray)
        state["last_stats"] = None
        return state

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.name,
            "url": self.url,
            "project": self.project,
            "with_products": self.with_products,
            "max_in_flight": self.max_in_flight,
            "encoding": self.encoding,
            "max_request_bytes": self.max_request_bytes,
        }

    @property
    def limiter(self) -> Any:
        if self._limiter is None:
            self._limiter = default_limiter(self.max_in_flight, self.limiter_scope)
        return self._limiter

    def _ee(self) -> Any:
        project = initialize_ee(
            url=self.url, project=self.project, credentials=self._credentials, pool_size=max(self.threads, 10),
            timeout_s=self.timeout_s,
        )
        self._project_used = project
        import ee

        return ee

    # -- planning ---------------------------------------------------------------------------------
    def plan(self, geobox: GeoBox) -> list[tuple[str, Window]]:
        """(modality, window) requests for a grid: no network."""
        h, w = (int(v) for v in geobox.shape)
        check_grid_size(h, w)
        out = []
        for m in modalities(self.with_products):
            bpp = request_bytes_per_pixel(band_codes(m, self.encoding))
            for win in plan_tiles(h, w, bpp, max_request_bytes=self.max_request_bytes, tile_side=self.tile_side):
                out.append((m, win))
        return out

    # -- fetching ---------------------------------------------------------------------------------
    def _fetch(self, geobox: GeoBox, year: int) -> Imagery:
        h, w = (int(v) for v in geobox.shape)
        check_grid_size(h, w)
        plan = self.plan(geobox)
        ee = self._ee()
        recipe = build_recipe(ee, geobox, year, with_products=self.with_products)
        images = {m: encode_image(ee, recipe[m], m, year, self.encoding) for m in modalities(self.with_products)}
        n_bands = len(export_band_names(self.with_products))
        stats = FetchStats()
        t0 = time.monotonic()
        export = self._run(ee, geobox, images, [_Piece(m, win) for m, win in plan], (n_bands, h, w), stats)
        stats.seconds = time.monotonic() - t0
        self.last_stats = stats
        provenance: dict[str, Any] = {
            "source": self.name,
            "endpoint": self.url,
            "project": getattr(self, "_project_used", None) or None,
            "year": year,
            "dates": [f"{year}-01-01", f"{year + 1}-01-01"],
            "collections": collections(self.with_products),
            "recipe": {
                "s2": "median of cloud/shadow-masked scenes, "
                f"CLOUDY_PIXEL_PERCENTAGE <= {CLOUDY_PIXEL_PERCENTAGE_MAX}, "
                f"cloud probability > {CLOUD_PROBABILITY_THRESHOLD}",
                "s1": "IW 10 m (else EW 40 m bilinear) VV/VH, mean per orbit pass, empty pass -> 0",
                "terrain": "SRTM unmasked with GMTED be75, ee.Terrain.products, bilinear",
            },
            "encoding": self.encoding,
            "requests": stats.as_dict(),
        }
        if self.count_images:
            provenance["image_counts"] = self._count_images(ee, recipe["_counts"])
        masks = masks_from_export(export, self.with_products)
        return Imagery(export, masks, provenance, geobox, self.with_products)

    def _count_images(self, ee: Any, counts: Any) -> dict[str, int] | None:
        for attempt in range(self.max_attempts):
            try:
                info = counts.getInfo()
                return {k: int(v) for k, v in info.items() if k != MARKER_COUNTS}
            except Exception as exc:  # noqa: BLE001
                if classify_error(exc) != RETRY:
                    log.warning("image counts unavailable: %s", exc)
                    return None
                time.sleep(self._backoff(attempt))
        return None

    def _backoff(self, attempt: int) -> float:
        """Exponential backoff with jitter: uniform in [d/2, d], d = min(max, base * 2**attempt)."""
        d = min(self.backoff_max_s, self.backoff_s * (2.0**attempt))
        return d * (0.5 + 0.5 * random.random())

    def _run(self, ee, geobox, images, pieces, shape, stats) -> np.ndarray:
        """Fetch all pieces with a thread pool into a new ``shape`` export; split pieces are
        re-queued; none is dropped.

        Workers hand results back through a queue (O(1) per request on the main thread, which
        writes each piece into the export); every pixel of every modality is written exactly once.
        """
        h, w = shape[1:]
        filled = {m: 0 for m in images}
        stop = threading.Event()
        results: queue.SimpleQueue = queue.SimpleQueue()
        pool = ThreadPoolExecutor(max_workers=max(1, self.threads), thread_name_prefix="gum-ee")

        def task(p: _Piece) -> None:
            try:
                results.put((p, *self._do_piece(ee, geobox, images[p.modality], p, stats, stop)))
            except BaseException as exc:  # noqa: BLE001 - re-raised on the main thread
                results.put((p, FATAL, exc))

        outstanding = 0
        try:
            for p in pieces:
                pool.submit(task, p)
                outstanding += 1
            # allocate (and page in) the export while the first requests are in flight: faulting
            # hundreds of MB in later, piece by piece under the GIL, would stall the workers
            export = np.full(shape, np.nan, np.float32)
            while outstanding:
                piece, kind, payload = results.get()
                outstanding -= 1
                if kind == FATAL:
                    raise payload
                if kind == SPLIT:
                    for child in payload:
                        pool.submit(task, child)
                        outstanding += 1
                    continue
                r0, r1, c0, c1 = piece.window
                export[MODALITY_SLICES[piece.modality], r0:r1, c0:c1] = payload
                filled[piece.modality] += (r1 - r0) * (c1 - c0)
        except BaseException:
            stop.set()  # running pieces stop at their next attempt or backoff
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        for m, n in filled.items():
            if n != h * w:  # pragma: no cover - a planner bug, never a silent hole
                raise RuntimeError(f"Earth Engine fetch covered {n} of {h * w} pixels of {m}")
        return export

    def _do_piece(self, ee, geobox, image, piece: _Piece, stats: FetchStats, stop: threading.Event):
        """One piece: retry on transient errors, split on size/memory/time errors."""
        codes = band_codes(piece.modality, self.encoding)
        r0, r1, c0, c1 = piece.window
        grid = grid_params(geobox[r0:r1, c0:c1])
        limiter = self.limiter
        for attempt in range(self.max_attempts):
            if stop.is_set():
                raise GumError("Earth Engine fetch cancelled")
            token = limiter.acquire()
            with stats._lock:
                stats.attempts += 1
                stats._in_flight += 1
                stats.max_in_flight = max(stats.max_in_flight, stats._in_flight)
            try:
                arr = ee.data.computePixels(
                    {"expression": image, "fileFormat": "NUMPY_NDARRAY", "grid": grid}
                )
                if not isinstance(arr, np.ndarray) or arr.shape != (r1 - r0, c1 - c0):
                    raise _CorruptResponse(
                        f"expected a {(r1 - r0, c1 - c0)} array, got {getattr(arr, 'shape', type(arr).__name__)}"
                    )
                values = decode_numpy(arr, codes)
            except Exception as exc:  # noqa: BLE001 - classified below
                kind = classify_error(exc)
                error = exc
            else:
                with stats._lock:
                    stats.requests += 1
                    stats.bytes += int(arr.nbytes)
                    stats.pixels += int(arr.size)
                return "data", values
            finally:
                with stats._lock:
                    stats._in_flight -= 1
                limiter.release(token)
            reason = _reason(error)
            if kind == SPLIT:
                halves = split_window(piece.window)
                if not halves:
                    raise GumError(
                        f"Earth Engine cannot compute even one pixel of {piece.modality} ({error}); "
                        "check the recipe and the area"
                    )
                with stats._lock:
                    stats.splits += 1
                log.debug("splitting %s %s after: %s", piece.modality, piece.window, error)
                return SPLIT, [_Piece(piece.modality, win, piece.depth + 1) for win in halves]
            if kind == FATAL:
                raise GumError(f"Earth Engine request for {piece.modality} failed: {error}")
            with stats._lock:
                stats.retries[reason] = stats.retries.get(reason, 0) + 1
            if stop.wait(self._backoff(attempt)):
                raise GumError("Earth Engine fetch cancelled")
        raise GumError(
            f"Earth Engine kept failing for {piece.modality} {piece.window} after {self.max_attempts} attempts "
            f"(last: {error}); try again later or lower max_in_flight"
        )


def _reason(exc: BaseException) -> str:
    status = _http_status(exc)
    if status is not None:
        return str(status)
    if isinstance(exc, _CorruptResponse):
        return "corrupt"
    if isinstance(exc, (ConnectionError, TimeoutError, OSError)):
        return "transport"
    return type(exc).__name__


def fetch_image_counts(source: EarthEngineSource, geobox: GeoBox, year: int) -> dict[str, int] | None:
    """The number of images per collection for a grid and year (one request)."""
    check_geobox(geobox, source="Earth Engine source")
    ee = source._ee()
    recipe = build_recipe(ee, geobox, year, with_products=False)
    return source._count_images(ee, recipe["_counts"])


__all__ = [
    "BandCode",
    "ENCODINGS",
    "EarthEngineSource",
    "FetchStats",
    "HIGH_VOLUME_URL",
    "LocalLimiter",
    "MAX_GRID_SIDE",
    "MAX_REQUEST_BYTES",
    "RayLimiter",
    "band_codes",
    "build_recipe",
    "check_grid_size",
    "classify_error",
    "decode_numpy",
    "default_limiter",
    "encode_image",
    "encode_numpy",
    "grid_params",
    "initialize_ee",
    "plan_tiles",
    "request_bytes_per_pixel",
    "resolve_credentials",
    "split_window",
]

