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
from typing import Any

from gum_ray.errors import InputError
from gum_ray.imagery import MODALITY_BANDS, MODALITY_SLICES, Imagery, masks_from_export, modalities
from gum_ray.sources.base import (
    MIN_YEAR,
    ImagerySource,
    SourceOptions,
    check_geobox,
    check_year,
    max_year,
    parse_options,
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

    ``opts`` are the source's options (its :class:`SourceOptions` dataclass), e.g.
    ``get_source("ee", project="my-project")`` or ``get_source("geotiff", path="exports/")``. Option
    values given as strings (``KEY=VALUE`` on the command line) are converted to the option's type
    (``max_in_flight="8"``, ``with_products="yes"``).

    Raises:
        InputError: an unknown source, an unknown option or a bad value.
    """
    cls = source_class(name)
    return cls(parse_options(cls.Options, name, opts))


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
    "SourceOptions",
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
    "parse_options",
    "source_class",
]
