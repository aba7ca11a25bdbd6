"""The service map: workloads as nodes, observed connections and drops as edges.

Why connections and not events: one TCP connection produces several events (policy verdicts and
traces at both ends, on one or two nodes); an edge counts a connection once (its 5-tuple is
remembered for `dedupe_s`) and every drop event (each retransmitted SYN is another refusal); a
connection seen leaving its source and then dropped on arrival counts as a drop only.
Rates are per second over the last `window_s`.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from propolis.hubble.flow import Flow, flow_ports, protocol_of


def node_id(flow: Flow, side: str) -> tuple[str, dict[str, Any]]:
    ep = flow.get(side) or {}
    ns = ep.get("namespace", "")
    workload = (ep.get("workloads") or [{}])[0]
    if ep.get("pod_name"):
        name = workload.get("name") or ep["pod_name"]
        return f"{ns}/{name}", {"namespace": ns, "name": name, "kind": workload.get("kind", "Pod")}
    reserved = [lbl.split(":", 1)[1] for lbl in ep.get("labels") or [] if lbl.startswith("reserved:")]
    if reserved:
        return f"reserved:{reserved[0]}", {"namespace": "", "name": reserved[0], "kind": "reserved"}
    ip = (flow.get("IP") or {}).get(side, "")
    return ip, {"namespace": ns, "name": ip, "kind": "ip"}


@dataclass
class Edge:
    source: str
    destination: str
    port: int
    protocol: str
    forwarded: int = 0
    dropped: int = 0
    recent: deque[tuple[float, bool]] = field(default_factory=deque)
    last_seen: float = 0.0
    drop_reasons: dict[str, int] = field(default_factory=dict)


class ServiceMap:
    def __init__(self, *, window_s: float = 10.0, dedupe_s: float = 5.0) -> None:
        self.window_s, self.dedupe_s = window_s, dedupe_s
        self.nodes: dict[str, dict[str, Any]] = {}
        self.edges: dict[tuple[str, str, int, str], Edge] = {}
        self._seen: dict[tuple[Any, ...], tuple[float, bool]] = {}  # 5-tuple -> (when, counted forwarded)
        self._last_prune = 0.0

    def add(self, flow: Flow, now: float | None = None) -> None:
        now = time.time() if now is None else now
        if flow.get("is_reply") or not flow.get("IP"):
            return
        etype = (flow.get("event_type") or {}).get("type")
        dropped = flow.get("verdict") == "DROPPED" and etype == 1
        sport, dport = flow_ports(flow)
        ips = flow.get("IP") or {}
        conn = (ips.get("source"), sport, ips.get("destination"), dport, protocol_of(flow))
        seen = self._seen.get(conn)
        if not dropped:
            if etype not in (4, 5) or flow.get("verdict") != "FORWARDED":
                return
            if seen is not None and now - seen[0] < self.dedupe_s:
                return
            self._seen[conn] = (now, True)
        elif seen is not None and seen[1] and now - seen[0] < self.dedupe_s:
            # counted as forwarded when it left its source, then refused on arrival: not a connection
            self._seen[conn] = (now, False)
            edge_key = (*[node_id(flow, s)[0] for s in ("source", "destination")], dport or 0, protocol_of(flow))
            if edge_key in self.edges:
                self.edges[edge_key].forwarded -= 1
        src, src_info = node_id(flow, "source")
        dst, dst_info = node_id(flow, "destination")
        self.nodes.setdefault(src, {"id": src, **src_info})
        self.nodes.setdefault(dst, {"id": dst, **dst_info})
        key = (src, dst, dport or 0, protocol_of(flow))
        edge = self.edges.get(key) or self.edges.setdefault(key, Edge(src, dst, dport or 0, protocol_of(flow)))
        if dropped:
            edge.dropped += 1
            reason = flow.get("drop_reason_desc", "")
            edge.drop_reasons[reason] = edge.drop_reasons.get(reason, 0) + 1
        else:
            edge.forwarded += 1
        edge.last_seen = now
        edge.recent.append((now, dropped))
        self._prune(now)

    def _prune(self, now: float) -> None:
        if now - self._last_prune < 1.0:
            return
        self._last_prune = now
        self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self.dedupe_s}
        for edge in self.edges.values():
            while edge.recent and now - edge.recent[0][0] > self.window_s:
                edge.recent.popleft()

    def snapshot(self, now: float | None = None) -> dict[str, Any]:
        now = time.time() if now is None else now
        self._last_prune = 0.0
        self._prune(now)
        edges = []
        for e in self.edges.values():
            drops = sum(1 for _, d in e.recent if d)
            edges.append({"source": e.source, "destination": e.destination, "port": e.port, "protocol": e.protocol,
                          "forwarded": e.forwarded, "dropped": e.dropped, "drop_reasons": e.drop_reasons,
                          "rate": round((len(e.recent) - drops) / self.window_s, 3),
                          "drop_rate": round(drops / self.window_s, 3), "last_seen": e.last_seen})
        return {"nodes": sorted(self.nodes.values(), key=lambda n: n["id"]),
                "edges": sorted(edges, key=lambda e: (e["source"], e["destination"], e["port"]))}
