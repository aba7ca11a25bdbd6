"""Reading flows cluster-wide over NATS: historic queries to every observer's ring, and follow.

The relay is built on this, and `propolis observe` uses it directly when no relay is running.
Answers are GetFlowsResponse-shaped dicts: ``{"flow", "node_name", "time"}`` or
``{"lost_events", "node_name", "time"}``.

Follow counts what it misses: every flow carries its observer's sequence number, so a gap is
reported as lost events (NATS_SUBSCRIBER) right where it happened — a slow subscriber dropped by
nats-server, or this client's own bounded queue overflowing.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import heapq
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from propolis.bus import codec, subjects
from propolis.bus.connection import Bus
from propolis.bus.messages import FlowBatch, FlowMessage, FlowQuery, LostEvents
from propolis.errors import ValidationError
from propolis.hubble.filters import FlowMatcher
from propolis.hubble.flow import rfc3339
from propolis.hubble.observer import LOST_SUBSCRIBER

log = logging.getLogger("propolis.hubble.client")
Response = dict[str, Any]
FOLLOW_QUEUE = 100_000


def flow_response(node: str, flow: dict[str, Any]) -> Response:
    return {"flow": flow, "node_name": node, "time": flow.get("time", "")}


def lost_response(node: str, source: str, n: int, when: str = "", cpu: int = -1) -> Response:
    return {"lost_events": {"source": source, "num_events_lost": n, "cpu": cpu}, "node_name": node,
            "time": when or rfc3339(time.time())}


def select(per_node: list[list[Response]], number: int, first: bool) -> list[Response]:
    """Merge nodes' answers (each oldest first) by time; keep the first/last `number` (0 = all)."""
    merged = list(heapq.merge(*per_node, key=lambda r: r["time"]))
    if number:
        merged = merged[:number] if first else merged[-number:]
    return merged


async def announced_relay(bus: Bus) -> str:
    """The URL a live hubble-relay announces in its heartbeat (`progress.relay_url`), or ""."""
    from propolis.runtime.heartbeats import is_live, newest, read_heartbeats

    now = time.time()
    relay = newest([hb for hb in await read_heartbeats(bus) if is_live(hb, now)], "hubble-relay")
    return str(relay.progress.get("relay_url", "")) if relay else ""


