"""JetStream KV with the list+watch contract: initial values, then SYNCED, then updates.

`Kv.watch()` yields `KvEvent`s. After the initial values it yields one SYNCED
event: only then may a consumer prune what it holds that KV does not (a
restarting writer never deletes live kernel state before its inputs caught
up). When the connection comes back and the server still has the watch's
consumer, the watch keeps it (nats-py's ordered consumer resumes after the last
sequence it delivered: no re-sync of the whole bucket). When the consumer is
gone (the server restarted) or the bucket was re-created, the watch is created
anew, after a random delay and under a per-process cap on concurrent starts,
and diffed against what it already delivered, so a consumer sees exactly the
puts and deletes it missed — no lost delete, no stale value — followed by a
fresh SYNCED.

A watch takes one key filter or several (``kv.watch([subjects.node_pods_keys(node), "services.>"])``):
several are served by ONE consumer (nats-server >= 2.10 ``filter_subjects``) with the same guarantees, so a
node-scoped service receives only the keys it reads. The filters must not overlap (the server refuses it).

Poison (a value that does not decode, or decodes with wrong field types) is a
per-key error, never a dead watch: the watch skips it, so the consumer keeps
the key's last good value; it is logged once per key, counted in
``propolis_bus_undecodable_values_total{bucket}`` and shown in the service's
health (`UNDECODABLE`) until the key gets a good value or is deleted. `get`
reads poison as absent and `create` replaces it, so an owner repairs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
import weakref
from collections import Counter
from collections.abc import AsyncGenerator, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast

import nats
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from propolis.bus import codec, subjects
from propolis.errors import PermanentError, TemporaryError, ValidationError

if TYPE_CHECKING:
    from propolis.bus.connection import Bus

log = logging.getLogger("propolis.bus.kv")


#: how long a watch waits for messages the server had delivered before its initial values count as complete
INITIAL_CATCH_UP_S = 5.0

#: how often a watch checks that its bucket is still the one it started on (one stream-info request)
STREAM_CHECK_INTERVAL_S = 5.0


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
    purged: bool = False  # a DELETE by purge (an operator's tool; owners delete): see bus/watermark.py


SYNCED = KvEvent(EventType.SYNCED)


class UndecodableValues:
    """Which KV values this process refused, per bucket and key (process-wide, like a metric)."""

    def __init__(self) -> None:
        self.total: Counter[str] = Counter()  # bucket -> poisoned revisions seen
        self.current: dict[tuple[str, str], tuple[int, str]] = {}  # (bucket, key) -> (revision, reason)

    def refused(self, bucket: str, key: str, revision: int, reason: str) -> None:
        known = self.current.get((bucket, key))
        if known is not None and known[0] == revision:
            return  # another watch (or a re-sync) met the same revision: already counted
        self.current[(bucket, key)] = (revision, reason)
        self.total[bucket] += 1
        if known is None:
            log.error("KV %s/%s revision %d undecodable, keeping its last good value: %s",
                      bucket, key, revision, reason)

    def healed(self, bucket: str, key: str) -> None:
        if self.current.pop((bucket, key), None) is not None:
            log.info("KV %s/%s readable again", bucket, key)

    def summary(self) -> str:
        """One line for health, empty when nothing is poisoned now."""
        if not self.current:
            return ""
        (bucket, key), (_, reason) = next(iter(self.current.items()))
        return (f"{len(self.current)} undecodable KV value(s), last good kept "
                f"(e.g. {bucket}/{key}: {reason[:160]})")

    def collect(self) -> Iterator[Any]:
        """prometheus-client collector: ``propolis_bus_undecodable_values_total{bucket}``."""
        from prometheus_client.core import CounterMetricFamily
        family = CounterMetricFamily("propolis_bus_undecodable_values", "KV values refused by a watch "
                                     "(malformed or wrong field types), per bucket", labels=["bucket"])
        for bucket, n in sorted(self.total.items()):
            family.add_metric([bucket], n)
        yield family


UNDECODABLE = UndecodableValues()


#: nats-py errors that mean "NATS not reachable or not answering now": a TemporaryError at this boundary
_NATS_UNAVAILABLE = (nats.errors.TimeoutError, nats.errors.ConnectionClosedError, nats.errors.NoRespondersError,
                     nats.errors.ConnectionReconnectingError, nats.errors.StaleConnectionError,
                     nats.errors.OutboundBufferLimitError, nats.js.errors.ServiceUnavailableError)


class Kv:
    """One bucket; values are codec messages (``raw=True`` methods for bytes)."""

    def __init__(self, bus: Bus, bucket: str, store: KeyValue) -> None:
        self.bus = bus
        self.bucket = bucket
        self.store = store

    async def _raw(self, key: str) -> Any:
        """The key's live entry as nats-py gives it (undecoded), or None when absent or deleted."""
        try:
            e = await self.store.get(key)
        except nats.js.errors.KeyNotFoundError:
            return None
        return None if e.value is None or e.operation in (KV_DEL, KV_PURGE) else e

    async def get(self, key: str) -> Entry | None:
        e = await self._raw(key)
        if e is None:
            return None
        try:
            return Entry(key, codec.decode(e.value), e.revision or 0)
        except PermanentError as exc:  # poison reads as absent: its owner's `create` replaces it
            log.warning("KV %s/%s revision %s undecodable, read as absent: %s", self.bucket, key, e.revision, exc)
            return None

    async def put(self, key: str, value: Any) -> int:
        data = codec.encode(value)
        try:
            return await self.store.put(key, data)
        except _NATS_UNAVAILABLE as exc:  # nats-py's errors, translated here naming the key
            raise TemporaryError(f"put {self.bucket}/{key}: {exc or type(exc).__name__}") from exc

    async def create(self, key: str, value: Any) -> int:
        """Write only if absent (also after a delete) or undecodable (poison: nobody can use it, so the
        writer repairs it, compare-and-set on its revision); raises Conflict if a readable value is there."""
        data = codec.encode(value)
        try:
            return await self.store.create(key, data)
        except nats.js.errors.KeyWrongLastSequenceError as exc:
            present = await self._undecodable_revision(key)
            if present is None:
                raise Conflict(f"{self.bucket}/{key} exists") from exc
        log.error("KV %s/%s: replacing an undecodable value (revision %d)", self.bucket, key, present)
        return await self.update(key, value, present)

    async def _undecodable_revision(self, key: str) -> int | None:
        """The revision of ``key`` if it holds a value that does not decode, else None."""
        e = await self._raw(key)
        if e is None:
            return None
        try:
            codec.decode(e.value)
        except PermanentError:
            return e.revision or 0
        return None

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
        except _NATS_UNAVAILABLE as exc:
            raise TemporaryError(f"delete {self.bucket}/{key}: {exc or type(exc).__name__}") from exc

    async def items(self, keys: str | Sequence[str] = ">", *,
                    refused: dict[str, str] | None = None) -> dict[str, Entry]:
        """A snapshot of the bucket (the keys under ``keys``: one filter or several), read with direct gets
        (no consumer left behind: `bus/snapshot.py`); undecodable values are left out (and named in
        ``refused``, when given)."""
        from propolis.bus.snapshot import kv_snapshot
        out: dict[str, Entry] = {}
        for flt in key_filters(keys):
            out.update(await kv_snapshot(self.bus, self.bucket, flt, refused=refused))
        return out

    async def watch(self, keys: str | Sequence[str] = ">", *, follow: bool = True
                    ) -> AsyncGenerator[KvEvent, None]:
        """Initial values, SYNCED, then updates of the keys under ``keys`` (one filter or several, one
        consumer); survives reconnects (see module doc)."""
        filters = key_filters(keys)
        shown = ",".join(filters)
        delivered: dict[str, int] = {}  # key -> revision the consumer has seen
        signals = _WatchSignals()
        remove_listener = self.bus.on_reconnect(signals.on_reconnect)
        jitter = WATCH_START_JITTER_S
        try:
            while True:
                signals.clear()
                watcher, created = await self._start_watcher(filters, jitter)
                jitter = WATCH_RESYNC_JITTER_S  # from now on a start is a re-sync: many may happen at once
                signals.updates = watcher._updates
                recreated = asyncio.create_task(self._until_recreated(created, signals),
                                                name=f"kv-recreated-{self.bucket}")
                seen: set[str] = set()
                initial = True
                marker_seen = False  # nats-py's end-of-initial-values marker arrived
                initial_until = 0  # ... and the stream sequence the server had delivered to us by then
                newest = 0  # highest stream sequence received
                try:
                    while True:
                        if initial and marker_seen and newest >= initial_until:  # end of initial values
                            initial = False
                            for gone in [k for k in delivered if k not in seen]:
                                del delivered[gone]
                                yield KvEvent(EventType.DELETE, gone)
                            yield SYNCED
                            if not follow:
                                return
                        entry = await self._next(watcher, signals,
                                                 timeout=INITIAL_CATCH_UP_S if initial and marker_seen else None)
                        if entry is _RESYNC:
                            if signals.recreated or not await self._consumer_alive(watcher):
                                break
                            signals.reconnected = False  # consumer still there: nats-py resumes it
                            continue
                        if entry is _TIMEOUT:
                            log.warning("watch %s/%s: delivered sequence %d never arrived; initial values end "
                                        "at %d", self.bucket, shown, initial_until, newest)
                            newest = initial_until
                            continue
                        if entry is None:
                            # nats-py puts its marker when the consumer had nothing pending, which can be before
                            # the messages already pushed to us were processed: initial values end only once
                            # everything the server had delivered by then has arrived.
                            if initial and not marker_seen:
                                marker_seen = True
                                initial_until = await self._delivered_sequence(watcher)
                            continue
                        assert isinstance(entry, KeyValue.Entry)
                        key = entry.key
                        rev = entry.revision or 0
                        newest = max(newest, rev)
                        if initial:
                            seen.add(key)
                        if entry.operation in (KV_DEL, KV_PURGE) or entry.value is None:
                            UNDECODABLE.healed(self.bucket, key)
                            if delivered.pop(key, None) is not None:
                                yield KvEvent(EventType.DELETE, key, None, rev, purged=entry.operation == KV_PURGE)
                            continue
                        if delivered.get(key) == rev:
                            continue
                        try:
                            value = codec.decode(entry.value)
                        except PermanentError as exc:  # poison: a per-key error, the watch goes on
                            UNDECODABLE.refused(self.bucket, key, rev, str(exc))
                            continue
                        UNDECODABLE.healed(self.bucket, key)
                        delivered[key] = rev
                        yield KvEvent(EventType.PUT, key, value, rev)
                finally:
                    signals.updates = None
                    recreated.cancel()
                    with contextlib.suppress(Exception):
                        await watcher.stop()  # type: ignore[no-untyped-call]  # nats-py leaves it unannotated
                log.info("watch %s/%s: re-syncing after losing its consumer or the bucket's re-creation",
                         self.bucket, shown)
        finally:
            remove_listener()

    async def _start_watcher(self, filters: tuple[str, ...], jitter: float
                             ) -> tuple[KeyValue.KeyWatcher, datetime | None]:
        """A new ordered consumer on the bucket, after a random delay of up to ``jitter`` seconds and with at
        most `MAX_CONCURRENT_WATCH_STARTS` consumer creations of this process in flight, so nodes booting
        (or reconnecting after a server restart) together spread their initial syncs over time."""
        while True:
            await asyncio.sleep(random.uniform(0.0, jitter))
            try:
                async with _watch_start_slots():
                    created = await self._stream_created()
                    return await self._open_watcher(filters), created
            except (TimeoutError, nats.errors.Error) as exc:
                log.warning("watch %s/%s: %s; retrying", self.bucket, ",".join(filters), exc)
                jitter = max(jitter, 0.5)

    async def _open_watcher(self, filters: tuple[str, ...]) -> KeyValue.KeyWatcher:
        """nats-py's KeyWatcher (its ordered consumer, markers and reconnect handling) on one filter, or on
        several through one consumer: nats-py's `KeyValue.watch` takes one, so its consumer is created
        through `_FilterSubjects`, which hands the server all of them (``filter_subjects``)."""
        if len(filters) == 1:
            return await self.store.watch(filters[0])
        s = self.store
        js = _FilterSubjects(s._js, [s._pre + f for f in filters])
        return await KeyValue(s._name, s._stream, s._pre, cast(JetStreamContext, js), s._direct).watch(">")

    async def _consumer_alive(self, watcher: KeyValue.KeyWatcher) -> bool:
        """After a reconnect: is the watch's consumer still on the server? Then the watch keeps it: nats-py's
        ordered consumer re-subscribes and, on a sequence gap or missed heartbeats, restarts itself after the
        last stream sequence it delivered, so nothing is lost and no bucket-wide re-sync runs. A server that
        restarted lost its (in-memory) ordered consumers: then the watch starts anew and re-syncs."""
        try:
            await _subscription(watcher).consumer_info()
        except (TimeoutError, nats.errors.Error) as exc:
            log.info("watch %s: consumer gone after the reconnect (%s)", self.bucket, exc or type(exc).__name__)
            return False
        return True

    async def _stream_created(self) -> datetime | None:
        """When the bucket's stream was created: a different value later means it was deleted and made anew."""
        return (await self.bus.js.stream_info(f"KV_{self.bucket}")).created

    async def _until_recreated(self, created: datetime | None, signals: _WatchSignals) -> None:
        """Signal ``recreated`` once the bucket's stream is gone or was re-created.

        A deleted-and-recreated bucket restarts its sequence numbers, and nats-py's ordered consumer
        resumes after the *old* last sequence: without this the watch would wait forever for the
        owner's refill (a wedged consumer behind a green status)."""
        while not signals.recreated:
            await asyncio.sleep(STREAM_CHECK_INTERVAL_S)
            try:
                now = await self._stream_created()
            except nats.js.errors.NotFoundError:
                now = None
            except (TimeoutError, nats.errors.Error):
                continue  # NATS away: the reconnect path re-syncs
            if now != created:
                log.warning("bucket %s was deleted or re-created: re-syncing its watch", self.bucket)
                signals.on_recreated()

    @staticmethod
    async def _delivered_sequence(watcher: KeyValue.KeyWatcher) -> int:
        """The last stream sequence the server delivered to this watch's consumer (0 if unknown)."""
        try:
            info = await _subscription(watcher).consumer_info()
        except (TimeoutError, nats.errors.Error) as exc:
            log.debug("consumer info for a watch: %s", exc)
            return 0
        if not info.delivered or not getattr(info.delivered, "consumer_seq", 0):
            # nothing delivered to this consumer (an empty key subset): the server still reports the stream's
            # last sequence as its position, which would never "arrive" and hold SYNCED back for the timeout
            return 0
        return int(getattr(info.delivered, "stream_seq", 0) or 0)

    @staticmethod
    async def _next(watcher: KeyValue.KeyWatcher, signals: _WatchSignals, timeout: float | None = None) -> object:
        """The watcher's next entry (None = nats-py's end-of-initial-values marker), `_RESYNC` when a
        reconnect or the bucket's re-creation needs a look, `_TIMEOUT` after ``timeout`` seconds.

        One queue carries all three (the signals put a wake-up into the watcher's own queue), so an entry
        costs one ``Queue.get`` and no task: a watch delivers as fast as plain nats-py."""
        updates = watcher._updates
        timer: asyncio.TimerHandle | None = None
        try:
            while True:
                if signals.pending:
                    return _RESYNC
                if not updates.empty():  # fast path: the entry is already here
                    item: object = updates.get_nowait()
                else:
                    if timeout is not None and timer is None:
                        timer = asyncio.get_running_loop().call_later(timeout, signals.on_timeout)
                    item = await updates.get()
                if item is not _WAKE:
                    return item
                if signals.timed_out:
                    return _TIMEOUT
                # else a signal (seen at the top) or a stale wake-up: wait on
        finally:
            if timer is not None:
                timer.cancel()
            signals.timed_out = False  # a wake-up it left in the queue is stale now


