"""Imagery sources: a target grid (odc-geo GeoBox) and a year in, the GUM export layout out.

* ``synthetic`` - :class:`~gum_ray.sources.synthetic.SyntheticSource`: the built-in synthetic world
  (offline, known urban ground truth).
* ``ee`` - :class:`~gum_ray.sources.earthengine.EarthEngineSource`: the GUM recipe on Earth Engine
  through the high-volume ``computePixels`` endpoint (or the loopback emulator).
* ``geotiff`` - :class:`~gum_ray.sources.geotiff.GeoTiffSource`: a folder of existing GUM exports.

Pick one by name with :func:`get_source`. Modules are imported lazily (the ``ee`` client only when
the Earth Engine source is used).
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from gum_ray.errors import InputError
from gum_ray.sources.base import (
    MIN_YEAR,
    MODALITY_BANDS,
    MODALITY_SLICES,
    Imagery,
    ImagerySource,
    check_geobox,
    check_year,
    masks_from_export,
    max_year,
    modalities,
)

#: source name -> (module, class); aliases map to the same class
SOURCES: dict[str, tuple[str, str]] = {
    "synthetic": ("gum_ray.sources.synthetic", "SyntheticSource"),
    "ee": ("gum_ray.sources.earthengine", "EarthEngineSource"),
    "earthengine": ("gum_ray.sources.earthengine", "EarthEngineSource"),
    "geotiff": ("gum_ray.sources.geotiff", "GeoTiffSource"),
}


def source_class(name: str) -> type[ImagerySource]:
    """The class behind a source name."""
    try:
        module, cls = SOURCES[name.lower()]
    except (KeyError, AttributeError):
        raise InputError(
            f"unknown imagery source {name!r}; choose one of: synthetic (offline synthetic world), "
            "ee (Earth Engine), geotiff (a folder of GUM exports)"
        ) from None
    return getattr(importlib.import_module(module), cls)


def get_source(name: str, **opts: Any) -> ImagerySource:
    """An imagery source by name (``synthetic``, ``ee``/``earthengine``, ``geotiff``).

    ``opts`` go to the source's constructor, e.g. ``get_source("ee", project="my-project")`` or
    ``get_source("geotiff", path="exports/")``. Option values given as strings (``KEY=VALUE`` on the
    command line) are converted to the option's type (``max_in_flight="8"``, ``with_products="yes"``).
    Unknown options or values are an :class:`InputError`.
    """
    cls = source_class(name)
    opts = _coerce_options(cls, name, opts)
    try:
        return cls(**opts)
    except TypeError as exc:
        raise InputError(f"imagery source {name!r}: bad options {sorted(opts)} ({exc})") from None


_TRUE = {"1", "true", "yes", "on", "y"}
_FALSE = {"0", "false", "no", "off", "n", ""}


def _coerce_options(cls: type, name: str, opts: dict[str, Any]) -> dict[str, Any]:
    """Convert string values to the bool/int/float type the constructor declares."""
    params = inspect.signature(cls.__init__).parameters
    out = dict(opts)
    for key, value in opts.items():
        p = params.get(key)
        if p is None or not isinstance(value, str):
            continue
        ann = str(p.annotation)
        try:
            if "bool" in ann or isinstance(p.default, bool):
                low = value.strip().lower()
                if low not in _TRUE | _FALSE:
                    raise ValueError(value)
                out[key] = low in _TRUE
            elif ann.startswith("int") or isinstance(p.default, int):
                out[key] = None if value.strip().lower() == "none" and "None" in ann else int(value)
            elif ann.startswith("float") or isinstance(p.default, float):
                out[key] = None if value.strip().lower() == "none" and "None" in ann else float(value)
        except ValueError:
            raise InputError(
                f"imagery source {name!r}: option {key}={value!r} is not a valid {ann.split(' ')[0]}"
            ) from None
    return out


def __getattr__(attr: str) -> Any:
    """Lazy access to the source classes and the synthetic world's helpers."""
    lazy = {
        "SyntheticSource": "gum_ray.sources.synthetic",
        "EarthEngineSource": "gum_ray.sources.earthengine",
        "GeoTiffSource": "gum_ray.sources.geotiff",
        "synthetic": "gum_ray.sources.synthetic",
        "earthengine": "gum_ray.sources.earthengine",
        "geotiff": "gum_ray.sources.geotiff",
        "ee_emulator": "gum_ray.sources.ee_emulator",
    }
    if attr in lazy:
        mod = importlib.import_module(lazy[attr])
        return mod if attr == lazy[attr].rsplit(".", 1)[1] else getattr(mod, attr)
    raise AttributeError(f"module 'gum_ray.sources' has no attribute {attr!r}")


__all__ = [
    "MIN_YEAR",
    "MODALITY_BANDS",
    "MODALITY_SLICES",
    "SOURCES",
    "EarthEngineSource",
    "GeoTiffSource",
    "Imagery",
    "ImagerySource",
    "SyntheticSource",
    "check_geobox",
    "check_year",
    "get_source",
    "masks_from_export",
    "max_year",
    "modalities",
    "source_class",
]
