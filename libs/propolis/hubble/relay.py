"""hubble-relay's HTTP API: cluster-wide flows as NDJSON streams, status, service map and its UI.

Why HTTP/JSON streaming instead of gRPC: every client here (the CLI, the browser page, curl)
speaks it without generated stubs, and one response line is exactly one GetFlowsResponse in
Hubble's JSON. Endpoints:

* ``POST /api/v1/flows`` body ``{"whitelist": [FlowFilter…], "blacklist": […], "number": N,
  "first": bool, "follow": bool, "since": "…", "until": "…"}`` (``GET`` takes the same as query
  parameters, filters as JSON text) -> ``application/x-ndjson``, one response per line: historic
  answer (merged from every node's ring, by time), then new flows while ``follow``.
* ``GET /api/v1/status`` -> nodes answering, flows held and seen (like `hubble status`).
* ``GET /api/v1/servicemap`` -> ``{"nodes": […], "edges": […]}`` since the relay started.
* ``GET /`` -> the service-map page; ``GET /healthz`` -> alive (what `propolis observe` checks).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from importlib import resources
from typing import Any

import orjson
from aiohttp import web

from propolis.bus.connection import Bus
from propolis.bus.messages import FlowQuery
from propolis.errors import ValidationError
from propolis.hubble.client import BusFlowSource, parse_time
from propolis.hubble.filters import FlowMatcher
from propolis.hubble.flow import rfc3339
from propolis.hubble.servicemap import ServiceMap

log = logging.getLogger("propolis.hubble.relay")


def query_from(doc: dict[str, Any]) -> tuple[FlowQuery, bool]:
    """A request document -> (query, follow); raises ValidationError on bad filters."""
    def flag(name: str) -> bool:
        v = doc.get(name, False)
        return v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes")

    def filters(name: str) -> list[dict[str, Any]]:
        v = doc.get(name) or []
        v = orjson.loads(v) if isinstance(v, str) else v
        return [v] if isinstance(v, dict) else list(v)

    query = FlowQuery(whitelist=filters("whitelist"), blacklist=filters("blacklist"),
                      number=int(doc.get("number") or 0), first=flag("first"),
                      since=parse_time(str(doc.get("since") or "")), until=parse_time(str(doc.get("until") or "")),
                      nodes=list(doc.get("nodes") or []))
    FlowMatcher(query.whitelist, query.blacklist)  # validate before streaming anything
    return query, flag("follow")


class Relay:
    """The relay's state: one bus, the service map fed by a follow of everything."""

    def __init__(self, bus: Bus, *, timeout: float = 3.0) -> None:
        self.bus = bus
        self.source = BusFlowSource(bus, timeout=timeout)
        self.map = ServiceMap()
        self.streams = 0
        self.malformed_flows = 0  # flows the service map could not read (logged once, then counted)

    async def feed_map(self) -> None:
        """Run forever: the service map starts with the rings' contents, then follows. A malformed flow
        (an observer's bug, a forged message) is skipped and counted: it never ends the map."""
        async for resp in self.source.stream(FlowQuery(since=rfc3339(0)), follow=True):
            if "flow" not in resp:
                continue
            try:
                self.map.add(resp["flow"])
            except Exception as exc:  # noqa: BLE001 - one bad flow, not a dead map
                self.malformed_flows += 1
                if self.malformed_flows == 1:
                    log.warning("service map skips malformed flows (counted in /healthz); first: %r: %s",
                                str(resp["flow"])[:200], exc)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/api/v1/flows", self.flows)
        app.router.add_get("/api/v1/flows", self.flows)
        app.router.add_get("/api/v1/status", self.status)
        app.router.add_get("/api/v1/servicemap", self.servicemap)
        app.router.add_get("/", self.ui)
        app.router.add_get("/healthz", self.healthz)
        return app

    async def healthz(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "alive", "follow_streams": self.streams,
                                  "malformed_flows": self.malformed_flows})

    async def flows(self, request: web.Request) -> web.StreamResponse:
        try:
            doc = await request.json() if request.method == "POST" and request.can_read_body else dict(request.query)
            query, follow = query_from(doc)
        except (ValidationError, ValueError, TypeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        if not follow and not (query.number or query.since or query.until):
            query.number = 20  # hubble observe's default: the last 20
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        self.streams += 1
        try:
            async for item in self.source.stream(query, follow=follow):
                await resp.write(orjson.dumps(item) + b"\n")
        except (ConnectionResetError, asyncio.CancelledError):
            pass  # the client went away
        finally:
            self.streams -= 1
        with contextlib.suppress(ConnectionResetError):
            await resp.write_eof()
        return resp

    async def status(self, _: web.Request) -> web.Response:
        await self.source.historic(FlowQuery(number=1))
        st = self.source.last_status
        return web.json_response({"num_flows": st.get("num_flows", 0), "max_flows": st.get("max_flows", 0),
                                  "seen_flows": st.get("seen_flows", 0),
                                  "num_connected_nodes": len(st.get("nodes", [])),
                                  "num_unavailable_nodes": len(st.get("unavailable", [])),
                                  "connected_nodes": st.get("nodes", []),
                                  "unavailable_nodes": st.get("unavailable", []),
                                  "nodes": st.get("per_node", [])})

    async def servicemap(self, _: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(self.map.snapshot()), content_type="application/json")

    async def ui(self, _: web.Request) -> web.Response:
        page = resources.files("propolis.hubble").joinpath("ui.html").read_text()
        return web.Response(text=page, content_type="text/html")


async def start_relay(bus: Bus, host: str = "127.0.0.1", port: int = 4245, *,
                      timeout: float = 3.0) -> tuple[Relay, web.AppRunner, str, asyncio.Task[None]]:
    """Serve the relay; returns it, its runner (cleanup), its base URL and the service-map task."""
    relay = Relay(bus, timeout=timeout)
    # follow streams end when their client goes away (cancellation), and a stop waits for them briefly
    runner = web.AppRunner(relay.app(), access_log=None, handler_cancellation=True, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0][1]
    task = asyncio.create_task(relay.feed_map(), name="hubble-relay:servicemap")
    return relay, runner, f"http://{host}:{bound}", task
