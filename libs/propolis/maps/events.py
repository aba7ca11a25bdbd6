"""cilium_events (ring buffer of `struct flow_event`) and cilium_events_lost_by_type (per-CPU
counts of the events that did not make it into the ring, per type and cause).

Mirrors `struct flow_event` in bpf/lib/maps.h. Why a reader of our own: the observer runs
in another process than the loader, opens the pinned ring buffer by path, maps it (the
kernel's BPF ring buffer layout: consumer page, producer page, data pages mapped twice)
and waits on the map fd with asyncio, so no bcc is needed to consume events. A full ring
never blocks the datapath; `lost()` reports what was dropped (Hubble's lost events).
"""

from __future__ import annotations

import asyncio
import ctypes
import mmap
import os
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from propolis.maps import bpf
from propolis.maps.drop import reason_name, reason_text
from propolis.maps.spec import MapSpec, be32_to_ip4, ntohs

CILIUM_NOTIFY_DROP = 1
CILIUM_NOTIFY_TRACE = 4
CILIUM_NOTIFY_POLICY_VERDICT = 5
EVENT_TYPE_NAMES = {1: "drop", 4: "trace", 5: "policy-verdict"}

TRACE_POINT_NAMES = {0: "to-endpoint", 1: "to-proxy", 2: "to-host", 3: "to-stack", 5: "from-endpoint"}
VERDICT_NAMES = {1: "FORWARDED", 2: "DROPPED", 4: "AUDIT", 5: "REDIRECTED"}
TRACE_REASON_NAMES = {0: "TRACE_REASON_UNKNOWN", 1: "NEW", 2: "ESTABLISHED", 3: "REPLY", 4: "RELATED", 5: "REOPENED"}
MATCH_TYPE_NAMES = {0: "none", 1: "l3-only", 2: "l3-l4", 3: "l4-only", 4: "all", 5: "l3-proto", 6: "proto-only"}
DIRECTION_NAMES = {0: "TRAFFIC_DIRECTION_UNKNOWN", 1: "INGRESS", 2: "EGRESS"}
TCP_FLAG_NAMES = ((0x01, "FIN"), (0x02, "SYN"), (0x04, "RST"), (0x08, "PSH"), (0x10, "ACK"),
                  (0x20, "URG"), (0x40, "ECE"), (0x80, "CWR"))
FLOW_EVENT_F_IS_REPLY = 1 << 0
FLOW_EVENT_F_ENFORCED = 1 << 1

_RINGBUF_BUSY_BIT = 1 << 31
_RINGBUF_DISCARD_BIT = 1 << 30
_RINGBUF_HDR_SZ = 8


class _L3(ctypes.Union):
    C_STRUCT = "l3addr"
    _fields_ = [("ip4", ctypes.c_uint32), ("ip6", ctypes.c_uint8 * 16)]


