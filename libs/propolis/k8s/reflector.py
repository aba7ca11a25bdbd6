"""List+watch one Kubernetes kind with real watch discipline, through kubernetes-asyncio.

Resume from the last resourceVersion; ask for bookmarks; on ``410 Gone``
relist; on a broken connection reconnect with back-off and resume. A relist
hands the sink the complete set, so deletes missed while disconnected are
found. Lists are paged (``limit``/``continue``, 500 a page like client-go), so
only one page of raw JSON is in memory at a time: a 10,000-pod list parsed at
once left the watcher ~30 MB bigger for good (freed objects fragment the heap). Objects are read as raw
JSON (orjson) rather than typed models: CRDs have none, and the sink keeps only a few fields anyway (so `k8s.kubeclient`
imports kubernetes-asyncio without its generated models).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, Protocol

import aiohttp
import orjson

from propolis.k8s.kinds import Kind
from propolis.k8s.kubeclient import ApiClient, ApiException
from propolis.model.types import ResourceVersion

log = logging.getLogger("propolis.k8s.reflector")


class Gone(Exception):
    """The API compacted past our resourceVersion, or is behind it (a new store): relist."""


def _too_large_resource_version(status: dict[str, Any]) -> bool:
    """kube-apiserver's answer to a watch from a resourceVersion it has not reached (client-go relists)."""
    causes = (status.get("details") or {}).get("causes") or []
    return any(c.get("reason") == "ResourceVersionTooLarge" for c in causes) or \
        "Too large resource version" in str(status.get("message", ""))


LIST_PAGE_SIZE = 500
#: The longest watch event line read. A real API server sends objects up to etcd's request limit (1.5 MiB by
#: default; clusters raise it) wrapped in an event; aiohttp's readline (bounded by its read buffer, 4 MiB
#: here) let one 15 MB annotation kill the reflector. A longer line is not parsed: the kind is listed again.
MAX_WATCH_EVENT_BYTES = 64 * 1024 * 1024


class EventTooLarge(Exception):
    """A watch event line over MAX_WATCH_EVENT_BYTES: relist (a list reads whole pages, no line bound)."""


class EventLines:
    """Newline-delimited watch events with our own bound (aiohttp's readline limit is its buffer size,
    and older versions take no limit); each byte is scanned once, however long the line."""

    def __init__(self, content: Any, limit: int) -> None:
        self.content, self.limit = content, limit
        self.buf = bytearray()
        self.scanned = 0

    async def next(self) -> bytes:
        """The next line with its newline; what is left at the end of the stream; b"" at the end."""
        while True:
            end = self.buf.find(b"\n", self.scanned)
            if end >= 0:
                line = bytes(self.buf[:end + 1])
                del self.buf[:end + 1]
                self.scanned = 0
                return line
            self.scanned = len(self.buf)
            if self.scanned > self.limit:
                raise EventTooLarge(f"watch event over {self.limit} bytes")
            chunk = await self.content.readany()
            if not chunk:
                line, self.buf = bytes(self.buf), bytearray()
                return line
            self.buf += chunk


class Sink(Protocol):
    async def replace(self, kind: Kind, pages: AsyncIterator[list[dict[str, Any]]]) -> None:
        """The complete set, page by page; only after the last page may what is absent be pruned."""
    async def apply(self, kind: Kind, event_type: str, obj: dict[str, Any]) -> None: ...
    def progress(self, kind: Kind, resource_version: str) -> None: ...
    def resource_version_regressed(self, kind: Kind, previous: ResourceVersion, current: ResourceVersion) -> None:
        """A list or watch event is behind what this reflector saw: the API serves another store.
        Called before anything from that list or event reaches the sink."""


