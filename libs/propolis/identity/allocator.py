"""Allocate one numeric identity per distinct label set, agreed by racing replicas.

Keys in PROPOLIS_IDENTITIES_V1 (the identity-allocator's slice):

* ``id.<n>``        -> IdentityRecord   (claims the number)
* ``labels.<hash>`` -> IdentityIndex    (the label set's number: the point of agreement)
* ``endpoints.<ns>.<pod>`` -> EndpointRecord

Allocation: read ``labels.<hash>``; if absent, claim a free number with a
create-only write of ``id.<n>`` (a lost race just moves to the next number;
each replica starts its search at a random number, as Cilium picks random free
IDs, so replicas rarely contend for the same number),
then create ``labels.<hash>``. If another replica created the index first,
release our number and use theirs — every replica ends with the same answer.
Numbers are cluster-local 256..65535 ORed with ``cluster_id << 16`` like
Cilium's; reserved identities keep Cilium's numbers.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Iterable

from propolis.bus import subjects
from propolis.bus.kv import Conflict, Kv
from propolis.bus.messages import IdentityIndex, IdentityRecord
from propolis.errors import TemporaryError
from propolis.model.types import NumericIdentity

log = logging.getLogger("propolis.identity")

MIN_CLUSTER_LOCAL = 256
MAX_CLUSTER_LOCAL = 65535


def labels_hash(labels: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(sorted(labels)).encode()).hexdigest()[:40]


class IdentityAllocator:
    def __init__(self, kv: Kv, *, cluster_id: int = 0) -> None:
        self.kv = kv
        self.cluster_id = cluster_id
        self.used: set[NumericIdentity] = set()
        self._cursor = random.randint(MIN_CLUSTER_LOCAL, MAX_CLUSTER_LOCAL)
        self.allocations = 0
        self.conflicts = 0

    def number(self, local: int) -> NumericIdentity:
        return NumericIdentity((self.cluster_id << 16) | local)

    def note_used(self, identity: NumericIdentity) -> None:
        self.used.add(identity)

    def note_free(self, identity: NumericIdentity) -> None:
        self.used.discard(identity)

    async def load(self) -> None:
        for entry in (await self.kv.items(subjects.IDENTITY_KEYS)).values():
            if isinstance(entry.value, IdentityRecord):
                self.used.add(NumericIdentity(entry.value.id))

    def _candidate(self) -> NumericIdentity:
        span = MAX_CLUSTER_LOCAL - MIN_CLUSTER_LOCAL + 1
        for _ in range(span):
            local = self._cursor
            self._cursor = MIN_CLUSTER_LOCAL + (self._cursor - MIN_CLUSTER_LOCAL + 1) % span
            if self.number(local) not in self.used:
                return self.number(local)
        raise TemporaryError("identity space exhausted (65280 cluster-local identities in use)")

    async def lookup(self, labels: list[str]) -> NumericIdentity | None:
        entry = await self.kv.get(subjects.identity_labels_key(labels_hash(labels)))
        return NumericIdentity(entry.value.id) if entry is not None else None

    async def allocate(self, labels: list[str]) -> NumericIdentity:
        labels = sorted(labels)
        index_key = subjects.identity_labels_key(labels_hash(labels))
        for _ in range(1000):
            entry = await self.kv.get(index_key)
            if entry is not None:
                agreed = NumericIdentity(int(entry.value.id))
                self.used.add(agreed)
                return agreed
            number = self._candidate()
            try:
                await self.kv.create(subjects.identity_key(number), IdentityRecord(number, labels))
            except Conflict:
                self.used.add(number)  # someone holds it; try the next number
                self.conflicts += 1
                continue
            self.used.add(number)
            try:
                await self.kv.create(index_key, IdentityIndex(number, labels))
            except Conflict:
                self.conflicts += 1
                await self.kv.delete(subjects.identity_key(number))  # lost the race for this label set: theirs stands
                self.used.discard(number)
                continue
            self.allocations += 1
            log.info("allocated identity %d for %s", number, ",".join(labels))
            return number
        raise TemporaryError(f"could not allocate an identity for {labels} after 1000 attempts")

    async def release(self, identity: NumericIdentity, labels: list[str]) -> bool:
        """Delete an unused identity (GC). The index goes first, compare-and-set, so a label set
        is never left pointing at a number that is gone."""
        index_key = subjects.identity_labels_key(labels_hash(labels))
        entry = await self.kv.get(index_key)
        if entry is not None and entry.value.id == identity:
            try:
                await self.kv.delete(index_key, entry.revision)
            except Conflict:
                return False
        await self.kv.delete(subjects.identity_key(identity))
        self.used.discard(identity)
        return True

    async def restore(self, identity: NumericIdentity, labels: list[str]) -> bool:
        """Re-create ``id.<n>`` and its label index where they are missing (a purged bucket keeps
        every pod's number); another replica's record already there stands. True if it wrote."""
        labels = sorted(labels)
        wrote = False
        for key, record in ((subjects.identity_key(identity), IdentityRecord(identity, labels)),
                            (subjects.identity_labels_key(labels_hash(labels)), IdentityIndex(identity, labels))):
            try:
                await self.kv.create(key, record)
                wrote = True
            except Conflict:
                pass
        self.used.add(identity)
        return wrote

    async def rewrite(self, identity: NumericIdentity, labels: list[str]) -> None:
        """Put ``id.<n>`` and its label index again (an owner's new epoch rewrites every key it keeps: see
        identity/sync.py); the number is already ours, agreed by ``allocate``'s compare-and-set."""
        labels = sorted(labels)
        await self.kv.put(subjects.identity_key(identity), IdentityRecord(identity, labels))
        await self.kv.put(subjects.identity_labels_key(labels_hash(labels)), IdentityIndex(identity, labels))
        self.used.add(identity)

    async def ensure_reserved(self, reserved: dict[NumericIdentity, list[str]]) -> None:
        for number, labels in reserved.items():
            existing = await self.kv.get(subjects.identity_key(number))
            if existing is None:
                try:
                    await self.kv.create(subjects.identity_key(number), IdentityRecord(number, labels, reserved=True))
                except Conflict:
                    pass
