"""Leader election through a NATS KV lease (compare-and-set on the lease key's revision).

Replicas of a cluster-wide service (k8s-watcher, identity GC) race to create or
take over an expired lease; the holder renews it every third of its duration.
Losing a renewal race (Conflict) or failing to renew before expiry means the
holder stops acting as leader at once. A holder that stops deletes the lease
(``release``), and standbys watch the key, so a restarted instance or a standby
takes over at once instead of waiting for the lease to expire.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from propolis.bus.kv import Conflict, EventType, Kv
from propolis.bus.messages import Lease
from propolis.errors import TemporaryError

log = logging.getLogger("propolis.lease")


class LeaseElector:
    def __init__(self, kv: Kv, key: str, holder: str, *, duration: float = 10.0,
                 on_change: Callable[[bool], None] | None = None) -> None:
        self.kv = kv
        self.key = key
        self.holder = holder
        self.duration = duration
        self.on_change = on_change
        self.is_leader = False
        self._revision = 0
        self._expires_local = 0.0

    async def try_acquire(self) -> bool:
        now = time.time()
        record = Lease(self.holder, now, self.duration)
        try:
            current = await self.kv.get(self.key)
            if current is None:
                self._revision = await self.kv.create(self.key, record)
            elif not isinstance(current.value, Lease):  # another message where the lease belongs: repair it
                log.error("lease %s holds a %s, not a Lease: taking it over", self.key, type(current.value).__name__)
                self._revision = await self.kv.update(self.key, record, current.revision)
            elif current.value.holder == self.holder or current.value.renewed_at + current.value.duration_s < now:
                self._revision = await self.kv.update(self.key, record, current.revision)
            else:
                return self._set(False)
        except (Conflict, TemporaryError) as exc:
            log.debug("lease %s: %s", self.key, exc)
            return self._set(False)
        self._expires_local = time.monotonic() + self.duration
        return self._set(True)

    async def renew(self) -> bool:
        if not self.is_leader:
            return await self.try_acquire()
        try:
            self._revision = await self.kv.update(self.key, Lease(self.holder, time.time(), self.duration),
                                                  self._revision)
            self._expires_local = time.monotonic() + self.duration
            return True
        except Conflict:  # somebody else holds it now, or the key vanished (bucket purged): take it if free
            self._set(False)
            return await self.try_acquire()
        except Exception as exc:  # noqa: BLE001 - NATS away: we stay leader only while the lease would still hold
            if time.monotonic() >= self._expires_local:
                log.warning("lease %s expired while NATS unreachable: %s", self.key, exc)
                return self._set(False)
            return True

    async def run(self) -> None:
        released = asyncio.Event()
        watch = asyncio.ensure_future(self._watch_release(released))
        try:
            while True:
                released.clear()
                await self.renew()
                try:
                    await asyncio.wait_for(released.wait(), self.duration / 3)
                except TimeoutError:
                    pass
        finally:
            watch.cancel()
            with contextlib.suppress(BaseException):
                await watch

    async def _watch_release(self, released: asyncio.Event) -> None:
        """Wake a standby the moment the holder releases (deletes) the lease."""
        while True:
            try:
                async for ev in self.kv.watch(self.key):
                    if ev.type is EventType.DELETE and not self.is_leader:
                        released.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - NATS away: polling still works; watch again shortly
                log.debug("lease %s watch: %s", self.key, exc)
                await asyncio.sleep(1.0)

    async def release(self) -> None:
        """Give the lease up (on shutdown) so the next holder need not wait for it to expire."""
        if self.is_leader:
            try:
                await self.kv.delete(self.key, self._revision)
                log.info("lease %s released", self.key)
            except Exception as exc:  # noqa: BLE001 - the lease expires by itself
                log.warning("lease %s not released (it expires in %.0fs): %s", self.key, self.duration, exc)
        self._set(False)

    def _set(self, leader: bool) -> bool:
        if leader != self.is_leader:
            self.is_leader = leader
            log.info("lease %s: %s", self.key, "acquired" if leader else "not leader")
            if self.on_change:
                self.on_change(leader)
        return leader