class BusFlowSource:
    def __init__(self, bus: Bus, *, timeout: float = 3.0, quiet: float = 0.5) -> None:
        self.bus = bus
        self.timeout = timeout
        self.quiet = quiet
        self.last_status: dict[str, Any] = {}

    async def known_nodes(self) -> set[str]:
        """Nodes with a live hubble heartbeat (empty when heartbeats are unavailable)."""
        try:
            kv = await self.bus.kv(subjects.HEARTBEATS_BUCKET)
            return {hb.node for hb in map(subjects.parse_heartbeat_key, await kv.items(subjects.heartbeat_keys("hubble")))
                    if hb is not None}
        except Exception as exc:  # noqa: BLE001 - no bucket, no permission, no JetStream: the answers decide
            log.debug("no heartbeats for node discovery: %s", exc)
            return set()

    async def historic(self, query: FlowQuery) -> tuple[list[Response], dict[str, FlowBatch]]:
        """Ask every observer; wait until each known node finished (or timeout; with no known
        nodes, until answers go quiet). Returns merged responses and each node's final batch."""
        expected = await self.known_nodes()
        if query.nodes:
            expected &= set(query.nodes)
        per_node: dict[str, list[Response]] = {}
        done: dict[str, FlowBatch] = {}
        arrived = asyncio.Event()
        inbox = self.bus.new_inbox()

        async def on_batch(msg: Any) -> None:
            if not msg.data:  # NATS's "no responders" status: no observer is listening
                return
            try:
                batch = codec.decode(msg.data, FlowBatch)
            except Exception as exc:  # noqa: BLE001 - one bad message is dropped, never fatal
                log.warning("bad flow batch: %s", exc)
                return
            per_node.setdefault(batch.node, []).extend(flow_response(batch.node, f) for _, f in batch.flows)
            if batch.done:
                done[batch.node] = batch
            arrived.set()

        sub = await self.bus.subscribe_raw(inbox, on_batch)
        try:
            await self.bus.publish_raw(subjects.HUBBLE_QUERY, codec.encode(query), reply=inbox)
            deadline = time.monotonic() + self.timeout
            while True:
                if expected and expected <= set(done):
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                wait = left if expected or not done else min(left, self.quiet)
                arrived.clear()
                try:
                    await asyncio.wait_for(arrived.wait(), wait)
                except TimeoutError:
                    if not expected and done:
                        break
        finally:
            await sub.unsubscribe()
        self.last_status = {"nodes": sorted(done), "unavailable": sorted(expected - set(done)),
                            "per_node": [{"name": n, "num_flows": b.num_flows, "max_flows": b.max_flows,
                                          "seen_flows": b.seen_flows} for n, b in sorted(done.items())],
                            "num_flows": sum(b.num_flows for b in done.values()),
                            "max_flows": sum(b.max_flows for b in done.values()),
                            "seen_flows": sum(b.seen_flows for b in done.values())}
        flows = select([per_node.get(n, []) for n in done], query.number, query.first)
        return flows, done

    async def stream(self, query: FlowQuery, *, follow: bool) -> AsyncIterator[Response]:
        """Historic answer, then (with `follow`) every new matching flow and lost-event notice,
        without duplicates or holes between the two."""
        matcher = FlowMatcher(query.whitelist, query.blacklist)
        queue: asyncio.Queue[Any] = asyncio.Queue(FOLLOW_QUEUE)
        sub = None
        if follow:
            async def on_msg(msg: Any) -> None:
                with contextlib.suppress(asyncio.QueueFull):  # shows up as a sequence gap: reported below
                    queue.put_nowait(msg.data)

            sub = await self.bus.subscribe_raw(subjects.FLOWS_ALL, on_msg, pending_msgs_limit=FOLLOW_QUEUE)
        try:
            wants_history = query.number or query.since or query.until or not follow
            last_seq: dict[tuple[str, str], int] = {}
            if wants_history:
                flows, done = await self.historic(query)
                for r in flows:
                    yield r
                for node, batch in done.items():  # follow continues right after the answer
                    last_seq[(node, batch.instance)] = batch.last_seq
            if sub is None:
                return
            while True:
                data = await queue.get()
                try:
                    msg = codec.decode(data)
                except Exception as exc:  # noqa: BLE001 - one bad message is dropped, never fatal
                    log.warning("undecodable flow message: %s", exc)
                    continue
                if isinstance(msg, LostEvents):
                    yield lost_response(msg.node, msg.source, msg.num_events_lost, msg.time, msg.cpu)
                    continue
                if not isinstance(msg, FlowMessage):
                    continue
                key = (msg.node, msg.instance)
                prev = last_seq.get(key)
                if prev is not None and msg.seq <= prev:
                    continue
                if prev is not None and msg.seq > prev + 1:
                    yield lost_response(msg.node, LOST_SUBSCRIBER, msg.seq - prev - 1)
                last_seq[key] = msg.seq
                if query.until and msg.flow.get("time", "") > query.until:
                    return
                if matcher(msg.flow):
                    yield flow_response(msg.node, msg.flow)
        finally:
            if sub is not None:
                await sub.unsubscribe()


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_time(text: str, now: float | None = None) -> str:
    """`--since`/`--until` values as Hubble takes them: RFC 3339, or a duration ago (`90s`, `5m`, `2h`, `1d`)
    -> fixed-width RFC 3339 text. Empty stays empty."""
    text = (text or "").strip()
    if not text:
        return ""
    now = time.time() if now is None else now
    if text[-1] in _UNITS and text[:-1].replace(".", "", 1).isdigit():
        return rfc3339(now - float(text[:-1]) * _UNITS[text[-1]])
    try:
        dt = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValidationError("since", f"{text!r} is neither RFC 3339 nor a duration like 5m") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=datetime.UTC)
    return rfc3339(dt.timestamp())
