"""A loopback Earth Engine emulator: the REST surface the ``ee`` client uses, backed by the
synthetic world, with fault injection.

The real ``ee`` client talks to it unchanged through ``ee.Initialize(project=..., url=emulator.url)``:

* ``GET /$discovery/rest?version=v1`` - the discovery document shipped inside the ``ee`` package
  (``ee/tests/cloud_api_discovery_document.json``), re-rooted at the emulator and at the version
  asked for; every path it declares is served (unknown methods answer 501).
* ``GET /v1/projects/{p}/algorithms`` - the algorithm list shipped inside the ``ee`` package.
* ``POST /v1/projects/{p}/image:computePixels`` - NPY for the requested grid from the synthetic
  world, in the wire encoding the gum-ray client asks for. The emulator does not evaluate the
  recipe graph: it reads the modality, year and encoding markers the client sets on the image
  (``gum_modality``, ``gum_year``, ``gum_encoding``).
* ``POST /v1/projects/{p}/value:compute`` - only gum-ray's image-count dictionary.
* ``POST /token`` - a fake OAuth token endpoint, so service-account key files whose ``token_uri``
  points here work offline.
* ``/_emulator/stats`` (GET), ``/_emulator/faults`` (POST JSON), ``/_emulator/reset`` (POST):
  control and statistics, also for an emulator running in another process.

Faults: a rate of 429s (with Earth Engine's quota wording), of 5xx, latency (with jitter),
oversize requests answered 400 with Earth Engine's own wording ("Total request size (N bytes) must
be less than or equal to 50331648 bytes."), "User memory limit exceeded." and "Computation timed
out." above configurable sizes, and truncated bodies. The emulator records the maximum number of
``computePixels`` requests it served at once.

Run it standalone with ``python tools/ee_emulator.py`` (or ``python -m gum_ray.sources.ee_emulator``).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

import numpy as np
from affine import Affine
from odc.geo.geobox import GeoBox

from gum_ray.sources import synthetic
from gum_ray.imagery import MODALITY_SLICES
from gum_ray.sources.earthengine import (
    ENCODINGS,
    MARKER_COUNTS,
    MARKER_ENCODING,
    MARKER_MODALITY,
    MARKER_YEAR,
    MAX_GRID_SIDE,
    MAX_REQUEST_BYTES,
    encode_numpy,
    request_bytes_per_pixel,
)

QUOTA_429_MESSAGES = (
    "Too many concurrent aggregations.",
    "Quota exceeded for quota metric 'High-volume requests' and limit 'High-volume requests per minute "
    "per user' of service 'earthengine-highvolume.googleapis.com'.",
)


@dataclass
class Faults:
    """What can go wrong, and how often (rates are per ``computePixels`` request)."""

    rate_429: float = 0.0
    rate_5xx: float = 0.0
    rate_truncate: float = 0.0
    latency_s: float = 0.0
    latency_jitter_s: float = 0.0
    max_request_bytes: int = MAX_REQUEST_BYTES
    memory_limit_pixels: int | None = None
    timeout_pixels: int | None = None
    seed: int = 0


class _Stats:
    def __init__(self, record_intervals: bool) -> None:
        self.lock = threading.Lock()
        self.record_intervals = record_intervals
        self.reset()

    def reset(self) -> None:
        """Zero the counters (requests still being served stay counted as in flight)."""
        with self.lock:
            self.requests = 0
            self.routes: dict[str, int] = {}
            self.compute_pixels = 0
            self.compute_pixels_ok = 0
            self.faults: dict[str, int] = {}
            self.in_flight = getattr(self, "in_flight", 0)
            self.max_in_flight = self.in_flight
            self.bytes_sent = 0
            self.pixels_sent = 0
            self.intervals: list[tuple[float, float]] = []
            self.t0 = time.monotonic()

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {
                "requests": self.requests,
                "routes": dict(self.routes),
                "compute_pixels": self.compute_pixels,
                "compute_pixels_ok": self.compute_pixels_ok,
                "faults": dict(self.faults),
                "in_flight": self.in_flight,
                "max_in_flight": self.max_in_flight,
                "bytes_sent": self.bytes_sent,
                "pixels_sent": self.pixels_sent,
                "intervals": list(self.intervals) if self.record_intervals else None,
            }


def _ee_resource(name: str) -> bytes:
    return (resources.files("ee") / "tests" / name).read_bytes()


_DISCOVERY_CACHE: dict[tuple[str, str], bytes] = {}


def _discovery(root: str, version: str) -> bytes:
    key = (root, version)
    if key not in _DISCOVERY_CACHE:
        doc = json.loads(_ee_resource("cloud_api_discovery_document.json"))
        old = doc.get("version", "v1alpha")
        text = json.dumps(doc).replace(f'"{old}/', f'"{version}/')
        doc = json.loads(text)
        doc["version"] = version
        doc["rootUrl"] = root + "/"
        doc["baseUrl"] = root + "/"
        _DISCOVERY_CACHE[key] = json.dumps(doc).encode()
    return _DISCOVERY_CACHE[key]


def _declared_routes(version: str) -> list[tuple[str, Any]]:
    """(HTTP method, path regex) of every method in the discovery document."""
    import re

    doc = json.loads(_ee_resource("cloud_api_discovery_document.json"))
    old = doc.get("version", "v1alpha")
    out = []

    def walk(res: dict) -> None:
        for sub in res.get("resources", {}).values():
            for m in sub.get("methods", {}).values():
                path = m.get("flatPath", m["path"]).replace(f"{old}/", f"{version}/")
                rx = "[^/]+".join(re.escape(seg) for seg in re.split(r"\{[^}]+\}", path))
                out.append((m["httpMethod"], re.compile("^/" + rx + "$")))
            walk(sub)

    walk(doc)
    return out


def find_markers(expression: Any) -> dict[str, Any]:
    """The gum-ray markers (``gum_*`` property name -> value) set on a serialized image."""
    found: dict[str, Any] = {}

    def const(v: Any) -> Any:
        return v.get("constantValue") if isinstance(v, dict) else None

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            args = node.get("arguments")
            if isinstance(args, dict) and "key" in args and "value" in args:
                k = const(args["key"])
                if isinstance(k, str) and k.startswith("gum_"):
                    found[k] = const(args["value"])
            cv = node.get("constantValue")
            if isinstance(cv, str) and cv == MARKER_COUNTS:
                found[MARKER_COUNTS] = True
            if isinstance(cv, dict) and MARKER_COUNTS in cv:
                found[MARKER_COUNTS] = True
            for key, v in node.items():
                if key == MARKER_COUNTS:
                    found[MARKER_COUNTS] = True
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(expression)
    return found


class _HTTPError(Exception):
    def __init__(self, code: int, message: str, status: str) -> None:
        super().__init__(message)
        self.code, self.message, self.status = code, message, status


def grid_geobox(grid: dict[str, Any]) -> GeoBox:
    """A REST ``PixelGrid`` as an odc-geo GeoBox."""
    try:
        dims = grid["dimensions"]
        w, h = int(dims["width"]), int(dims["height"])
        t = grid["affineTransform"]
        aff = Affine(
            float(t.get("scaleX", 1.0)), float(t.get("shearX", 0.0)), float(t.get("translateX", 0.0)),
            float(t.get("shearY", 0.0)), float(t.get("scaleY", 1.0)), float(t.get("translateY", 0.0)),
        )
        crs = grid.get("crsCode") or grid.get("crsWkt")
        if not crs:
            raise KeyError("crsCode")
    except (KeyError, TypeError, ValueError) as exc:
        raise _HTTPError(400, f"Invalid grid: {exc}", "INVALID_ARGUMENT") from None
    return GeoBox((h, w), aff, crs)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Server"

    def log_message(self, fmt: str, *args: Any) -> None:  # quiet
        pass

    # -- plumbing --------------------------------------------------------------------------------
    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, code: int, body: bytes, ctype: str = "application/json", truncate: bool = False) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        if truncate:
            self.send_header("Connection", "close")
        self.end_headers()
        if truncate:
            self.wfile.write(body[: max(1, len(body) // 2)])
            self.wfile.flush()
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        self.wfile.write(body)

    def _json(self, code: int, obj: Any) -> None:
        self._send(code, json.dumps(obj).encode())

    def _error(self, e: _HTTPError) -> None:
        self._json(e.code, {"error": {"code": e.code, "message": e.message, "status": e.status}})

    def _count(self, route: str) -> None:
        st = self.server.stats
        with st.lock:
            st.requests += 1
            st.routes[route] = st.routes.get(route, 0) + 1

    # -- routing ---------------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:  # noqa: N802
        self._dispatch("PATCH")

    def _dispatch(self, method: str) -> None:
        self._t_arrival = time.monotonic()  # the request line and headers are in
        url = urllib.parse.urlsplit(self.path)
        path, query = url.path, urllib.parse.parse_qs(url.query)
        body = self._body() if method in ("POST", "PATCH") else b""
        try:
            if method == "GET" and path == "/$discovery/rest":
                self._count("discovery")
                version = query.get("version", ["v1"])[0]
                return self._send(200, _discovery(self.server.root, version))
            if path == "/token" and method == "POST":
                self._count("token")
                token = {"access_token": "emulator-token", "expires_in": 3600, "token_type": "Bearer"}
                return self._json(200, token)
            if path.startswith("/_emulator/"):
                return self._control(method, path, body)
            parts = path.strip("/").split("/")
            if len(parts) >= 4 and parts[1] == "projects":
                tail = "/".join(parts[3:])
                if method == "GET" and tail == "algorithms":
                    self._count("algorithms")
                    return self._send(200, self.server.algorithms)
                if method == "POST" and tail == "image:computePixels":
                    self._count("computePixels")
                    return self._compute_pixels(body)
                if method == "POST" and tail == "value:compute":
                    self._count("value:compute")
                    return self._compute_value(body)
            if any(m == method and rx.match(path) for m, rx in self.server.routes_for(path)):
                self._count("not-implemented")
                raise _HTTPError(
                    501, f"{method} {path} is not implemented by the gum-ray Earth Engine emulator", "UNIMPLEMENTED"
                )
            self._count("unknown")
            raise _HTTPError(404, f"Unknown path {path}", "NOT_FOUND")
        except _HTTPError as e:
            self._error(e)
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as e:  # noqa: BLE001 - an emulator bug must not kill the client silently
            self._error(_HTTPError(500, f"emulator error: {type(e).__name__}: {e}", "INTERNAL"))

    def _control(self, method: str, path: str, body: bytes) -> None:
        srv = self.server
        if path == "/_emulator/stats" and method == "GET":
            return self._json(200, srv.stats.snapshot())
        if path == "/_emulator/faults" and method == "POST":
            srv.set_faults(**json.loads(body or b"{}"))
            return self._json(200, dataclasses.asdict(srv.faults))
        if path == "/_emulator/reset" and method == "POST":
            srv.stats.reset()
            return self._json(200, {"ok": True})
        raise _HTTPError(404, f"Unknown control path {path}", "NOT_FOUND")

    # -- the API ---------------------------------------------------------------------------------
    def _compute_value(self, body: bytes) -> None:
        req = json.loads(body or b"{}")
        markers = find_markers(req.get("expression"))
        if MARKER_COUNTS not in markers:
            raise _HTTPError(501, "value:compute is only emulated for gum-ray's image counts", "UNIMPLEMENTED")
        return self._json(200, {"result": {MARKER_COUNTS: 1, "s2": 71, "s1_ascending": 31, "s1_descending": 30}})

    def _compute_pixels(self, body: bytes) -> None:
        srv = self.server
        st = srv.stats
        t_start = getattr(self, "_t_arrival", None) or time.monotonic()
        with st.lock:
            st.compute_pixels += 1
            st.in_flight += 1
            st.max_in_flight = max(st.max_in_flight, st.in_flight)
        try:
            self._compute_pixels_inner(body, t_start)
        finally:
            with st.lock:
                st.in_flight -= 1
                if st.record_intervals:
                    st.intervals.append((t_start - st.t0, time.monotonic() - st.t0))

    def _fault(self, name: str) -> None:
        st = self.server.stats
        with st.lock:
            st.faults[name] = st.faults.get(name, 0) + 1

    def _compute_pixels_inner(self, body: bytes, t_start: float) -> None:
        srv = self.server
        f = srv.faults
        req = json.loads(body or b"{}")
        if req.get("fileFormat") not in ("NPY", None):
            raise _HTTPError(
                400, f"The emulator only serves fileFormat NPY, not {req.get('fileFormat')}", "INVALID_ARGUMENT"
            )
        markers = find_markers(req.get("expression"))
        modality = markers.get(MARKER_MODALITY)
        encoding = markers.get(MARKER_ENCODING) or "compact"
        year = markers.get(MARKER_YEAR)
        if modality not in MODALITY_SLICES or encoding not in ENCODINGS or not isinstance(year, (int, float)):
            raise _HTTPError(
                400,
                "The gum-ray emulator needs an image with gum_modality, gum_year and gum_encoding properties "
                f"(found {markers})",
                "INVALID_ARGUMENT",
            )
        codes = ENCODINGS[encoding][modality]
        band_ids = req.get("bandIds")
        if band_ids:
            codes = tuple(c for c in codes if c.name in band_ids)
        gb = grid_geobox(req.get("grid") or {})
        h, w = gb.shape
        if w > MAX_GRID_SIDE or h > MAX_GRID_SIDE:
            self._fault("grid_too_large")
            msg = f"Pixel grid dimensions ({w}x{h}) must be less than or equal to {MAX_GRID_SIDE}."
            raise _HTTPError(400, msg, "INVALID_ARGUMENT")
        size = w * h * request_bytes_per_pixel(codes)
        if size > f.max_request_bytes:
            self._fault("oversize")
            msg = f"Total request size ({size} bytes) must be less than or equal to {f.max_request_bytes} bytes."
            raise _HTTPError(400, msg, "INVALID_ARGUMENT")
        if f.memory_limit_pixels is not None and w * h > f.memory_limit_pixels:
            self._fault("memory")
            raise _HTTPError(400, "User memory limit exceeded.", "INVALID_ARGUMENT")
        with srv.rng_lock:
            u = srv.rng.random()
            u_trunc = srv.rng.random()
            jitter = srv.rng.random()
        latency = f.latency_s + f.latency_jitter_s * jitter
        if u < f.rate_429:
            self._fault("429")
            raise _HTTPError(429, QUOTA_429_MESSAGES[int(u * 1e6) % 2], "RESOURCE_EXHAUSTED")
        if f.timeout_pixels is not None and w * h > f.timeout_pixels:
            self._fault("timeout")
            time.sleep(min(latency, 5.0))
            raise _HTTPError(400, "Computation timed out.", "INVALID_ARGUMENT")
        if u < f.rate_429 + f.rate_5xx:
            time.sleep(latency)
            if int(u * 1e6) % 2:
                self._fault("500")
                raise _HTTPError(500, "An internal error has occurred.", "INTERNAL")
            self._fault("503")
            raise _HTTPError(503, "The service is currently unavailable.", "UNAVAILABLE")
        imagery, _ = synthetic.render(
            gb, int(year), with_products=(modality == "products"), modalities_wanted=[modality]
        )
        values = imagery.export[MODALITY_SLICES[modality]]
        if band_ids:
            keep = [k for k, c in enumerate(ENCODINGS[encoding][modality]) if c.name in band_ids]
            values = values[keep]
        arr = encode_numpy(values, codes)
        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=False)
        payload = buf.getvalue()
        rest = latency - (time.monotonic() - t_start)
        if rest > 0:
            time.sleep(rest)
        truncate = u_trunc < f.rate_truncate
        if truncate:
            self._fault("truncated")
        else:
            st = srv.stats
            with st.lock:
                st.compute_pixels_ok += 1
                st.bytes_sent += len(payload)
                st.pixels_sent += w * h
        self._send(200, payload, ctype="application/octet-stream", truncate=truncate)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 512

    def __init__(self, addr: tuple[str, int], faults: Faults, record_intervals: bool) -> None:
        super().__init__(addr, _Handler)
        self.faults = faults
        self.stats = _Stats(record_intervals)
        self.rng = random.Random(faults.seed)
        self.rng_lock = threading.Lock()
        self.algorithms = _ee_resource("algorithms.json")
        host, port = self.server_address[:2]
        self.root = f"http://{host}:{port}"
        self._routes: dict[str, list] = {}

    def routes_for(self, path: str) -> list:
        version = path.strip("/").split("/")[0] if path.strip("/") else "v1"
        if version not in self._routes:
            self._routes[version] = _declared_routes(version)
        return self._routes[version]

    def set_faults(self, **kw: Any) -> None:
        unknown = set(kw) - {f.name for f in dataclasses.fields(Faults)}
        if unknown:
            raise _HTTPError(400, f"unknown fault settings {sorted(unknown)}", "INVALID_ARGUMENT")
        for k, v in kw.items():
            setattr(self.faults, k, v)
        if "seed" in kw:
            with self.rng_lock:
                self.rng = random.Random(kw["seed"])


class EEEmulator:
    """An emulator running in this process (a thread). Use :func:`start_emulator`.

    ``url`` is what to give ``ee.Initialize(url=...)``; ``stats()`` returns counters including
    ``max_in_flight`` (the most ``computePixels`` requests served at once); ``stop()`` shuts it down.
    A watchdog stops it after ``max_seconds`` whatever happens.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, faults: Faults | None = None,
                 record_intervals: bool = False, max_seconds: float = 3600.0) -> None:
        self._server = _Server((host, port), faults or Faults(), record_intervals)
        self.url = self._server.root
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="ee-emulator", daemon=True)
        self._watchdog = threading.Timer(max_seconds, self.stop)
        self._watchdog.daemon = True
        self._stopped = False

    def start(self) -> "EEEmulator":
        self._thread.start()
        self._watchdog.start()
        return self

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._watchdog.cancel()
        self._server.shutdown()
        self._server.server_close()

    @property
    def faults(self) -> Faults:
        return self._server.faults

    def set_faults(self, **kw: Any) -> None:
        self._server.set_faults(**kw)

    def stats(self) -> dict[str, Any]:
        return self._server.stats.snapshot()

    def reset_stats(self) -> None:
        self._server.stats.reset()

    def __enter__(self) -> "EEEmulator":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def start_emulator(*, host: str = "127.0.0.1", port: int = 0, faults: Faults | None = None,
                   record_intervals: bool = False, max_seconds: float = 3600.0, **fault_kw: Any) -> EEEmulator:
    """Start an emulator on loopback in a background thread; returns it started.

    Fault settings may be given as a :class:`Faults` or as keywords (``rate_429=0.3, latency_s=1``).
    """
    faults = dataclasses.replace(faults or Faults(), **fault_kw)
    return EEEmulator(host, port, faults, record_intervals, max_seconds).start()


