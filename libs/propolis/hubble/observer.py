"""The per-node observer: datapath events -> flows -> ring buffer, bus, metrics, exporter.

Why one loop and no queue between reading and publishing: the kernel's BPF ring buffer already
is the queue. When the observer falls behind, the datapath cannot reserve and counts the event
in cilium_events_lost_by_type — the one place where a flow is lost before the observer, reported as
Hubble's PERF_EVENT_RING_BUFFER lost events. After that, every flow is numbered (`seq`), so a
bus subscriber counts what it missed itself (NATS_SUBSCRIBER), and the ring buffer reports the
readers it overran (HUBBLE_RING_BUFFER), as Hubble does.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol

from propolis.bus import codec, subjects
from propolis.bus.messages import FlowBatch, FlowMessage, FlowQuery, LostEvents
from propolis.hubble.filters import FlowMatcher
from propolis.hubble.flow import Enricher, Flow, rfc3339, to_flow
from propolis.maps import events as ev

if TYPE_CHECKING:
    from nats.aio.subscription import Subscription

    from propolis.bus.connection import Bus

log = logging.getLogger("propolis.hubble.observer")

DEFAULT_CAPACITY = 4095  # Hubble's hubble-event-buffer-capacity
LOST_PERF_RING = "PERF_EVENT_RING_BUFFER"
LOST_QUEUE = "OBSERVER_EVENTS_QUEUE"
LOST_HUBBLE_RING = "HUBBLE_RING_BUFFER"
LOST_SUBSCRIBER = "NATS_SUBSCRIBER"
QUERY_CHUNK = 200  # flows per answer message: far below NATS's 1 MiB max payload even with many labels


class FlowRing:
    """The last `capacity` flows, oldest evicted first; entries are (seq, flow)."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError("ring buffer capacity must be >= 1")
        self.capacity = capacity
        self._ring: deque[tuple[int, Flow]] = deque(maxlen=capacity)
        self.seen = 0  # flows ever written

    def append(self, seq: int, flow: Flow) -> None:
        self._ring.append((seq, flow))
        self.seen += 1

    def __len__(self) -> int:
        return len(self._ring)

    def oldest_seq(self) -> int:
        return self._ring[0][0] if self._ring else 0

    def snapshot(self) -> list[tuple[int, Flow]]:
        return list(self._ring)

    def query(self, matcher: FlowMatcher, *, number: int = 0, first: bool = False,
              since: str = "", until: str = "") -> list[tuple[int, Flow]]:
        """Matching flows, oldest first: the first/last `number` (0 = all) within [since, until]."""
        def ok(item: tuple[int, Flow]) -> bool:
            t = item[1].get("time", "")
            return (not since or t >= since) and (not until or t <= until) and matcher(item[1])

        if first:
            out: list[tuple[int, Flow]] = []
            for item in self._ring:
                if ok(item):
                    out.append(item)
                    if number and len(out) >= number:
                        break
            return out
        picked = []
        for item in reversed(self._ring):
            if ok(item):
                picked.append(item)
                if number and len(picked) >= number:
                    break
        picked.reverse()
        return picked


class FlowSink(Protocol):
    """What gets every flow besides the ring and the bus (metrics, exporter)."""

    def process(self, flow: Flow) -> None: ...


