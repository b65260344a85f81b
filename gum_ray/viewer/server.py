"""``gum serve``: the viewer page with tiles rendered on the fly from the product (local or gs://).

Routes (all GET):

* ``/``                              the viewer page (same page as ``gum tiles`` writes)
* ``/vendor/leaflet/...``            the local Leaflet copy (the page falls back to a CDN without it)
* ``/tiles/<year>/<z>/<x>/<y>.png``  a tile, rendered by :class:`~gum_ray.store.tiles.TileRenderer`
                                     (byte-identical to the one ``gum tiles`` writes); a transparent
                                     tile where nothing is written
* ``/tiles/<year>/tiles.json``       TileJSON of the year
* ``/api/point?year=&lon=&lat=``     JSON: P(urban) and input quality of the product pixel there

Binds to 127.0.0.1 by default: the server is for a quick look, not for the internet.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

from gum_ray.errors import GumError, InputError
from gum_ray.store.product import ProductStore
from gum_ray.store.tiles import MAX_ZOOM, TileRenderer, tilejson
from gum_ray.viewer import VENDOR, base_config, layer_config, local_leaflet, page_html

log = logging.getLogger(__name__)

_TILE = re.compile(r"^/tiles/(\d{4})/(\d{1,2})/(\d{1,8})/(\d{1,8})\.png$")
_TILEJSON = re.compile(r"^/tiles/(\d{4})/tiles\.json$")
_TYPES = {".js": "text/javascript", ".css": "text/css", ".png": "image/png", ".txt": "text/plain"}
SERVE_MAX_ZOOM = 18


class ProductViewer:
    """The state behind ``gum serve``: one :class:`TileRenderer` per year, a page, a tile cache."""

    def __init__(self, product: str, *, years: list[int] | None = None, min_zoom: int = 0,
                 max_zoom: int = SERVE_MAX_ZOOM, basemap: str | None = "osm", cache_tiles: int = 4096):
        self.product = ProductStore.open(product)
        all_years = self.product.years
        if not all_years:
            raise InputError(f"the product {self.product.root} has no years yet: nothing to show")
        years = list(all_years if not years else years)
        for y in years:
            self.product.year_index(y)
        if not 0 <= min_zoom <= max_zoom <= MAX_ZOOM:
            raise InputError(f"zooms {min_zoom}-{max_zoom}: zooms must satisfy 0 <= A <= B <= {MAX_ZOOM}")
        self.renderers = {int(y): TileRenderer(self.product, int(y)) for y in years}
        if not any(r.cells for r in self.renderers.values()):
            raise InputError(f"the product {self.product.root} has no written cells for {', '.join(map(str, years))}")
        self.renderers = {y: r for y, r in self.renderers.items() if r.cells}
        self.zooms = (min_zoom, max_zoom)
        layers = {}
        self.meta = {}
        for y, r in self.renderers.items():
            meta = tilejson(r, self.zooms, {}, quality=False)
            meta["tiles"] = [f"/tiles/{y}/{{z}}/{{x}}/{{y}}.png"]
            self.meta[y] = meta
            layers[str(y)] = layer_config(meta, f"tiles/{y}/{{z}}/{{x}}/{{y}}.png")
        cfg = base_config(f"GUM urban map (gum serve {self.product.root})", basemap)
        cfg.update({"mode": "serve", "years": sorted(self.renderers), "layers": layers, "point_url": "api/point"})
        self.page = page_html(cfg, lib_base="vendor/leaflet/" if local_leaflet() else None).encode("utf-8")
        self._tile = lru_cache(maxsize=cache_tiles)(self._render)

    def _render(self, year: int, z: int, x: int, y: int) -> bytes:
        r = self.renderers[year]
        return r.render_png(z, x, y)

    def tile(self, year: int, z: int, x: int, y: int) -> bytes:
        if year not in self.renderers:
            raise KeyError(year)
        if not (self.zooms[0] <= z <= self.zooms[1] and 0 <= x < 2**z and 0 <= y < 2**z):
            raise KeyError((z, x, y))
        return self._tile(year, z, x, y)

    def point(self, year: int, lon: float, lat: float) -> dict[str, Any]:
        if year not in self.renderers:
            raise KeyError(year)
        return self.renderers[year].value_at(lon, lat)


def make_handler(viewer: ProductViewer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "gum-serve"

        def log_message(self, fmt: str, *args: Any) -> None:  # quiet; -v shows requests
            log.debug("%s " + fmt, self.address_string(), *args)

        def _send(self, status: int, body: bytes, ctype: str, cache: str = "no-cache") -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", cache)
            self.end_headers()
            self.wfile.write(body)

        def _error(self, status: int, msg: str) -> None:
            self._send(status, json.dumps({"error": msg}).encode(), "application/json")

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            url = urlparse(self.path)
            path = url.path
            try:
                if path in ("/", "/index.html"):
                    return self._send(200, viewer.page, "text/html; charset=utf-8")
                m = _TILE.match(path)
                if m:
                    year, z, x, y = map(int, m.groups())
                    try:
                        body = viewer.tile(year, z, x, y)
                    except KeyError:
                        return self._error(404, f"no tile {year}/{z}/{x}/{y}")
                    return self._send(200, body, "image/png", "max-age=60")
                m = _TILEJSON.match(path)
                if m and int(m.group(1)) in viewer.meta:
                    return self._send(200, json.dumps(viewer.meta[int(m.group(1))]).encode(), "application/json")
                if path == "/api/point":
                    q = parse_qs(url.query)
                    try:
                        year, lon, lat = int(q["year"][0]), float(q["lon"][0]), float(q["lat"][0])
                        body = json.dumps(viewer.point(year, lon, lat)).encode()
                    except (KeyError, ValueError, IndexError, GumError) as exc:
                        return self._error(400, f"point query needs year, lon, lat within the product: {exc}")
                    return self._send(200, body, "application/json")
                if path.startswith("/vendor/leaflet/"):
                    rel = path[len("/vendor/leaflet/"):]
                    f = (VENDOR / rel).resolve()
                    if VENDOR.resolve() in f.parents and f.is_file():
                        return self._send(200, f.read_bytes(), _TYPES.get(f.suffix, "application/octet-stream"),
                                          "max-age=3600")
                return self._error(404, f"not found: {path}")
            except (BrokenPipeError, ConnectionResetError):
                return None
            except Exception as exc:  # noqa: BLE001 - one line in the log, a 500 to the browser
                log.warning("gum serve: %s: %s", path, exc)
                return self._error(500, str(exc))

    return Handler


class ViewerServer:
    """A threaded HTTP server around a :class:`ProductViewer` (``start`` / ``stop`` / ``serve_forever``)."""

    def __init__(self, viewer: ProductViewer, host: str = "127.0.0.1", port: int = 8000):
        try:
            self.httpd = ThreadingHTTPServer((host, port), make_handler(viewer))
        except OSError as exc:
            raise InputError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another --port") from None
        self.httpd.daemon_threads = True
        self.viewer = viewer
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/"

    def start(self) -> "ViewerServer":
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