class _WatchSignals:
    """Why a watch must stop and look (a reconnect, its bucket re-created, a timeout), delivered as a
    wake-up through the watcher's own queue so that waiting for the next entry needs no extra task."""

    def __init__(self) -> None:
        self.reconnected = False
        self.recreated = False
        self.timed_out = False
        self.updates: asyncio.Queue[Any] | None = None

    @property
    def pending(self) -> bool:
        return self.reconnected or self.recreated

    def clear(self) -> None:
        self.reconnected = self.recreated = self.timed_out = False

    def on_reconnect(self) -> None:
        self.reconnected = True
        self._wake()

    def on_recreated(self) -> None:
        self.recreated = True
        self._wake()

    def on_timeout(self) -> None:
        self.timed_out = True
        self._wake()

    def _wake(self) -> None:
        if self.updates is not None:
            with contextlib.suppress(asyncio.QueueFull):  # a full queue is read at once: the flags are seen
                self.updates.put_nowait(_WAKE)


def key_filters(keys: str | Sequence[str]) -> tuple[str, ...]:
    """One key filter or several as a tuple, checked: at least one, none overlapping another."""
    filters = (keys,) if isinstance(keys, str) else tuple(dict.fromkeys(keys))
    if not filters:
        raise ValidationError("keys", "a KV watch needs at least one key filter")
    for i, a in enumerate(filters):
        for b in filters[i + 1:]:
            if subjects.filters_overlap(a, b):
                raise ValidationError("keys", f"KV key filters {a!r} and {b!r} overlap")
    return filters