class Observer:
    """Turns events into flows and hands each to the ring, the sinks and the publisher."""

    def __init__(self, node: str, *, instance: str = "", enricher: Enricher | None = None,
                 capacity: int = DEFAULT_CAPACITY, sinks: Iterable[FlowSink] = (),
                 publish: Callable[[str, bytes], Awaitable[None]] | None = None) -> None:
        self.node = subjects.token(node, what="node")
        self.instance = instance or f"{int(time.time() * 1000):x}"
        self.enricher = enricher or Enricher()
        self.ring = FlowRing(capacity)
        self.sinks = list(sinks)
        self.publish = publish  # e.g. nats-py's publish (buffered: awaits only when its buffer is full)
        self.seq = 0
        self.lost: dict[str, int] = {}
        self.on_lost: list[Callable[[str, int], None]] = []
        self._datapath_lost_base: int | None = None
        # the datapath's own losses per event type and cause (ring_full, rate_limited), as
        # cilium_events_lost_by_type counts them since its maps were created
        self.datapath_lost_by_type: dict[str, dict[str, int]] = {}
        #: publishes that failed (NATS away): logged once per outage, each counted (metric in services/hubble)
        self.publish_failures = 0
        self.on_publish_failure: list[Callable[[], None]] = []
        self._failing_since = 0  # publish_failures when the current outage began; 0 = publishing fine

    async def handle(self, event: ev.FlowEvent) -> Flow:
        return await self.add(to_flow(event, node=self.node, enricher=self.enricher))

    async def add(self, flow: Flow) -> Flow:
        """Number the flow, keep it, tell the sinks and publish it."""
        self.seq += 1
        self.ring.append(self.seq, flow)
        for sink in self.sinks:
            sink.process(flow)
        if self.publish is not None:
            subject = subjects.flow_subject(self.node, flow["verdict"], flow["source"].get("namespace", ""),
                                            flow["destination"].get("namespace", ""))
            await self._publish(subject, codec.encode(FlowMessage(self.node, self.instance, self.seq, flow)))
        return flow

    async def _publish(self, subject: str, data: bytes) -> None:
        """Publish; while NATS is away the flow still reaches the ring and sinks, and a failed publish is
        counted, not logged: one line when publishing starts failing, one when it works again."""
        assert self.publish is not None
        try:
            await self.publish(subject, data)
        except Exception as exc:  # noqa: BLE001 - NATS down or its buffer full: every flow would fail alike
            self.publish_failures += 1
            for listener in self.on_publish_failure:
                listener()
            if not self._failing_since:
                self._failing_since = self.publish_failures
                log.warning("publishing flows failed (%s: %s); counting failures in "
                            "hubble_flows_publish_failures_total until NATS takes them again",
                            type(exc).__name__, exc)
            return
        if self._failing_since:
            log.info("publishing flows again; %d flows were not published meanwhile",
                     self.publish_failures - self._failing_since + 1)
            self._failing_since = 0

    async def count_lost(self, source: str, n: int) -> None:
        if n <= 0:
            return
        self.lost[source] = self.lost.get(source, 0) + n
        for listener in self.on_lost:
            listener(source, n)
        if self.publish is not None:
            await self._publish(subjects.lost_events_subject(self.node),
                                codec.encode(LostEvents(source, n, self.node, rfc3339(time.time()))))

    async def datapath_lost(self, total: int) -> int:
        """Feed the datapath's lost-event total (ring full, all types); counts (and returns) what is new since the
        previous call. The first call only sets the baseline: earlier losses predate this observer."""
        if self._datapath_lost_base is None:
            self._datapath_lost_base = total
            return 0
        new = total - self._datapath_lost_base
        self._datapath_lost_base = total
        await self.count_lost(LOST_PERF_RING, new)
        return new

    def answer(self, query: FlowQuery) -> Iterable[FlowBatch]:
        """A historic query's answer in chunks; the last has `done`."""
        matcher = FlowMatcher(query.whitelist, query.blacklist)
        found = self.ring.query(matcher, number=query.number, first=query.first,
                                since=query.since, until=query.until)
        for i in range(0, len(found), QUERY_CHUNK):
            yield FlowBatch(self.node, [[s, f] for s, f in found[i:i + QUERY_CHUNK]])
        yield FlowBatch(self.node, [], done=True, num_flows=len(self.ring), max_flows=self.ring.capacity,
                        seen_flows=self.ring.seen, instance=self.instance, last_seq=self.seq)

    async def serve_queries(self, bus: Bus) -> Subscription:
        """Answer historic queries on the bus; returns the subscription."""
        async def on_query(msg: Any) -> None:
            if not msg.reply:
                return
            try:
                query = codec.decode(msg.data, FlowQuery)
            except Exception as exc:  # noqa: BLE001 - one bad query is dropped, never fatal
                log.warning("bad flow query: %s", exc)
                return
            if query.nodes and self.node not in query.nodes:
                return
            try:
                for batch in self.answer(query):
                    await bus.publish_raw(msg.reply, codec.encode(batch))
            except Exception as exc:  # noqa: BLE001 - a bad filter: say so instead of timing the client out
                await bus.publish_raw(msg.reply, codec.encode(FlowBatch(self.node, [], done=True, error=str(exc))))

        return await bus.subscribe_raw(subjects.HUBBLE_QUERY, on_query)

    async def run(self, stream: AsyncIterator[ev.FlowEvent]) -> None:
        n = 0
        async for event in stream:
            try:
                await self.handle(event)
            except Exception:  # one odd event must not stop observation
                log.exception("could not turn event into a flow: %r", event)
            n += 1
            if n % 256 == 0:  # under sustained load the ring never runs dry: let queries, heartbeats
                await asyncio.sleep(0)  # and /metrics have the loop now and then

