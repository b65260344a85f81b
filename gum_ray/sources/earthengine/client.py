"""The Earth Engine client: credentials, initialisation and the fetcher (:class:`EarthEngineSource`).

``ee.data.computePixels`` with ``NUMPY_NDARRAY`` results, per modality and tile (the planner), from a
thread pool of ``threads`` workers under the job's in-flight cap (:meth:`EarthEngineSource.use_limiter`,
:mod:`gum_ray.mapping.limits`); exponential backoff with jitter on 429, quota, 5xx and transport
errors (truncated bodies included); requests that fail for size, memory or time are split in halves
until they fit, never dropped (:mod:`.errors`).

Credentials come from the usual places (an explicit key file or credentials object,
``GOOGLE_APPLICATION_CREDENTIALS``, ``earthengine authenticate``, application default
credentials) and are never logged. The ``ee`` package is imported lazily.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from odc.geo.geobox import GeoBox

from gum_ray.bands import export_band_names
from gum_ray.errors import GumError, InputError
from gum_ray.imagery import MODALITY_SLICES, Imagery, masks_from_export, modalities
from gum_ray.sources.base import ImagerySource, RequestLimit, SourceOptions, check_geobox
from gum_ray.sources.earthengine.errors import FATAL, RETRY, SPLIT, _CorruptResponse, _reason, classify_error
from gum_ray.sources.earthengine.planner import MAX_REQUEST_BYTES, Window, check_grid_size, plan_tiles, split_window
from gum_ray.sources.earthengine.recipe import (
    CLOUD_PROBABILITY_THRESHOLD,
    CLOUDY_PIXEL_PERCENTAGE_MAX,
    RECIPE_VERSION,
    build_recipe,
    collections,
    encode_image,
    grid_params,
)
from gum_ray.sources.options import check_earthengine_url
from gum_ray.sources.earthengine.wire import ENCODINGS, MARKER_COUNTS, band_codes, decode_numpy, request_bytes_per_pixel

log = logging.getLogger(__name__)

HIGH_VOLUME_URL = "https://earthengine-highvolume.googleapis.com"
DEFAULT_MAX_IN_FLIGHT = 40  # the default Earth Engine project quota of concurrent requests
EE_SCOPES = (
    "https://www.googleapis.com/auth/earthengine",
    "https://www.googleapis.com/auth/cloud-platform",
)


class _NoLimit:
    """No cap beyond the fetch's own threads (a source no job gave a limiter)."""

    def acquire(self) -> None:
        return None

    def release(self, token: Any = None) -> None:
        return None


_NO_LIMIT = _NoLimit()


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
    request_seconds: float = 0.0  # summed over all requests sent (each from send to answer)
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
            "request_seconds": round(self.request_seconds, 3),
            "max_in_flight": self.max_in_flight,
        }


@dataclass(frozen=True)
class _Piece:
    modality: str
    window: Window
    depth: int = 0


@dataclasses.dataclass(frozen=True)
class EarthEngineOptions(SourceOptions):
    """The Earth Engine source's options (see :class:`EarthEngineSource` for each one)."""

    project: str | None = None
    credentials: Any = None
    url: str = HIGH_VOLUME_URL
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    limiter_scope: str = "auto"
    threads: int | None = None
    max_request_bytes: int = MAX_REQUEST_BYTES
    tile_side: int | None = None
    max_attempts: int = 12
    backoff_s: float = 1.0
    backoff_max_s: float = 60.0
    encoding: str = "compact"
    count_images: bool = False
    timeout_s: float | None = 300.0

    SECRETS: ClassVar[frozenset[str]] = frozenset({"credentials"})

    def __post_init__(self) -> None:
        # the bearer token goes to this url: Google's API over https, or loopback (the emulator)
        object.__setattr__(self, "url", check_earthengine_url(self.url))
        if self.encoding not in ENCODINGS:
            raise InputError(f"unknown encoding {self.encoding!r}; use one of {sorted(ENCODINGS)}", param="encoding")
        if self.max_in_flight < 1:
            raise InputError(f"max_in_flight must be at least 1, got {self.max_in_flight}", param="max_in_flight")
        if self.max_attempts < 1:
            raise InputError(f"max_attempts must be at least 1, got {self.max_attempts}", param="max_attempts")
        if self.limiter_scope not in ("auto", "process", "cluster"):
            raise InputError(
                f"limiter scope must be 'auto', 'process' or 'cluster', got {self.limiter_scope!r}",
                param="limiter_scope",
            )