class Reflector:
    def __init__(self, api: ApiClient, kind: Kind, sink: Sink, *, watch_timeout: int = 300,
                 backoff_max: float = 5.0, page_size: int = LIST_PAGE_SIZE) -> None:
        self.api = api
        self.kind = kind
        self.sink = sink
        self.watch_timeout = watch_timeout
        self.backoff_max = backoff_max
        self.page_size = page_size
        self.resource_version: str | None = None
        self.synced = asyncio.Event()
        self.relists = 0
        self.error = ""
        self.highest_resource_version = ResourceVersion(0)  # the newest this reflector saw (a store never goes back)
        self.list_started_at = 0.0  # monotonic times of the last list (see relist)
        self.list_finished_at = 0.0
        self._relist_requested = False
        self._watch_response: Any = None
        self._watch_closed_by_relist = False

    async def run(self) -> None:
        delay = 0.1
        while True:
            try:
                if self.resource_version is None or self._relist_requested:
                    self._relist_requested = False
                    await self._list()
                if self._relist_requested:
                    continue
                await self._watch()
                delay = 0.1
                self.error = ""
            except Gone:
                log.info("%s: resourceVersion %s expired (410 Gone); relisting", self.kind.plural,
                         self.resource_version)
                self.resource_version = None
            except EventTooLarge as exc:  # one oversized object: never a dead reflector (lists read whole pages)
                self.error = f"{exc} after resourceVersion {self.resource_version}: relisted"
                log.error("%s: %s", self.kind.plural, self.error)
                self._relist_requested = True
            except (TimeoutError, ApiException, aiohttp.ClientError, OSError, ValueError) as exc:
                if self._watch_closed_by_relist:
                    self._watch_closed_by_relist = False
                    continue
                status = getattr(exc, "status", None)
                if status == 410 or "Too large resource version" in str(getattr(exc, "body", "") or ""):
                    self.resource_version = None
                    continue
                self.error = f"{type(exc).__name__}: {getattr(exc, 'reason', None) or exc}"
                log.warning("%s: %s; retrying in %.1fs", self.kind.plural, self.error, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.backoff_max)

    def relist(self) -> None:
        """List again now (a new API store): ends the current watch; the run loop lists next."""
        self._relist_requested = True
        if self._watch_response is not None:
            self._watch_closed_by_relist = True
            self._watch_response.close()

    async def api_resource_version(self) -> ResourceVersion:
        """The API's current resourceVersion (a one-item list: a consistent read, as etcd's revision)."""
        resp = await self._request([("limit", 1)], 10)
        body = orjson.loads(await resp.read())
        return ResourceVersion(int((body.get("metadata") or {}).get("resourceVersion") or 0))

    def _observe(self, resource_version: str) -> None:
        try:
            value = ResourceVersion(int(resource_version))
        except ValueError:
            return
        if value < self.highest_resource_version:
            log.error("%s: resourceVersion went back from %d to %d", self.kind.plural,
                      self.highest_resource_version, value)
            self.sink.resource_version_regressed(self.kind, self.highest_resource_version, value)
        self.highest_resource_version = value

    async def _request(self, query: list[tuple[str, Any]], timeout: float | None) -> Any:
        return await self.api.call_api(
            self.kind.list_path(), "GET", query_params=query, auth_settings=["BearerToken"],
            _preload_content=False, _return_http_data_only=True,
            _request_timeout=timeout)

    async def _list(self) -> None:
        listed_rv = ""
        self.list_started_at = time.monotonic()
        self._watch_closed_by_relist = False

        async def pages() -> AsyncIterator[list[dict[str, Any]]]:
            nonlocal listed_rv
            token = ""
            while True:
                query: list[tuple[str, Any]] = [("limit", self.page_size)]
                if token:
                    query.append(("continue", token))
                resp = await self._request(query, 30)
                body = orjson.loads(await resp.read())
                meta = body.get("metadata") or {}
                if not listed_rv:
                    listed_rv = str(meta.get("resourceVersion", ""))  # the first page's: the list's
                    self._observe(listed_rv)
                yield body.pop("items", None) or []
                token = meta.get("continue") or ""
                if not token:
                    return

        await self.sink.replace(self.kind, pages())
        self.resource_version = listed_rv
        self.relists += 1
        self.sink.progress(self.kind, listed_rv)
        self.list_finished_at = time.monotonic()
        self.synced.set()

    async def _watch(self) -> None:
        query = [("watch", "true"), ("allowWatchBookmarks", "true"),
                 ("resourceVersion", self.resource_version), ("timeoutSeconds", self.watch_timeout)]
        resp = await self._request(query, self.watch_timeout + 30)
        self._watch_response = resp
        lines = EventLines(resp.content, MAX_WATCH_EVENT_BYTES)
        try:
            while not self._relist_requested:
                line = await lines.next()
                if not line:
                    return  # server closed the watch (timeout): resume from resource_version
                if not line.strip():
                    continue
                event = orjson.loads(line)
                etype, obj = event.get("type"), event.get("object") or {}
                if etype == "ERROR":
                    if obj.get("code") == 410 or _too_large_resource_version(obj):
                        raise Gone()  # relist; a list behind what we saw is then reported as a store reset
                    raise ApiException(status=obj.get("code"), reason=obj.get("message"))
                rv = str((obj.get("metadata") or {}).get("resourceVersion", ""))
                if rv:
                    self._observe(rv)
                if etype != "BOOKMARK":
                    await self.sink.apply(self.kind, etype, obj)
                if rv:
                    self.resource_version = rv
                    self.sink.progress(self.kind, rv)
        finally:
            self._watch_response = None
            resp.release()
