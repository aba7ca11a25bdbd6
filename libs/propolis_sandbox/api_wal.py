"""The sandbox API's store on disk, as etcd keeps it: a snapshot plus an append-only log of every commit.

Why: a killed API server must come back with the same objects and with
resourceVersions that keep going up; an empty store on restart made the
k8s-watcher mirror "nothing" onto the bus and every policy was pruned.

Writes stay cheap: each commit is one JSON line handed to the kernel at once
(`os.write`, so a SIGKILL right after the answer loses nothing), and made
durable by group commit: a writer awaits `sync()` before answering, and one
`fsync` in a thread covers every line written before it started. At start the
snapshot is loaded, the log lines after its revision are replayed (a torn last
line, from a kill in the middle of a write that was never answered, is
dropped), then a fresh snapshot is written and the log emptied; the same
compaction runs every `compact_every` lines.

Files under the data directory (`<run dir>/apiserver-store/`): `snapshot.json`
({"rv", "objects": [[group, plural, object]…]}) and `wal.jsonl` (one line per
commit: {"rv", "g", "r", "t": ADDED|MODIFIED|DELETED, "o"}).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger("propolis_sandbox.api.wal")

Obj = dict[str, Any]
ResourceKey = tuple[str, str]  # (group, plural)
ObjectKey = tuple[str, str]  # (namespace or "", name)
Objects = dict[ResourceKey, dict[ObjectKey, Obj]]
SNAPSHOT_FILE = "snapshot.json"
LOG_FILE = "wal.jsonl"
DEFAULT_COMPACT_EVERY = 20000


def object_key(obj: Obj) -> ObjectKey:
    meta = obj.get("metadata") or {}
    return (meta.get("namespace") or "", meta.get("name", ""))


class Wal:
    """Snapshot + log in one directory; `load()` once, then `start()`, then `append()` per commit."""

    def __init__(self, directory: str | Path, *, compact_every: int = DEFAULT_COMPACT_EVERY) -> None:
        self.directory = Path(directory)
        self.compact_every = compact_every
        self.snapshot_source: Callable[[], tuple[int, Iterable[tuple[ResourceKey, Obj]]]] | None = None
        self._fd = -1
        self._lines = 0  # lines in the log since the last snapshot
        self._written = 0  # appends so far
        self._synced = 0  # appends known to be on disk
        self._syncing: asyncio.Future[None] | None = None

    # --- start -----------------------------------------------------------------------------
    def load(self) -> tuple[int, Objects]:
        """The last committed revision and every object as of it (0 and nothing for a new directory)."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        rv: int = 0
        objects: Objects = {}
        snapshot = self.directory / SNAPSHOT_FILE
        if snapshot.exists():
            doc = orjson.loads(snapshot.read_bytes())
            rv = int(doc["rv"])
            for group, plural, obj in doc["objects"]:
                objects.setdefault((group, plural), {})[object_key(obj)] = obj
        replayed = 0
        wal = self.directory / LOG_FILE
        if wal.exists():
            lines = wal.read_bytes().split(b"\n")
            for i, line in enumerate(lines):
                if not line.strip():
                    continue
                try:
                    record = orjson.loads(line)
                except orjson.JSONDecodeError:
                    if any(rest.strip() for rest in lines[i + 1:]):
                        raise RuntimeError(f"{wal}: line {i + 1} is corrupt and is not the last one") from None
                    log.warning("%s: dropping a torn last line (a write cut by a kill, never answered)", wal)
                    break
                if record["rv"] <= rv:
                    continue  # already in the snapshot (a compaction was cut between its two steps)
                rv = record["rv"]
                bucket = objects.setdefault((record["g"], record["r"]), {})
                if record["t"] == "DELETED":
                    bucket.pop(object_key(record["o"]), None)
                else:
                    bucket[object_key(record["o"])] = record["o"]
                replayed += 1
        if rv:
            log.info("store loaded from %s: resourceVersion %d, %d objects (%d log lines replayed)", self.directory,
                     rv, sum(len(b) for b in objects.values()), replayed)
        return rv, objects

    def start(self, snapshot_source: Callable[[], tuple[int, Iterable[tuple[ResourceKey, Obj]]]]) -> None:
        """Compact what `load` read into a fresh snapshot and open an empty log for appends."""
        self.snapshot_source = snapshot_source
        self._fd = os.open(self.directory / LOG_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self.compact()

    # --- writing ---------------------------------------------------------------------------
    def append(self, rv: int, resource: ResourceKey, etype: str, obj: Obj) -> None:
        """Hand one commit to the kernel now (survives a kill of this process); `sync()` makes it durable."""
        if etype == "DELETED":
            meta = obj.get("metadata") or {}
            obj = {"metadata": {k: meta[k] for k in ("namespace", "name") if k in meta}}
        line = orjson.dumps({"rv": rv, "g": resource[0], "r": resource[1], "t": etype, "o": obj}) + b"\n"
        view = memoryview(line)
        while view:
            view = view[os.write(self._fd, view):]
        self._written += 1
        self._lines += 1
        if self._lines >= self.compact_every:
            self.compact()

    async def sync(self) -> None:
        """Return once every line appended before the call is on disk (one fsync serves every waiter)."""
        target = self._written
        while self._synced < target and self._fd >= 0:
            if self._syncing is None:
                self._syncing = asyncio.ensure_future(self._fsync())
            await asyncio.shield(self._syncing)

    async def _fsync(self) -> None:
        upto = self._written
        try:
            await asyncio.to_thread(os.fsync, self._fd)
            self._synced = max(self._synced, upto)
        finally:
            self._syncing = None

    def compact(self) -> None:
        """Write the whole store as the snapshot (atomically), then empty the log it covers."""
        assert self.snapshot_source is not None
        rv, items = self.snapshot_source()
        body = orjson.dumps({"rv": rv, "objects": [[group, plural, obj] for (group, plural), obj in items]})
        tmp = self.directory / f".{SNAPSHOT_FILE}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(body)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        tmp.replace(self.directory / SNAPSHOT_FILE)
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        os.ftruncate(self._fd, 0)
        self._lines = 0
        self._synced = self._written  # everything so far is in the fsync'd snapshot

    def close(self) -> None:
        if self._fd >= 0:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
