"""A consumer's gate on an owned bucket: changes count only once the owner's watermark covers them.

A bucket can lose its contents while everything runs (a stream purge, keys purged one by one,
NATS restarted without its store). A KV watch shows that as deletes, which per key look exactly
like the owner deleting objects; acting on them would prune every policy. So a consumer does not
act on a change when it arrives: the owner writes its ``Watermark`` behind its own writes, and
the gate holds every change until a watermark arrives after it, then releases them (the latest
value per key, diffed against what it released before).

A key *purged* (rather than deleted: owners delete, purges come from an operator's tool) is held
back until the owner rewrites it or writes a watermark of a new epoch, so a bucket purged key by
key is not acted on even if an owner's watermark slips in before the purge reaches it.

A watermark that disappears means the bucket lost its contents: the gate shuts (``lost``) and
releases nothing until the owner writes a watermark with a *new epoch*, which it does only after
refilling the whole bucket; what was released before stays in force meanwhile, and the refill
is then diffed against it (re-sync, never prune). A normal delete by the owner is followed by its
watermark (same epoch) and goes through.

The owner's side of the contract: before the first watermark of a new epoch, every key it keeps was
written again after the epoch was picked, not only the keys its snapshot found missing. A snapshot
(a takeover's load, a repair round) may predate a purge still running, and a purged key the new
epoch did not rewrite is released here as gone (KvMirror and the identity allocator do this).
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, field
from typing import Any

from propolis.bus import subjects
from propolis.bus.kv import EventType, KvEvent
from propolis.bus.messages import Watermark

log = logging.getLogger("propolis.bus.watermark")

_ABSENT = object()


def new_epoch() -> str:
    """A bucket owner's epoch: picked whenever it (re)fills its bucket (see messages.Watermark)."""
    return secrets.token_hex(8)


@dataclass
class WatermarkGate:
    bucket: str
    released: dict[str, Any] = field(default_factory=dict)  # key -> value the consumer acts on
    pending: dict[str, KvEvent] = field(default_factory=dict)  # key -> its latest event since
    held: dict[str, KvEvent] = field(default_factory=dict)  # purged keys: released only by a new epoch
    watermark: Watermark | None = None  # the last released watermark
    lost: bool = False  # the watermark vanished: waiting for the owner's new epoch
    synced: bool = False  # the watch delivered its initial values
    resyncs: int = 0  # releases under a new epoch after the bucket was lost

    @property
    def ready(self) -> bool:
        """The consumer may act (and prune): initial values seen, a watermark released, not lost."""
        return self.synced and self.watermark is not None and not self.lost

    @property
    def resource_version(self) -> int:
        return self.watermark.resource_version if self.watermark is not None else 0

    def feed(self, ev: KvEvent) -> list[KvEvent] | None:
        """Take one watch event; returns the changes to act on when a watermark released them
        (possibly none), else None."""
        if ev.type is EventType.SYNCED:
            self.synced = True
            return None
        if ev.key == subjects.WATERMARK_KEY:
            return self._on_watermark(ev)
        if ev.type is EventType.DELETE and ev.purged:
            self.pending.pop(ev.key, None)
            self.held[ev.key] = ev
        else:
            self.held.pop(ev.key, None)
            self.pending[ev.key] = ev
        return None

    def release_unconfirmed(self) -> list[KvEvent]:
        """Everything the bucket holds, watermark or not (read-only tools showing the bucket)."""
        self.pending.update(self.held)
        self.held.clear()
        return self._release()

    def _on_watermark(self, ev: KvEvent) -> list[KvEvent] | None:
        if ev.type is not EventType.PUT:
            if self.watermark is not None and not self.lost:
                self.lost = True
                log.error("%s: the owner's watermark vanished (bucket purged or its store lost): keeping the "
                          "last state (%d keys) and waiting for the owner to refill it under a new epoch",
                          self.bucket, len(self.released))
            return None
        mark = ev.value
        if not isinstance(mark, Watermark):
            log.error("%s: %s holds a %s, not a Watermark: ignored", self.bucket, ev.key, type(mark).__name__)
            return None
        if self.lost and self.watermark is not None and mark.epoch == self.watermark.epoch:
            log.warning("%s: watermark %d of the lost epoch %r does not cover a refill: still waiting",
                        self.bucket, mark.resource_version, mark.epoch)
            return None
        was_lost, previous = self.lost, self.watermark
        if previous is None or previous.epoch != mark.epoch:
            self.pending.update(self.held)  # the owner refilled its bucket: what it did not rewrite is gone
            self.held.clear()
        changes = self._release()
        self.watermark, self.lost = mark, False
        if was_lost:
            self.resyncs += 1
        if was_lost or (previous is not None and previous.epoch != mark.epoch):
            log.warning("%s: re-synced under epoch %r (was %r): %d changes", self.bucket, mark.epoch,
                        previous.epoch if previous else None, len(changes))
        return changes

    def _release(self) -> list[KvEvent]:
        changes: list[KvEvent] = []
        for key, ev in self.pending.items():
            if ev.type is not EventType.PUT:
                if self.released.pop(key, _ABSENT) is not _ABSENT:
                    changes.append(ev)
            elif self.released.get(key, _ABSENT) != ev.value:
                self.released[key] = ev.value
                changes.append(ev)
        self.pending.clear()
        return changes