class EarthEngineSource(ImagerySource):
    """Imagery from Earth Engine (or its emulator), the GUM recipe through ``computePixels``.

    Options (:class:`EarthEngineOptions`):
        project: the Cloud project registered for Earth Engine (else ``EE_PROJECT``,
            ``GOOGLE_CLOUD_PROJECT`` or the credentials' project).
        credentials: a key-file path, a google-auth credentials object, ``"anonymous"`` (emulator
            only), or None for the usual places (see :func:`resolve_credentials`).
        url: the API root; the high-volume endpoint by default, an emulator's URL in tests.
        with_products: fetch the three built-up product bands too (14-band export).
        max_in_flight: the cap on requests in flight (per process, or per Ray cluster).
        limiter_scope: ``auto`` (cluster-wide inside Ray, else per process), ``process``, ``cluster``:
            the scope of the limiter a job makes for this source (:meth:`request_limit`). Without
            one (``limiter=``, or :meth:`use_limiter`), only this source's own threads cap it.
        threads: worker threads of this process (default: ``max_in_flight``).
        max_request_bytes / tile_side: planner limits (48 MiB and 32768 px by default).
        max_attempts: attempts per request on retryable errors before giving up.
        backoff_s / backoff_max_s: exponential backoff base and ceiling (jittered).
        encoding: ``compact`` (default) or ``float32`` (the baseline, for benchmarks).
        count_images: one extra request for the number of images per collection (provenance).
        timeout_s: per-request HTTP timeout; a request that stalls longer is retried.
    """

    name = "ee"
    recipe_version = RECIPE_VERSION
    Options = EarthEngineOptions

    def __init__(self, options: EarthEngineOptions | None = None, /, *, limiter: Any = None, **kwargs: Any) -> None:
        super().__init__(options, **kwargs)
        o = self.options
        self.project = o.project
        self._credentials = o.credentials
        self.url = o.url.rstrip("/")
        self.max_in_flight = int(o.max_in_flight)
        self.limiter_scope = o.limiter_scope
        self.limiter = limiter
        self.threads = int(o.threads or o.max_in_flight)
        self.max_request_bytes = int(o.max_request_bytes)
        self.tile_side = o.tile_side
        self.max_attempts = int(o.max_attempts)
        self.backoff_s = float(o.backoff_s)
        self.backoff_max_s = float(o.backoff_max_s)
        self.encoding = o.encoding
        self.count_images = bool(o.count_images)
        self.timeout_s = o.timeout_s
        self.last_stats: FetchStats | None = None

    # -- pickling (Ray ships sources to workers): runtime state stays behind -------------------
    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()  # the limiter is re-installed where the source lands
        state["last_stats"] = None
        return state

    def request_limit(self) -> RequestLimit:
        """Earth Engine's concurrent-request quota: ``max_in_flight``, in ``limiter_scope``."""
        return RequestLimit(self.max_in_flight, self.limiter_scope, "earthengine")

    def cache_identity(self) -> dict[str, Any]:
        return {"url": self.url}  # another server (an emulator) serves other pixels

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
        limiter = self.limiter or _NO_LIMIT
        for attempt in range(self.max_attempts):
            if stop.is_set():
                raise GumError("Earth Engine fetch cancelled")
            token = limiter.acquire()
            with stats._lock:
                stats.attempts += 1
                stats._in_flight += 1
                stats.max_in_flight = max(stats.max_in_flight, stats._in_flight)
            sent = time.monotonic()
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
                    stats.request_seconds += time.monotonic() - sent
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


def fetch_image_counts(source: EarthEngineSource, geobox: GeoBox, year: int) -> dict[str, int] | None:
    """The number of images per collection for a grid and year (one request)."""
    check_geobox(geobox, source="Earth Engine source")
    ee = source._ee()
    recipe = build_recipe(ee, geobox, year, with_products=False)
    return source._count_images(ee, recipe["_counts"])