class FlowEventRecord(ctypes.Structure):
    C_STRUCT = "flow_event"
    _fields_ = [
        ("type", ctypes.c_uint8),
        ("subtype", ctypes.c_uint8),
        ("source", ctypes.c_uint16),
        ("ifindex", ctypes.c_uint32),
        ("timestamp_ns", ctypes.c_uint64),
        ("len_orig", ctypes.c_uint32),
        ("src_identity", ctypes.c_uint32),
        ("dst_identity", ctypes.c_uint32),
        ("family", ctypes.c_uint8),
        ("protocol", ctypes.c_uint8),
        ("direction", ctypes.c_uint8),
        ("tcp_flags", ctypes.c_uint8),
        ("saddr", _L3),
        ("daddr", _L3),
        ("sport", ctypes.c_uint16),
        ("dport", ctypes.c_uint16),
        ("verdict", ctypes.c_uint8),
        ("match_type", ctypes.c_uint8),
        ("trace_reason", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("proxy_port", ctypes.c_uint16),
        ("drop_reason", ctypes.c_uint16),
        ("icmp_type", ctypes.c_uint8),
        ("icmp_code", ctypes.c_uint8),
        ("pad", ctypes.c_uint16),
    ]


RINGBUF_PAGES = 1024
SPEC = MapSpec(
    pin_name="cilium_events",
    c_name="cilium_events",
    map_type=bpf.BPF_MAP_TYPE_RINGBUF,
    key_type=ctypes.c_int,
    value_type=ctypes.c_uint32,
    max_entries=RINGBUF_PAGES * 4096,
    why_size="4 MiB holds ~50k events of 80 bytes: over a second at 30k flows/s before the observer must read",
    size_define=None,  # -DEVENTS_RINGBUF_PAGES (pages, power of two)
    c_value_struct="flow_event",
    extra={"record": FlowEventRecord},
)



class EventsLostCount(ctypes.Structure):
    C_STRUCT = "events_lost_count"
    _fields_ = [("ring_full", ctypes.c_uint64), ("rate_limited", ctypes.c_uint64)]


LOST_BY_TYPE_SPEC = MapSpec(
    pin_name="cilium_events_lost_by_type",
    c_name="events_lost_typ",
    map_type=bpf.BPF_MAP_TYPE_PERCPU_ARRAY,
    key_type=ctypes.c_uint32,
    value_type=EventsLostCount,
    max_entries=8,
    why_size="one row per event type (CILIUM_NOTIFY_*, all below 8), per CPU",
    c_value_struct="events_lost_count",
)


class EventsRateBucket(ctypes.Structure):
    C_STRUCT = "events_rate_bucket"
    _fields_ = [("last_ns", ctypes.c_uint64), ("credit", ctypes.c_uint64)]


RATELIMIT_SPEC = MapSpec(
    pin_name="cilium_events_ratelimit",
    c_name="events_ratelim",
    map_type=bpf.BPF_MAP_TYPE_HASH,
    key_type=ctypes.c_uint32,
    value_type=EventsRateBucket,
    max_entries=65535,
    why_size="one token bucket per endpoint (as cilium_lxc), allocated on use",
    size_define="EVENTS_RATELIMIT_MAP_SIZE",
    c_value_struct="events_rate_bucket",
)

EVENT_TYPE_NAMES = {1: "drop", 4: "trace", 5: "policy-verdict"}

_BOOT_OFFSET = time.time() - time.monotonic()


@dataclass(frozen=True)
class FlowEvent:
    """One datapath notification, decoded; field names follow Hubble where they exist."""

    type: int
    subtype: int
    endpoint_id: int
    ifindex: int
    timestamp_ns: int
    length: int
    src_identity: int
    dst_identity: int
    protocol: int
    direction: int
    tcp_flags: int
    src_ip: str
    dst_ip: str
    src_port: int
    dst_port: int
    verdict: int
    match_type: int
    trace_reason: int
    flags: int
    proxy_port: int
    drop_reason: int
    icmp_type: int
    icmp_code: int

    @property
    def type_name(self) -> str:
        return EVENT_TYPE_NAMES.get(self.type, str(self.type))

    @property
    def verdict_name(self) -> str:
        return VERDICT_NAMES.get(self.verdict, "VERDICT_UNKNOWN")

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & FLOW_EVENT_F_IS_REPLY)

    @property
    def wall_time(self) -> float:
        """Unix time of the event (the datapath stamps CLOCK_MONOTONIC)."""
        return _BOOT_OFFSET + self.timestamp_ns / 1e9

    @property
    def tcp_flag_names(self) -> list[str]:
        return [name for bit, name in TCP_FLAG_NAMES if self.tcp_flags & bit]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "type": self.type_name, "endpoint_id": self.endpoint_id, "ifindex": self.ifindex,
            "time": self.wall_time, "length": self.length,
            "source_identity": self.src_identity, "destination_identity": self.dst_identity,
            "protocol": self.protocol, "traffic_direction": DIRECTION_NAMES.get(self.direction, "UNKNOWN"),
            "source": self.src_ip, "destination": self.dst_ip,
            "source_port": self.src_port, "destination_port": self.dst_port,
            "verdict": self.verdict_name, "is_reply": self.is_reply,
        }
        if self.protocol == 6:
            out["tcp_flags"] = self.tcp_flag_names
        if self.protocol == 1:
            out["icmp"] = {"type": self.icmp_type, "code": self.icmp_code}
        if self.type == CILIUM_NOTIFY_DROP or self.drop_reason:
            out["drop_reason"] = self.drop_reason
            out["drop_reason_desc"] = reason_name(self.drop_reason)
            out["drop_reason_text"] = reason_text(self.drop_reason)
        if self.type == CILIUM_NOTIFY_TRACE:
            out["trace_observation_point"] = TRACE_POINT_NAMES.get(self.subtype, str(self.subtype))
            out["trace_reason"] = TRACE_REASON_NAMES.get(self.trace_reason, str(self.trace_reason))
        if self.type == CILIUM_NOTIFY_POLICY_VERDICT:
            out["policy_match_type"] = MATCH_TYPE_NAMES.get(self.match_type, str(self.match_type))
            out["proxy_port"] = self.proxy_port
        return out