class EmulatorProcess:
    """An emulator in a child process (no GIL shared with the client: for benchmarks)."""

    def __init__(self, url: str, proc: subprocess.Popen) -> None:
        self.url = url
        self._proc = proc

    def _call(self, method: str, path: str, obj: Any = None) -> Any:
        data = json.dumps(obj).encode() if obj is not None else (b"{}" if method == "POST" else None)
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def stats(self) -> dict[str, Any]:
        return self._call("GET", "/_emulator/stats")

    def set_faults(self, **kw: Any) -> None:
        self._call("POST", "/_emulator/faults", kw)

    def reset_stats(self) -> None:
        self._call("POST", "/_emulator/reset")

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)

    def __enter__(self) -> "EmulatorProcess":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def start_emulator_process(*, max_seconds: float = 3600.0, record_intervals: bool = False,
                           **fault_kw: Any) -> EmulatorProcess:
    """Start an emulator in a child Python process; returns once it listens."""
    faults = dataclasses.asdict(dataclasses.replace(Faults(), **fault_kw))
    cmd = [sys.executable, "-m", "gum_ray.sources.ee_emulator", "--port", "0", "--max-seconds", str(max_seconds),
           "--faults-json", json.dumps(faults)]
    if record_intervals:
        cmd.append("--record-intervals")
    env = dict(os.environ)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline() if proc.stdout else ""
    if not line.startswith("EE_EMULATOR_URL "):
        proc.kill()
        raise RuntimeError(f"the emulator process did not start (said {line!r})")
    return EmulatorProcess(line.split()[1], proc)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="A loopback Earth Engine emulator backed by gum-ray's synthetic world.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    p.add_argument("--rate-429", type=float, default=0.0)
    p.add_argument("--rate-5xx", type=float, default=0.0)
    p.add_argument("--rate-truncate", type=float, default=0.0)
    p.add_argument("--latency", type=float, default=0.0, help="seconds per computePixels request")
    p.add_argument("--latency-jitter", type=float, default=0.0)
    p.add_argument("--max-request-bytes", type=int, default=MAX_REQUEST_BYTES)
    p.add_argument("--memory-limit-pixels", type=int, default=None)
    p.add_argument("--timeout-pixels", type=int, default=None)
    p.add_argument("--faults-json", default=None, help="all fault settings as JSON (overrides the flags)")
    p.add_argument("--record-intervals", action="store_true")
    p.add_argument("--max-seconds", type=float, default=3600.0, help="stop after this long (default 1 h)")
    a = p.parse_args(argv)
    if a.faults_json:
        faults = Faults(**json.loads(a.faults_json))
    else:
        faults = Faults(a.rate_429, a.rate_5xx, a.rate_truncate, a.latency, a.latency_jitter,
                        a.max_request_bytes, a.memory_limit_pixels, a.timeout_pixels)
    emu = EEEmulator(a.host, a.port, faults, a.record_intervals, a.max_seconds).start()
    print(f"EE_EMULATOR_URL {emu.url}", flush=True)
    print(f"ee.Initialize(project='gum-emulator', credentials=None, url='{emu.url}')", file=sys.stderr, flush=True)
    try:
        emu._thread.join(a.max_seconds + 5)
    except KeyboardInterrupt:
        pass
    finally:
        emu.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