class _FilterSubjects:
    """A JetStream context whose `subscribe` gives the consumer several filter subjects: what nats-py's
    `KeyValue.watch` asks of its ``_js`` is this method (and attributes, passed through). The ordered
    consumer keeps its config (``filter_subjects`` included) when it restarts after a gap or a reconnect."""

    def __init__(self, js: JetStreamContext, filter_subjects: list[str]) -> None:
        self._js = js
        self._filter_subjects = filter_subjects

    def __getattr__(self, name: str) -> Any:
        return getattr(self._js, name)

    async def subscribe(self, subject: str, **kwargs: Any) -> JetStreamContext.PushSubscription:
        config = ConsumerConfig(filter_subjects=list(self._filter_subjects))
        return await self._js.subscribe(subject, config=config, **kwargs)


def _subscription(watcher: KeyValue.KeyWatcher) -> JetStreamContext.PushSubscription:
    """The watcher's JetStream subscription (nats-py keeps it private and untyped)."""
    sub = watcher._sub
    assert sub is not None, "a started KeyWatcher has a subscription"
    return sub  # type: ignore[no-any-return]  # nats-py leaves KeyWatcher._sub unannotated


#: a watch's first start waits a random delay up to this long; a re-sync (consumer lost with a server
#: restart, bucket re-created) up to `WATCH_RESYNC_JITTER_S`: nodes booting or reconnecting together spread out
WATCH_START_JITTER_S = 0.2
WATCH_RESYNC_JITTER_S = 2.0
#: consumer creations (a watch's start) one process runs at once
MAX_CONCURRENT_WATCH_STARTS = 4

_START_SLOTS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = weakref.WeakKeyDictionary()


def _watch_start_slots() -> asyncio.Semaphore:
    """The process's cap on watch starts (one per event loop: a semaphore belongs to its loop)."""
    loop = asyncio.get_running_loop()
    slots = _START_SLOTS.get(loop)
    if slots is None:
        slots = _START_SLOTS[loop] = asyncio.Semaphore(MAX_CONCURRENT_WATCH_STARTS)
    return slots


_RESYNC = object()
_TIMEOUT = object()
_WAKE = object()
