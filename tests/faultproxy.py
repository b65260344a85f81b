"""A fault-injecting HTTP proxy in front of fake-gcs-server, for the store's own retries.

Every request is forwarded to the upstream emulator, except that at ``rate`` (0..1) a request is
answered with one of the faults, chosen at random: a 503 (``error``), a connection closed without a
response (``reset``; after the upstream has or has not seen the request, half each: a write whose
answer is lost), or a slow answer (``slow``, ``slow_s`` seconds before it is forwarded). The proxy runs
on its own thread and event loop; point ``STORAGE_EMULATOR_HOST`` at :attr:`FaultProxy.url`.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections import Counter

from tests.gcs import free_port

HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding",
               "host", "upgrade", "proxy-connection", "te", "trailer"}


class FaultProxy:
    def __init__(self, upstream: str, rate: float = 0.1, *, faults=("error", "reset", "slow"),
                 slow_s: float = 1.5, seed: int | None = None) -> None:
        self.upstream = upstream.rstrip("/")
        self.rate = rate
        self.faults = tuple(faults)
        self.slow_s = slow_s
        self.rng = random.Random(seed)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.stats: Counter = Counter()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._runner = None

    # ---- the proxy

    async def _handle(self, request):
        from aiohttp import web

        self.stats["requests"] += 1
        body = await request.read()
        fault = self.rng.choice(self.faults) if self.rng.random() < self.rate else None
        if fault == "slow":
            self.stats["slow"] += 1
            await asyncio.sleep(self.slow_s)
        elif fault == "error":
            self.stats["error"] += 1
            return web.json_response({"error": {"code": 503, "message": "injected fault"}}, status=503)
        elif fault == "reset" and self.rng.random() < 0.5:
            self.stats["reset_before"] += 1
            request.transport.close()  # the upstream never sees the request
            raise ConnectionResetError("injected reset")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        async with self._session.request(request.method, self.upstream + request.raw_path,
                                         headers=headers, data=body, allow_redirects=False) as up:
            data = await up.read()
            if fault == "reset":  # the upstream did it; the client never hears
                self.stats["reset_after"] += 1
                request.transport.close()
                raise ConnectionResetError("injected reset")
            out = {k: v.replace(self.upstream, self.url) for k, v in up.headers.items()
                   if k.lower() not in HOP_HEADERS}
            if "json" in up.headers.get("content-type", ""):
                data = data.replace(self.upstream.encode(), self.url.encode())
            return web.Response(status=up.status, headers=out, body=data)

    async def _start(self) -> None:
        import logging

        import aiohttp
        from aiohttp import web

        logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)  # the injected resets
        self._session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    def _main(self) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        self._ready.set()
        self._loop.run_forever()

    def start(self) -> "FaultProxy":
        self._thread = threading.Thread(target=self._main, name="fault-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(20):
            raise RuntimeError("the fault proxy did not start")
        return self

    def stop(self) -> None:
        if self._loop is None:
            return

        async def close():
            await self._runner.cleanup()
            await self._session.close()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop = None

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
