"""The Earth Engine source: the GUM recipe, fetched through the high-volume endpoint.

What it does, in order, one module each:

1. **Recipe** (:mod:`.recipe`, :func:`build_recipe`): the GUM Earth Engine export built as
   ``ee.Image`` objects in Python, one per modality: the cloud- and shadow-masked Sentinel-2 median
   (s2cloudless join, ``directionalDistanceTransform`` shadows, ``focalMin``/``focalMax`` buffer),
   Sentinel-1 ascending/descending means (IW at 10 m, else EW resampled bilinear, an empty pass ->
   constant 0), SRTM filled with GMTED and ``ee.Terrain.products``, and the optional built-up
   products. Building the expressions makes no request.
2. **Wire encoding** (:mod:`.wire`, :data:`ENCODINGS`): each modality is cast on the server to
   compact integers (reflectance x 10000 as uint16, dB x 100 as int16, elevation in m as int16, slope
   in centi-degrees as int16, aspect in centi-degrees as uint16, products as uint8), missing values
   carried by a sentinel (65535, -32768, 255), so a pixel costs 22 bytes (11 bands) instead of 44.
3. **Planner** (:mod:`.planner`, :func:`plan_tiles`): one request per modality and tile, each at
   most 48 MiB as Earth Engine counts it (band bytes plus one mask byte per band) and at most
   32768 px a side.
4. **Errors** (:mod:`.errors`, :func:`classify_error`): split, retry or give up.
5. **Client** (:mod:`.client`, :class:`EarthEngineSource`): credentials, initialisation and the
   fetcher: ``ee.data.computePixels`` with ``NUMPY_NDARRAY`` results from a thread pool, under the
   in-flight cap the job shares among its workers (:meth:`EarthEngineSource.request_limit`; the
   limiters, per process or a Ray actor per cluster, live with the mapping job in
   :mod:`gum_ray.mapping.limits`); exponential backoff with jitter on 429, quota, 5xx and transport
   errors (truncated bodies included); requests that fail for size, memory or time are split in
   halves until they fit, never dropped.

Credentials come from the usual places (an explicit key file or credentials object,
``GOOGLE_APPLICATION_CREDENTIALS``, ``earthengine authenticate``, application default
credentials) and are never logged. Tests and offline demos point ``url`` at the loopback emulator
(:mod:`gum_ray.sources.ee_emulator`); nothing else changes.

The ``ee`` package is imported lazily: importing this package is cheap and needs no credentials.
"""

from __future__ import annotations

from gum_ray.sources.earthengine.client import (
    DEFAULT_MAX_IN_FLIGHT,
    HIGH_VOLUME_URL,
    EarthEngineOptions,
    EarthEngineSource,
    FetchStats,
    fetch_image_counts,
    initialize_ee,
    resolve_credentials,
)
from gum_ray.sources.earthengine.errors import FATAL, RETRY, SPLIT, classify_error
from gum_ray.sources.earthengine.planner import (
    MAX_GRID_SIDE,
    MAX_REQUEST_BYTES,
    Window,
    check_grid_size,
    plan_tiles,
    split_window,
)
from gum_ray.sources.earthengine.recipe import build_recipe, collections, encode_image, grid_params
from gum_ray.sources.earthengine.wire import (
    ENCODINGS,
    MARKER_COUNTS,
    MARKER_ENCODING,
    MARKER_MODALITY,
    MARKER_YEAR,
    BandCode,
    band_codes,
    decode_numpy,
    encode_numpy,
    request_bytes_per_pixel,
    wire_bytes_per_pixel,
)

__all__ = [
    "BandCode",
    "DEFAULT_MAX_IN_FLIGHT",
    "ENCODINGS",
    "EarthEngineOptions",
    "EarthEngineSource",
    "FATAL",
    "FetchStats",
    "HIGH_VOLUME_URL",
    "MARKER_COUNTS",
    "MARKER_ENCODING",
    "MARKER_MODALITY",
    "MARKER_YEAR",
    "MAX_GRID_SIDE",
    "MAX_REQUEST_BYTES",
    "RETRY",
    "SPLIT",
    "Window",
    "band_codes",
    "build_recipe",
    "check_grid_size",
    "classify_error",
    "collections",
    "decode_numpy",
    "encode_image",
    "encode_numpy",
    "fetch_image_counts",
    "grid_params",
    "initialize_ee",
    "plan_tiles",
    "request_bytes_per_pixel",
    "resolve_credentials",
    "split_window",
    "wire_bytes_per_pixel",
]
