"""JetStream KV with the list+watch contract: initial values, then SYNCED, then updates.

`Kv.watch()` yields `KvEvent`s. After the initial values it yields one SYNCED
event: only then may a consumer prune what it holds that KV does not (a
restarting writer never deletes live kernel state before its inputs caught
up). When the connection comes back after an outage the watch is re-created
and diffed against what it already delivered, so a consumer sees exactly the
puts and deletes it missed — no lost delete, no stale value — followed by a
fresh SYNCED.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AsyncIterator

import nats
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from propolis.bus import codec
from propolis.errors import PermanentError, TemporaryError

if TYPE_CHECKING:
    from propolis.bus.connection import Bus

log = logging.getLogger("propolis.bus.kv")


class Conflict(TemporaryError):
    """A compare-and-set lost: somebody else wrote first. Re-read and retry."""


class EventType(enum.Enum):
    PUT = "put"
    DELETE = "delete"
    SYNCED = "synced"


@dataclass(frozen=True)
class Entry:
    key: str
    value: Any
    revision: int


@dataclass(frozen=True)
class KvEvent:
    type: EventType
    key: str = ""
    value: Any = None
    revision: int = 0


SYNCED = KvEvent(EventType.SYNCED)


class Kv:
    """One bucket; values are codec messages (``raw=True`` methods for bytes)."""

    def __init__(self, bus: "Bus", bucket: str, store: KeyValue) -> None:
        self.bus = bus
        self.bucket = bucket
        self.store = store

    async def get(self, key: str) -> Entry | None:
        try:
            e = await self.store.get(key)
        except nats.js.errors.KeyNotFoundError:
            return None
        if e.value is None or e.operation in (KV_DEL, KV_PURGE):
            return None
        return Entry(key, codec.decode(e.value), e.revision or 0)

    async def put(self, key: str, value: Any) -> int:
        return await self.store.put(key, codec.encode(value))

    async def create(self, key: str, value: Any) -> int:
        """Write only if absent (also after a delete); raises Conflict if present."""
        try:
            return await self.store.create(key, codec.encode(value))
        except nats.js.errors.KeyWrongLastSequenceError as exc:
            raise Conflict(f"{self.bucket}/{key} exists") from exc

    async def update(self, key: str, value: Any, revision: int) -> int:
        """Compare-and-set against ``revision``; raises Conflict when it moved."""
        try:
            return await self.store.update(key, codec.encode(value), last=revision)
        except nats.js.errors.KeyWrongLastSequenceError as exc:
            raise Conflict(f"{self.bucket}/{key} changed since revision {revision}") from exc

    async def delete(self, key: str, revision: int | None = None) -> None:
        """Delete; a missing key is success. With ``revision``: only if unchanged."""
        try:
            await self.store.delete(key, last=revision)
        except nats.js.errors.KeyWrongLastSequenceError as exc:
            raise Conflict(f"{self.bucket}/{key} changed since revision {revision}") from exc

    async def items(self, keys: str = ">") -> dict[str, Entry]:
        """A snapshot of the bucket (the initial values of a watch)."""
        out: dict[str, Entry] = {}
        async for ev in self.watch(keys):
            if ev.type is EventType.SYNCED:
                return out
            if ev.type is EventType.PUT:
                out[ev.key] = Entry(ev.key, ev.value, ev.revision)
        return out

    async def watch(self, keys: str = ">", *, follow: bool = True) -> AsyncIterator[KvEvent]:
        """Initial values, SYNCED, then updates; survives reconnects (see module doc)."""
        delivered: dict[str, int] = {}  # key -> revision the consumer has seen
        reconnected = asyncio.Event()
        self.bus.on_reconnect(reconnected.set)
        while True:
            reconnected.clear()
            try:
                watcher = await self.store.watch(keys)
            except (nats.errors.Error, asyncio.TimeoutError) as exc:
                log.warning("watch %s/%s: %s; retrying", self.bucket, keys, exc)
                await asyncio.sleep(0.5)
                continue
            seen: set[str] = set()
            initial = True
            try:
                while True:
                    entry = await self._next(watcher, reconnected)
                    if entry is _RECONNECTED:
                        break
                    if entry is None:  # end of initial values
                        if initial:
                            initial = False
                            for gone in [k for k in delivered if k not in seen]:
                                del delivered[gone]
                                yield KvEvent(EventType.DELETE, gone)
                            yield SYNCED
                            if not follow:
                                return
                        continue
                    key = entry.key
                    rev = entry.revision or 0
                    if initial:
                        seen.add(key)
                    if entry.operation in (KV_DEL, KV_PURGE) or entry.value is None:
                        if delivered.pop(key, None) is not None:
                            yield KvEvent(EventType.DELETE, key, None, rev)
                        continue
                    if delivered.get(key) == rev:
                        continue
                    try:
                        value = codec.decode(entry.value)
                    except PermanentError as exc:
                        log.error("KV %s/%s revision %d unreadable, keeping last good value: %s",
                                  self.bucket, key, rev, exc)
                        continue
                    delivered[key] = rev
                    yield KvEvent(EventType.PUT, key, value, rev)
            finally:
                try:
                    await watcher.stop()
                except Exception:
                    pass
            log.info("watch %s/%s: re-syncing after reconnect", self.bucket, keys)

    @staticmethod
    async def _next(watcher: Any, reconnected: asyncio.Event) -> Any:
        get = asyncio.ensure_future(watcher._updates.get())
        rec = asyncio.ensure_future(reconnected.wait())
        try:
            done, _ = await asyncio.wait({get, rec}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            rec.cancel()
        if get in done:
            return get.result()
        get.cancel()
        return _RECONNECTED


_RECONNECTED = object()