def decode(raw: bytes) -> FlowEvent:
    rec = FlowEventRecord.from_buffer_copy(raw[:ctypes.sizeof(FlowEventRecord)])
    return FlowEvent(
        type=rec.type, subtype=rec.subtype, endpoint_id=rec.source, ifindex=rec.ifindex,
        timestamp_ns=rec.timestamp_ns, length=rec.len_orig, src_identity=rec.src_identity,
        dst_identity=rec.dst_identity, protocol=rec.protocol, direction=rec.direction,
        tcp_flags=rec.tcp_flags, src_ip=be32_to_ip4(rec.saddr.ip4), dst_ip=be32_to_ip4(rec.daddr.ip4),
        src_port=ntohs(rec.sport), dst_port=ntohs(rec.dport), verdict=rec.verdict,
        match_type=rec.match_type, trace_reason=rec.trace_reason, flags=rec.flags,
        proxy_port=ntohs(rec.proxy_port), drop_reason=rec.drop_reason,
        icmp_type=rec.icmp_type, icmp_code=rec.icmp_code)


class EventReader:
    """Consumes the node's pinned cilium_events ring buffer.

    `read()` returns what is there now (never blocks); `stream()` is an async iterator that
    waits on the ring buffer's fd. One reader per ring buffer: reading consumes.
    """

    def __init__(self, pin_dir: str) -> None:
        self.pin_dir = pin_dir
        self.fd = bpf.obj_get(SPEC.path(pin_dir))
        info = bpf.obj_info(self.fd)
        if info.type != bpf.BPF_MAP_TYPE_RINGBUF:
            os.close(self.fd)
            raise bpf.BpfError(22, f"{SPEC.path(pin_dir)} is not a ring buffer")
        self.size = info.max_entries
        page = mmap.PAGESIZE
        self._consumer = mmap.mmap(self.fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._producer = mmap.mmap(self.fd, page + 2 * self.size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        self._data_off = page
        self._lost_by_type = LOST_BY_TYPE_SPEC.open(pin_dir)

    def read(self, limit: int = 100_000) -> list[FlowEvent]:
        events: list[FlowEvent] = []
        cons, = struct.unpack_from("=Q", self._consumer, 0)
        prod, = struct.unpack_from("=Q", self._producer, 0)
        mask = self.size - 1
        while cons < prod and len(events) < limit:
            off = self._data_off + (cons & mask)
            word, = struct.unpack_from("=I", self._producer, off)
            if word & _RINGBUF_BUSY_BIT:
                break
            length = word & ~(_RINGBUF_BUSY_BIT | _RINGBUF_DISCARD_BIT)
            if not word & _RINGBUF_DISCARD_BIT:
                events.append(decode(self._producer[off + _RINGBUF_HDR_SZ: off + _RINGBUF_HDR_SZ + length]))
            cons += (length + _RINGBUF_HDR_SZ + 7) // 8 * 8
            struct.pack_into("=Q", self._consumer, 0, cons)
            if cons >= prod:
                prod, = struct.unpack_from("=Q", self._producer, 0)
        return events

    def lost(self) -> int:
        """Events the datapath could not reserve (ring full) since the maps were created, all
        types and CPUs: Hubble's lost events. Rate-limited ones are in lost_by_type()."""
        return sum(counts["ring_full"] for counts in self.lost_by_type().values())

    def lost_by_type(self) -> dict[str, dict[str, int]]:
        """Events lost since the map was created, per event type ("drop", "trace",
        "policy-verdict") and cause ("ring_full", "rate_limited"), all CPUs; types with none left out."""
        out: dict[str, dict[str, int]] = {}
        for index in range(LOST_BY_TYPE_SPEC.max_entries):
            per_cpu = self._lost_by_type.lookup(ctypes.c_uint32(index)) or []
            ring_full = sum(v.ring_full for v in per_cpu)
            rate_limited = sum(v.rate_limited for v in per_cpu)
            if ring_full or rate_limited:
                out[EVENT_TYPE_NAMES.get(index, str(index))] = {"ring_full": ring_full,
                                                                "rate_limited": rate_limited}
        return out

    async def stream(self) -> AsyncIterator[FlowEvent]:
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        loop.add_reader(self.fd, ready.set)
        try:
            while True:
                batch = self.read()
                if not batch:
                    ready.clear()
                    batch = self.read()  # a record may have landed between read and clear
                    if not batch:
                        await ready.wait()
                        continue
                for event in batch:
                    yield event
        finally:
            loop.remove_reader(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            self._consumer.close()
            self._producer.close()
            self._lost_by_type.close()
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> EventReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
