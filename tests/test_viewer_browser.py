"""The viewer page in a real browser (Debian's chromium, headless, driven by Playwright over CDP):
the tiles load over the demo town, no console errors, a click shows the product's value, the year
switch works; for a static tile folder (`gum tiles`) and for `gum serve` (local and gs://)."""

from __future__ import annotations

import functools
import io
import os
import shutil
import threading
import uuid
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gum_ray.cli import main
from gum_ray.grid import pixel_center, pixel_index
from gum_ray.store.product import NODATA, ProductStore
from gum_ray.store.tiles import ramp_rgba
from gum_ray.viewer import local_leaflet
from tests.town import TOWN_LONLAT, make_town_product

CHROMIUM = os.environ.get("GUM_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--force-color-profile=srgb"]
BACKGROUND = (0xDC, 0xDC, 0xDC)  # the page's map background (#dcdcdc)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not found: run tools/setup_viewer.sh (installs Debian's chromium)")
    if not local_leaflet():
        pytest.skip("Leaflet is not installed locally: run tools/setup_viewer.sh")
    from playwright.sync_api import sync_playwright

    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=FLAGS,
            viewport={"width": 900, "height": 700}, offline=False,
        )
        try:
            yield ctx
        finally:
            ctx.close()


@pytest.fixture(scope="module")
def town(tmp_path_factory):
    root = tmp_path_factory.mktemp("town") / "product.zarr"
    make_town_product(str(root))
    return str(root)


class Page:
    """A page with its console errors, page errors and failed requests collected."""

    def __init__(self, ctx, url: str):
        self.page = ctx.new_page()
        self.problems: list[str] = []
        self.page.on("console", lambda m: self.problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning") else None)
        self.page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        self.page.on("requestfailed", lambda r: self.problems.append(f"request failed: {r.url} {r.failure}"))
        self.page.on("response", lambda r: self.problems.append(f"HTTP {r.status}: {r.url}") if r.status >= 400 else None)
        self.page.goto(url)
        self.wait_tiles()

    def wait_tiles(self) -> None:
        self.page.wait_for_function("window.gum && window.gum.state.ready && window.gum.state.loads > 0", timeout=30_000)
        # Leaflet fades tiles in: wait until every tile image is fully opaque
        self.page.wait_for_function(
            "[...document.querySelectorAll('img.leaflet-tile')].every(i => i.complete && i.naturalWidth > 0 "
            "&& getComputedStyle(i).opacity === '1')", timeout=10_000)

    def screenshot(self) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(self.page.screenshot())).convert("RGB"))

    def point(self, lon: float, lat: float) -> tuple[int, int]:
        p = self.page.evaluate(f"(() => {{ const p = window.gum.map.latLngToContainerPoint([{lat}, {lon}]); return [p.x, p.y]; }})()")
        return int(round(p[0])), int(round(p[1]))

    def click_value(self, lon: float, lat: float) -> dict:
        x, y = self.point(lon, lat)
        self.page.evaluate("window.gum.lastValue = undefined")
        self.page.mouse.click(x, y)
        self.page.wait_for_function("window.gum.lastValue !== undefined", timeout=15_000)
        self.page.wait_for_selector("#gum-p", timeout=5_000)
        return {"value": self.page.evaluate("window.gum.lastValue"),
                "p": self.page.inner_text("#gum-p"), "q": self.page.inner_text("#gum-q")}


