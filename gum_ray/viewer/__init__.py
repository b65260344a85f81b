"""The viewer page: a Leaflet slippy map of the product's tiles, for ``gum tiles`` and ``gum serve``.

One page (``index.html`` in this package) serves both: its configuration is a JSON block written
into it. It shows one year's tiles (a year switch when there are several), a legend of the colour
ramp, and on a click the P(urban) and input quality of the pixel there (``gum serve`` answers from
the product; a static tile folder answers from the top-zoom tile, whose palette index is the value).

Leaflet comes from the local copy that ``tools/setup_viewer.sh`` installs into
``gum_ray/viewer/vendor/leaflet`` (tests, offline use); when that copy is absent, or with ``--cdn``,
the page loads Leaflet 1.9.4 from a CDN with its subresource-integrity hashes.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from gum_ray.store import fs

HERE = Path(__file__).resolve().parent
VENDOR = HERE / "vendor" / "leaflet"
LEAFLET_VERSION = "1.9.4"
LEAFLET_CDN = f"https://unpkg.com/leaflet@{LEAFLET_VERSION}/dist/"
LEAFLET_SRI = {  # the hashes Leaflet publishes for 1.9.4 (checked against the npm package at set-up)
    "leaflet.js": "sha256-20nQCchB9co0qIjJZRGuk2/Z9VM+kNiyxNV1lvTlZBo=",
    "leaflet.css": "sha256-p4NxAoJBhIIN+hmNHrzRCf9tD/miZyoHS5obTRR9BMY=",
}
OSM_BASEMAP = {
    "url": "https://tile.openstreetmap.org/{z}/{x}/{y}.png",
    "attribution": '&copy; <a href="https://www.openstreetmap.org/copyright">OpenStreetMap</a> contributors',
}


def local_leaflet() -> bool:
    """Whether the local Leaflet copy is installed (``tools/setup_viewer.sh``)."""
    return (VENDOR / "leaflet.js").is_file() and (VENDOR / "leaflet.css").is_file()


def page_html(config: dict[str, Any], *, lib_base: str | None) -> str:
    """The page with ``config`` in it; ``lib_base`` the URL folder of the local Leaflet, None = CDN."""
    template = (HERE / "index.html").read_text(encoding="utf-8")
    if lib_base is None:
        js, css = LEAFLET_CDN + "leaflet.js", LEAFLET_CDN + "leaflet.css"
        js_sri = f' integrity="{LEAFLET_SRI["leaflet.js"]}" crossorigin=""'
        css_sri = f' integrity="{LEAFLET_SRI["leaflet.css"]}" crossorigin=""'
    else:
        js, css, js_sri, css_sri = lib_base + "leaflet.js", lib_base + "leaflet.css", "", ""
    # JSON inside <script>: keep "</" from closing the element
    cfg = json.dumps(config, separators=(",", ":")).replace("</", "<\\/")
    return (
        template.replace("@@TITLE@@", html.escape(str(config.get("title", "gum-ray map"))))
        .replace("@@LEAFLET_JS@@", js).replace("@@LEAFLET_CSS@@", css)
        .replace("@@LEAFLET_JS_SRI@@", js_sri).replace("@@LEAFLET_CSS_SRI@@", css_sri)
        .replace("@@CONFIG@@", cfg)
    )


def base_config(title: str, basemap: str | None = "osm") -> dict[str, Any]:
    from gum_ray.store.product import URBAN_THRESHOLD
    from gum_ray.store.tiles import ALPHA_AT_ZERO, QUALITY_BITS, RAMP_STOPS

    if basemap in (None, "none"):
        bm = None
    elif basemap == "osm":
        bm = OSM_BASEMAP
    else:
        bm = {"url": basemap, "attribution": ""}
    return {
        "title": title,
        "basemap": bm,
        "ramp": {"stops": [list(s) for s in RAMP_STOPS], "alpha_at_zero": ALPHA_AT_ZERO,
                 "threshold": URBAN_THRESHOLD},
        "quality_bits": [list(b) for b in QUALITY_BITS],
    }


def layer_config(meta: dict[str, Any], tiles: str) -> dict[str, Any]:
    """The page's view of one year's TileJSON (``tiles``: the URL template of its tiles)."""
    g = meta["gum"]
    return {
        "tiles": tiles,
        "minzoom": meta["minzoom"],
        "maxzoom": meta["maxzoom"],
        "bounds": meta["bounds"],
        "attribution": meta.get("attribution", ""),
        "cell_deg": g["cell_deg"],
        "cells": g["cells"],
        "clip": g.get("clip"),
        "quality_tiles": (tiles.rsplit("{z}", 1)[0] + g["quality_tiles"]) if g.get("quality_tiles") else None,
    }


def write_viewer(out: str, *, cdn: bool = False, basemap: str | None = "osm") -> str:
    """Write ``OUT/index.html`` for every year folder with a ``tiles.json`` under ``out``.

    Copies the local Leaflet to ``OUT/vendor/leaflet`` unless ``cdn`` (or it is not installed).
    Returns the page's path.
    """
    layers = {}
    for name in fs.list_names(out):
        if name.isdigit() and fs.exists(fs.join(out, name, "tiles.json")):
            meta = json.loads(fs.read_bytes(fs.join(out, name, "tiles.json")))
            layers[name] = layer_config(meta, f"{name}/{{z}}/{{x}}/{{y}}.png")
    years = sorted(layers, key=int)
    cfg = base_config(f"GUM urban map {', '.join(years)}", basemap)
    cfg.update({"mode": "tiles", "years": [int(y) for y in years], "layers": layers})
    lib_base = None
    if not cdn and local_leaflet():
        for f in sorted(VENDOR.rglob("*")):
            if f.is_file():
                target = fs.join(out, "vendor", "leaflet", *f.relative_to(VENDOR).parts)
                fs.write_bytes(target, f.read_bytes())
        lib_base = "vendor/leaflet/"
    page = fs.join(out, "index.html")
    fs.write_bytes(page, page_html(cfg, lib_base=lib_base).encode("utf-8"))
    return page
