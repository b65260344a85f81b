"""Stores of gum-ray: the global product, its manifest, the imagery cache, exports and statistics.

Every store takes a root path that is a local folder or ``gs://bucket/prefix``
(:mod:`gum_ray.store.fs`). Each name below is imported from its module on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "DEFAULT_PRODUCT_PATH",
    "NODATA",
    "URBAN_THRESHOLD",
    "CellWriteResult",
    "FailureRecord",
    "ImageryCache",
    "Manifest",
    "ProductSettings",
    "ProductStore",
    "encode_probability",
    "export_cog",
    "open_product",
    "render_preview",
    "urban_area",
    "write_and_commit",
]


#: each name's module, imported on first use: ``from gum_ray.store.cog_file import write_cog`` (gum predict)
#: then does not import the product, the cache and the grid (zarr, odc-geo, pyproj: 0.5 s)
_MODULES = {
    "DEFAULT_PRODUCT_PATH": "product", "NODATA": "product", "URBAN_THRESHOLD": "product",
    "CellWriteResult": "product", "ProductSettings": "product", "ProductStore": "product",
    "encode_probability": "product", "open_product": "product",
    "FailureRecord": "manifest", "Manifest": "manifest", "write_and_commit": "manifest",
    "ImageryCache": "cache", "export_cog": "cog", "urban_area": "stats", "render_preview": "preview",
}


def __getattr__(name: str) -> Any:
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module 'gum_ray.store' has no attribute {name!r}")
    return getattr(importlib.import_module(f"gum_ray.store.{module}"), name)
