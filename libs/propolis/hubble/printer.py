"""`hubble observe`'s output formats: compact, dict, json, jsonpb, table.

Input is the GetFlowsResponse shape the relay streams: ``{"flow": …, "node_name", "time"}`` or
``{"lost_events": …}``.
"""

from __future__ import annotations

import sys
import time as _time
from typing import IO, Any

import orjson

from propolis.hubble.flow import OBSERVATION_POINTS, Flow, flow_ports
from propolis.maps.drop import DROP_REASONS
from propolis.maps.events import MATCH_TYPE_NAMES

FORMATS = ("compact", "dict", "json", "jsonpb", "table")
_DROP_TEXT = {r.hubble_name: r.text for r in DROP_REASONS.values()}


def short_time(rfc: str) -> str:
    """`2026-11-29T02:41:00.123456789Z` -> `Nov 29 02:41:00.123` like Hubble's StampMilli."""
    try:
        t = _time.strptime(rfc[:19], "%Y-%m-%dT%H:%M:%S")
    except ValueError:
        return rfc
    return _time.strftime("%b %d %H:%M:%S", t) + "." + rfc[20:23]


def endpoint_text(flow: Flow, side: str) -> str:
    ep = flow.get(side) or {}
    ip = (flow.get("IP") or {}).get(side, "")
    sport, dport = flow_ports(flow)
    port = sport if side == "source" else dport
    name = f"{ep['namespace']}/{ep['pod_name']}" if ep.get("pod_name") else ip or "?"
    if port:
        name = f"{name}:{port}"
    reserved = [lbl.split(":", 1)[1] for lbl in ep.get("labels") or [] if lbl.startswith("reserved:")]
    tag = f"({reserved[0]})" if reserved else f"(ID:{ep.get('identity', 0)})"
    return f"{name} {tag}"


def event_text(flow: Flow) -> str:
    etype = (flow.get("event_type") or {}).get("type")
    if etype == 1:
        desc = str(flow.get("drop_reason_desc") or "drop")
        return _DROP_TEXT.get(desc, desc)
    if etype == 5:
        match = MATCH_TYPE_NAMES.get(flow.get("policy_match_type", 0), "none")
        return f"policy-verdict:{match} {flow.get('traffic_direction', '')}"
    if etype == 4:
        point = flow.get("trace_observation_point", "")
        return point.lower().replace("_", "-") if point in OBSERVATION_POINTS.values() else "trace"
    if flow.get("l7"):
        return f"{(flow['l7'].get('type') or 'l7').lower()}"
    return str(etype)


def verdict_text(flow: Flow) -> str:
    verdict = str(flow.get("verdict", ""))
    if (flow.get("event_type") or {}).get("type") == 5 and verdict == "DROPPED":
        return "DENIED"
    return verdict


class Printer:
    def __init__(self, fmt: str = "compact", *, node_name: bool = False, out: IO[str] | None = None) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown output format {fmt!r}")
        self.fmt, self.node_name, self.out = fmt, node_name, out or sys.stdout
        self._table_header = False
        self._dict_first = True

    def _columns(self, resp: dict[str, Any]) -> list[str]:
        flow = resp["flow"]
        cols = [short_time(flow.get("time", ""))]
        if self.node_name:
            cols.append(flow.get("node_name", ""))
        src, dst = endpoint_text(flow, "source"), endpoint_text(flow, "destination")
        return cols + [src, dst, event_text(flow), verdict_text(flow), flow.get("Summary", "")]

    def write(self, resp: dict[str, Any]) -> None:
        if self.fmt == "jsonpb":
            self.out.write(orjson.dumps(resp).decode() + "\n")
            return
        if "lost_events" in resp:
            lost = resp["lost_events"]
            if self.fmt == "json":
                self.out.write(orjson.dumps(resp).decode() + "\n")
            else:
                self.out.write(f"EVENTS LOST: {lost.get('source')} CPU({lost.get('cpu', -1)}) "
                               f"{lost.get('num_events_lost')}\n")
            return
        flow = resp["flow"]
        if self.fmt == "json":
            self.out.write(orjson.dumps(flow).decode() + "\n")
        elif self.fmt == "compact":
            cols = self._columns(resp)
            head = f"{cols[0]} [{cols[1]}]" if self.node_name else cols[0]
            src, dst, event, verdict, summary = cols[-5:]
            arrow = f"{dst} <- {src}" if flow.get("is_reply") else f"{src} -> {dst}"
            self.out.write(f"{head}: {arrow} {event} {verdict} ({summary})\n")
        elif self.fmt == "table":
            names = ["TIMESTAMP"] + (["NODE"] if self.node_name else []) + ["SOURCE", "DESTINATION", "TYPE",
                                                                             "VERDICT", "SUMMARY"]
            widths = [19] + ([20] if self.node_name else []) + [40, 40, 28, 10, 0]
            if not self._table_header:
                self.out.write(_row(names, widths))
                self._table_header = True
            self.out.write(_row(self._columns(resp), widths))
        else:  # dict
            cols = self._columns(resp)
            keys = ["TIMESTAMP"] + (["NODE"] if self.node_name else []) + ["SOURCE", "DESTINATION", "TYPE",
                                                                            "VERDICT", "SUMMARY"]
            if not self._dict_first:
                self.out.write("------------\n")
            self._dict_first = False
            for k, v in zip(keys, cols):
                self.out.write(f"{k:>11}: {v}\n")

    def flush(self) -> None:
        self.out.flush()


def _row(cols: list[str], widths: list[int]) -> str:
    return "".join(c.ljust(w) + " " if w else c for c, w in zip(cols, widths)).rstrip() + "\n"
