"""Hubble Exporter: flows to a JSON-lines file with size-based rotation and allow/deny filters.

Each line is what Hubble's exporter writes, a GetFlowsResponse: ``{"flow": {...}, "node_name": …,
"time": …}`` (lost events as ``{"lost_events": {...}, …}``). When a write would take the file past
`max_size_mb` it is renamed `<file>.1` (older backups shift to `.2` …; beyond `max_backups`
they are deleted) and a new file starts — numbered instead of lumberjack's timestamped names,
so the newest backup is always `.1`. `field_mask` keeps only the listed (dotted) flow fields.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson

from propolis.errors import ValidationError
from propolis.hubble.filters import FlowFilter, FlowMatcher
from propolis.hubble.flow import Flow


def parse_filter_list(text: str, what: str) -> list[FlowFilter]:
    """Cilium's `hubble.export.static.allowList` / `denyList`: a JSON list of FlowFilters
    (one object alone is accepted too)."""
    if not text.strip():
        return []
    try:
        doc = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ValidationError(what, f"not JSON: {exc}") from None
    doc = [doc] if isinstance(doc, dict) else doc
    if not isinstance(doc, list) or not all(isinstance(d, dict) for d in doc):
        raise ValidationError(what, "must be a JSON list of flow filters")
    FlowMatcher(doc)  # validate field names and values now, not at the first flow
    return doc


def apply_field_mask(flow: Flow, paths: Iterable[str]) -> Flow:
    out: dict[str, Any] = {}
    for path in paths:
        src: Any = flow
        parts = path.split(".")
        for p in parts:
            if not isinstance(src, dict) or p not in src:
                break
            src = src[p]
        else:
            dst = out
            for p in parts[:-1]:
                dst = dst.setdefault(p, {})
            dst[parts[-1]] = src
    return out


class FlowExporter:
    """A FlowSink writing matching flows to `path`, rotating by size."""

    def __init__(self, path: str | os.PathLike[str], *, max_size_mb: float = 10, max_backups: int = 5,
                 allow: Iterable[FlowFilter] = (), deny: Iterable[FlowFilter] = (),
                 field_mask: Iterable[str] = ()) -> None:
        if max_size_mb <= 0:
            raise ValidationError("hubble_export_file_max_size_mb", "must be > 0")
        if max_backups < 0:
            raise ValidationError("hubble_export_file_max_backups", "must be >= 0")
        self.path = Path(path)
        self.max_bytes = int(max_size_mb * 1024 * 1024)
        self.max_backups = max_backups
        self.matcher = FlowMatcher(allow, deny)
        self.field_mask = list(field_mask)
        self.exported = 0
        self.rotations = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "ab")
        self._size = self._file.tell()

    def process(self, flow: Flow) -> None:
        if not self.matcher(flow):
            return
        body = apply_field_mask(flow, self.field_mask) if self.field_mask else flow
        self.write({"flow": body, "node_name": flow.get("node_name", ""), "time": flow.get("time", "")})
        self.exported += 1

    def lost(self, source: str, n: int, node: str, time: str) -> None:
        self.write({"lost_events": {"source": source, "num_events_lost": n}, "node_name": node, "time": time})

    def write(self, doc: dict[str, Any]) -> None:
        line = orjson.dumps(doc) + b"\n"
        if self._size and self._size + len(line) > self.max_bytes:
            self.rotate()
        self._file.write(line)
        self._size += len(line)

    def rotate(self) -> None:
        self._file.close()
        backups = [self.path.with_name(f"{self.path.name}.{i}") for i in range(1, self.max_backups + 1)]
        if backups:
            if backups[-1].exists():
                backups[-1].unlink()
            for older, newer in zip(reversed(backups), reversed(backups[:-1])):
                if newer.exists():
                    newer.rename(older)
            self.path.rename(backups[0])
        else:
            self.path.unlink()
        self.rotations += 1
        self._file = open(self.path, "ab")
        self._size = 0

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