def urban_pixel(product: ProductStore, year: int) -> tuple[float, float, int]:
    """A product pixel near the town's centre with P >= 50: its centre (lon, lat) and value."""
    iy, ix = pixel_index(*TOWN_LONLAT)
    win = product.read_window(year, slice(iy - 20, iy + 20), slice(ix - 20, ix + 20))
    ok = np.argwhere((win >= 50) & (win <= 100) & (win < 100))
    if not len(ok):
        ok = np.argwhere((win >= 50) & (win <= 100))
    r, c = ok[len(ok) // 2]
    lon, lat = pixel_center(iy - 20 + int(r), ix - 20 + int(c))
    return lon, lat, int(win[r, c])


def assert_town_drawn(shot: np.ndarray, xy: tuple[int, int]) -> None:
    x, y = xy
    patch = shot[y - 3 : y + 4, x - 3 : x + 4].reshape(-1, 3).astype(int)
    ramp = ramp_rgba()[50:101, :3].astype(int)
    # every pixel of the patch is an opaque ramp colour of an urban value (P >= 50)
    dist = np.abs(patch[:, None, :] - ramp[None, :, :]).sum(axis=2).min(axis=1)
    assert (dist <= 6).all(), patch
    # and the map is not blank: a good share of the screen shows tiles, not the background
    drawn = (np.abs(shot.astype(int) - np.array(BACKGROUND)).sum(axis=2) > 10).mean()
    assert drawn > 0.2, drawn


def test_static_tiles_page_shows_the_town_and_values(browser, town, tmp_path):
    out = tmp_path / "web"
    assert main(["tiles", "--product", town, "--year", "2020", "--year", "2021", "--zoom", "10-16",
                 "--quiet", "--basemap", "none", str(out)]) == 0
    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(out))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    product = ProductStore.open(town)
    lon, lat, v = urban_pixel(product, 2021)
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/index.html?lon={lon}&lat={lat}&z=16"
        page = Page(browser, url)
        shot = page.screenshot()
        Image.fromarray(shot).save(tmp_path / "static.png")
        assert_town_drawn(shot, page.point(lon, lat))
        got = page.click_value(lon, lat)
        assert got["value"]["probability"] == v and got["p"].startswith(f"{v} %")
        assert got["q"] == "not recorded"
        # the year switch: 2020 loads without errors, and the value follows the year
        assert page.page.evaluate("window.gum.year") == "2021"
        page.page.select_option("#gum-year", "2020")
        page.wait_tiles()
        v2020 = int(product.read_window(2020, *[slice(i, i + 1) for i in pixel_index(lon, lat)])[0, 0])
        got = page.click_value(lon, lat)
        assert got["value"]["probability"] == (None if v2020 == NODATA else v2020)
        assert page.problems == []
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_gum_serve_page_renders_tiles_on_the_fly(browser, town, tmp_path, where, request):
    from gum_ray.viewer.server import ProductViewer, ViewerServer

    root = town
    if where == "gcs":
        request.getfixturevalue("gcs_emulator")
        root = f"gs://gum-test/serve-{uuid.uuid4().hex[:8]}/product.zarr"
        from gum_ray.store import fs

        for f in Path(town).rglob("*"):
            if f.is_file():
                fs.write_bytes(fs.join(root, *f.relative_to(town).parts), f.read_bytes())
    server = ViewerServer(ProductViewer(root, basemap="none"), "127.0.0.1", 0).start()
    product = ProductStore.open(root)
    lon, lat, v = urban_pixel(product, 2020)
    try:
        assert server.url.startswith("http://127.0.0.1:")
        page = Page(browser, f"{server.url}?lon={lon}&lat={lat}&z=15&year=2020")
        shot = page.screenshot()
        Image.fromarray(shot).save(tmp_path / f"serve-{where}.png")
        assert_town_drawn(shot, page.point(lon, lat))
        got = page.click_value(lon, lat)
        assert got["value"]["probability"] == v and got["p"].startswith(f"{v} %")
        assert got["q"] == "not recorded"
        assert page.problems == []
    finally:
        server.stop()


def test_gum_serve_binds_to_loopback_and_bad_inputs_are_one_line(town, capsys):
    import argparse

    from gum_ray.commands import serve

    parser = argparse.ArgumentParser()
    serve.add_parser(parser.add_subparsers())
    args = parser.parse_args(["serve", town])
    assert args.host == "127.0.0.1"
    assert main(["serve", "/nonexistent/product.zarr"]) == 2
    assert "no product at" in capsys.readouterr().err
    assert main(["serve", town, "--year", "1999"]) == 2
    assert "years there: 2020, 2021" in capsys.readouterr().err


def test_page_falls_back_to_the_cdn_without_a_local_leaflet(town, tmp_path):
    out = tmp_path / "web"
    assert main(["tiles", "--product", town, "--year", "2020", "--zoom", "14", "--cdn", "--quiet", str(out)]) == 0
    page = (out / "index.html").read_text()
    assert 'src="https://unpkg.com/leaflet@1.9.4/dist/leaflet.js" integrity="sha256-' in page
    assert not (out / "vendor").exists()
    shutil.rmtree(out)


def test_click_shows_input_quality_when_the_product_records_it(browser, tmp_path):
    """Static tiles (quality tiles at the top zoom) and gum serve (the product) both show it."""
    from gum_ray.viewer.server import ProductViewer, ViewerServer
    from tests.town import add_input_quality

    root = str(tmp_path / "product.zarr")
    p = make_town_product(root, years=(2020,))
    lon, lat, v = urban_pixel(p, 2020)
    cell = p.grid.cell_at(lon, lat)
    codes = np.full(cell.shape, 1 | 4, np.uint8)  # Sentinel-2 and terrain, no Sentinel-1
    add_input_quality(root, 2020, cell, codes)
    expect_q = "Sentinel-2 ✓, Sentinel-1 ✗, terrain ✓"

    server = ViewerServer(ProductViewer(root, basemap="none"), "127.0.0.1", 0).start()
    try:
        page = Page(browser, f"{server.url}?lon={lon}&lat={lat}&z=15")
        got = page.click_value(lon, lat)
        assert got["value"]["input_quality_code"] == 5 and got["q"] == expect_q
        assert got["p"].startswith(f"{v} %") and page.problems == []
    finally:
        server.stop()

    out = tmp_path / "web"
    assert main(["tiles", "--product", root, "--year", "2020", "--zoom", "13-15", "--quiet",
                 "--basemap", "none", str(out)]) == 0
    assert list((out / "2020" / "quality" / "15").rglob("*.png")) and not (out / "2020" / "quality" / "14").exists()

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(out)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        page = Page(browser, f"http://127.0.0.1:{httpd.server_address[1]}/index.html?lon={lon}&lat={lat}&z=15")
        got = page.click_value(lon, lat)
        assert got["q"] == expect_q and got["p"].startswith(f"{v} %")
        assert page.problems == []
    finally:
        httpd.shutdown()
        httpd.server_close()
