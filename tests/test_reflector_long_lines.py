"""The reflector survives huge watch event lines: a 15 MB annotation (which killed the NetworkPolicy
reflector with aiohttp's LineTooLong 4194304) is read, and a line over the reflector's bound is a
per-object error with a relist, never a dead reflector. A small HTTP server plays the API."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from aiohttp import web

from propolis.k8s import kubeclient
from propolis.k8s import reflector as reflector_mod
from propolis.k8s.kinds import KINDS
from propolis.k8s.reflector import Reflector

KIND = KINDS["networkpolicies"]


def policy(name: str, rv: int, annotation: str = "") -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": "default", "uid": name, "resourceVersion": str(rv)}
    if annotation:
        meta["annotations"] = {"big": annotation}
    return {"metadata": meta, "spec": {"podSelector": {}}}


class FakeApi:
    """Lists `objects`; each watch streams the queued event lines, then holds the connection."""

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Any]] = {"small": policy("small", 1)}
        self.rv = 1
        self.lists = 0
        self.watches: asyncio.Queue[list[bytes]] = asyncio.Queue()
        self.closing = asyncio.Event()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.query.get("watch") != "true":
            self.lists += 1
            return web.Response(body=orjson.dumps({"metadata": {"resourceVersion": str(self.rv)},
                                                   "items": list(self.objects.values())}),
                                content_type="application/json")
        resp = web.StreamResponse()
        await resp.prepare(request)
        for line in await self.watches.get():
            await resp.write(line)
        await self.closing.wait()  # hold the watch open, like a real API server
        return resp

    def event(self, etype: str, obj: dict[str, Any]) -> bytes:
        self.objects[obj["metadata"]["name"]] = obj
        self.rv = int(obj["metadata"]["resourceVersion"])
        return orjson.dumps({"type": etype, "object": obj}) + b"\n"


class Sink:
    def __init__(self) -> None:
        self.applied: list[tuple[str, str, int]] = []  # (event, name, annotation length)
        self.listed: list[set[str]] = []

    async def replace(self, kind: Any, pages: Any) -> None:
        names: set[str] = set()
        async for page in pages:
            names |= {o["metadata"]["name"] for o in page}
        self.listed.append(names)

    async def apply(self, kind: Any, event_type: str, obj: dict[str, Any]) -> None:
        big = (obj["metadata"].get("annotations") or {}).get("big", "")
        self.applied.append((event_type, obj["metadata"]["name"], len(big)))

    def progress(self, kind: Any, resource_version: str) -> None:
        pass

    def resource_version_regressed(self, kind: Any, previous: int, current: int) -> None:
        pass


async def eventually(check: Any, what: str, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


async def run_reflector(api: FakeApi, sink: Sink):  # type: ignore[no-untyped-def]
    app = web.Application()
    app.router.add_get(KIND.list_path(), api.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    conf = kubeclient.Configuration(host=f"http://127.0.0.1:{runner.addresses[0][1]}")
    client = kubeclient.ApiClient(configuration=conf)
    r = Reflector(client, KIND, sink, backoff_max=0.2)
    task = asyncio.create_task(r.run())

    async def stop() -> None:
        task.cancel()
        api.closing.set()
        await asyncio.gather(task, return_exceptions=True)
        await client.close()
        await runner.cleanup()
    return r, task, stop


async def test_a_15_mb_object_in_a_watch_is_read():
    api, sink = FakeApi(), Sink()
    r, task, stop = await run_reflector(api, sink)
    try:
        await api.watches.put([api.event("ADDED", policy("huge", 2, "x" * 15_000_000)),
                               api.event("ADDED", policy("after", 3))])
        await eventually(lambda: len(sink.applied) == 2, "both events")
        assert sink.applied == [("ADDED", "huge", 15_000_000), ("ADDED", "after", 0)]
        assert not task.done() and r.error == ""
    finally:
        await stop()


async def test_a_line_over_the_bound_relists_and_the_reflector_lives_on(monkeypatch):
    monkeypatch.setattr(reflector_mod, "MAX_WATCH_EVENT_BYTES", 1_000_000)
    api, sink = FakeApi(), Sink()
    r, task, stop = await run_reflector(api, sink)
    try:
        await api.watches.put([api.event("ADDED", policy("huge", 2, "x" * 2_000_000))])
        await eventually(lambda: api.lists == 2, "a relist after the over-long line")
        assert sink.listed[-1] == {"small", "huge"}  # the list reads whole pages: the object is not lost
        assert "over 1000000 bytes" in r.error and not task.done()
        await api.watches.put([api.event("ADDED", policy("after", 3))])
        await eventually(lambda: ("ADDED", "after", 0) in sink.applied, "a later event")
        assert not task.done()
    finally:
        await stop()


class Chunks:
    """A response body arriving in the given pieces."""

    def __init__(self, *chunks: bytes) -> None:
        self.chunks = list(chunks)

    async def readany(self) -> bytes:
        return self.chunks.pop(0) if self.chunks else b""


async def test_event_lines_split_across_and_within_chunks():
    lines = reflector_mod.EventLines(Chunks(b'{"a"', b':1}\n{"b":2}\n{"c"', b":3}\n", b"tail"), limit=100)
    assert [await lines.next() for _ in range(5)] == [b'{"a":1}\n', b'{"b":2}\n', b'{"c":3}\n', b"tail", b""]
