"""Stores of gum-ray: the global product, its manifest, the imagery cache, exports and statistics.

Every store takes a root path that is a local folder or ``gs://bucket/prefix``
(:mod:`gum_ray.store.fs`). Heavier modules (COG export, previews) are imported on first use.
"""

from __future__ import annotations

from typing import Any

from gum_ray.store.cache import ImageryCache
from gum_ray.store.manifest import FailureRecord, Manifest, write_and_commit
from gum_ray.store.product import (
    DEFAULT_PRODUCT_PATH,
    NODATA,
    URBAN_THRESHOLD,
    CellWriteResult,
    ProductSettings,
    ProductStore,
    encode_probability,
    open_product,
)

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


def __getattr__(name: str) -> Any:
    if name == "export_cog":
        from gum_ray.store.cog import export_cog

        return export_cog
    if name == "urban_area":
        from gum_ray.store.stats import urban_area

        return urban_area
    if name == "render_preview":
        from gum_ray.store.preview import render_preview

        return render_preview
    raise AttributeError(f"module 'gum_ray.store' has no attribute {name!r}")
