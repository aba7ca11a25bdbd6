"""The one generic reconciler: make actual state (maps, devices, KV) match desired state.

Modelled on cilium/statedb's reconciler. Desired objects are upserted and
removed by key; each change bumps a revision. A loop applies pending keys
through a `Target` whose ``update`` is idempotent and whose ``delete`` treats
"missing" as success. A key failing with `PermanentError` (bad input, map
full) is marked FAILED with its reason and not retried until its desired
value changes (health: "N failed"); any other failure is retried with
per-key exponential back-off (100 ms -> 60 s) and counted in health
("N errors") until it heals. One key's failure never holds back the others.
Pruning — deleting actual objects nobody desires — runs only after
`mark_synced()` (every input has delivered its initial state), so a
restarting writer never removes live kernel state too early; then again on
every periodic refresh, which also repairs drift. ``wait_until_reconciled``
returns once every change up to a revision was *attempted* (statedb's
contract), with the keys that failed — so a caller never waits forever on
an object that cannot be applied.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from propolis.errors import PermanentError
from propolis.runtime.component import Component
from propolis.runtime.health import Health, State

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
V_contra = TypeVar("V_contra", contravariant=True)
log = logging.getLogger("propolis.reconcile")


class Target(Protocol[K, V_contra]):
    """``update`` is idempotent; ``delete`` treats missing as done; ``list_actual`` reads the kernel
    or the bus, never a cache (pruning trusts it). A target that diffs against what it last wrote may
    also define ``refresh(key, desired)``: the periodic refresh calls it instead of ``update`` to diff
    against the actual object, so a row removed behind the writer's back (bpftool) comes back."""

    async def update(self, key: K, desired: V_contra) -> None: ...
    async def delete(self, key: K) -> None: ...
    async def list_actual(self) -> Iterable[K]: ...


class Status(enum.Enum):
    PENDING = "pending"  # changed, not attempted yet
    DONE = "done"
    ERROR = "error"  # attempted, failed, retried with back-off
    FAILED = "failed"  # attempted, failed permanently: retried only when the desired value changes


@dataclass
class ObjectStatus:
    status: Status
    revision: int
    error: str = ""
    attempts: int = 0
    retry_at: float = 0.0


_ABSENT = object()
#: keys attempted between two yields to the event loop
YIELD_EVERY = 200


async def wait_event(event: asyncio.Event, timeout: float) -> None:
    """Until ``event`` is set or ``timeout`` seconds passed (inf: no limit). The loops' one way to sleep
    until woken: `asyncio.wait_for` on Python 3.11 can swallow a cancellation that arrives as the event
    is set, and the loop then never ends (a service that cannot stop)."""
    try:
        async with asyncio.timeout(None if timeout == float("inf") else timeout):
            await event.wait()
    except TimeoutError:
        pass


def backoff_delay(attempts: int, minimum: float = 0.1, maximum: float = 60.0) -> float:
    """Seconds before retry number ``attempts`` (1-based): exponential from ``minimum``, capped at ``maximum``.
    The one back-off of every desired->actual loop (reconcilers, the identity-allocator's queue)."""
    return min(maximum, minimum * 2.0 ** max(0, attempts - 1))


class Reconciler(Generic[K, V]):
    def __init__(self, name: str, target: Target[K, V], *, refresh_interval: float = 60.0,
                 backoff_min: float = 0.1, backoff_max: float = 60.0) -> None:
        self.name = name
        self.target = target
        self.refresh_interval = refresh_interval
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.desired: dict[K, V] = {}
        self.status: dict[K, ObjectStatus] = {}
        self._failing: set[K] = set()  # keys whose status is ERROR or FAILED (health reads them, not every key)
        self._pending: dict[K, Any] = {}  # key -> desired value or _ABSENT (delete)
        self.revision = 0
        self.synced = False
        self._wake = asyncio.Event()
        self._progress = asyncio.Condition()
        self._prune_due = False
        self._prune_failures = 0  # consecutive failures of list_actual: pruning backs off like a key
        self._prune_retry_at = 0.0
        self._refreshing: set[K] = set()  # pending keys queued by the periodic refresh, not by a change
        self.reconciled_revision = 0
        self.refreshes = 0  # completed refresh rounds (tests, /status)

    # --- desired state ----------------------------------------------------------------
    def upsert(self, key: K, desired: V) -> int:
        if key in self.desired and self.desired[key] == desired and key not in self._pending:
            return self.revision  # unchanged: nothing to do
        self.revision += 1
        self.desired[key] = desired
        self._pending[key] = desired
        self._refreshing.discard(key)
        self._set_pending(key)
        self._wake.set()
        return self.revision

    def remove(self, key: K) -> int:
        if key not in self.desired and key not in self._pending:
            return self.revision
        self.revision += 1
        self.desired.pop(key, None)
        self._pending[key] = _ABSENT
        self._refreshing.discard(key)
        self._set_pending(key)
        self._wake.set()
        return self.revision

    def replace_all(self, desired: dict[K, V]) -> int:
        """Set the whole desired table: upserts what changed, removes what is gone."""
        for key in [k for k in self.desired if k not in desired]:
            self.remove(key)
        for key, value in desired.items():
            self.upsert(key, value)
        return self.revision

    def mark_synced(self) -> None:
        """All inputs delivered their initial state: pruning is now safe."""
        if not self.synced:
            self.synced = True
            self._prune_due = True
            self._wake.set()

    # --- observation ------------------------------------------------------------------
    def idle(self) -> bool:
        """Nothing left to attempt: no change, retry, refresh or prune pending (failed keys stay failed).
        What a writer checks before announcing that the actual state covers the desired one."""
        return not self._pending and not self._prune_due

    def pending_summary(self) -> str:
        """What keeps the reconciler from being idle, in words ("" when idle): for health messages."""
        parts = []
        if self._pending:
            key = next(iter(self._pending))
            st = self.status.get(key)
            parts.append(f"{len(self._pending)} pending (e.g. {key}: {st.status.value if st else 'new'}"
                         f"{', ' + st.error if st is not None and st.error else ''})")
        if self._prune_due:
            parts.append("a prune is due" + (" (listing failed, retrying)" if self._prune_failures else ""))
        return f"{self.name}: " + "; ".join(parts) if parts else ""

    def errors(self) -> dict[K, str]:
        """Every key whose last attempt failed (retrying or failed for good), with the reason."""
        return {k: self.status[k].error for k in self._failing}

    def failed(self) -> dict[K, str]:
        """Keys failed permanently: not retried until their desired value changes."""
        return {k: self.status[k].error for k in self._failing if self.status[k].status is Status.FAILED}

    def _set_pending(self, key: K) -> None:
        self.status[key] = ObjectStatus(Status.PENDING, self.revision)
        self._failing.discard(key)

    def health(self) -> Health:
        failed = self.failed()
        retrying = {k: e for k, e in self.errors().items() if k not in failed}
        parts = [f"{len(d)} {what} (e.g. {next(iter(d))}: {next(iter(d.values()))})"
                 for d, what in ((failed, "failed"), (retrying, "errors")) if d]
        if parts:
            return Health.degraded(f"{self.name}: {'; '.join(parts)}")
        if not self.synced:
            return Health.ok(f"{self.name}: waiting for inputs to sync")
        return Health.ok()

    async def wait_until_reconciled(self, revision: int | None = None, timeout: float = 10.0) -> dict[K, str]:
        """Wait until every change up to ``revision`` (default: the latest) was attempted; returns the
        keys whose attempt failed, with the reason. Raises TimeoutError after ``timeout`` seconds."""
        target = self.revision if revision is None else revision
        async with self._progress:
            await asyncio.wait_for(self._progress.wait_for(lambda: self.reconciled_revision >= target), timeout)
        return self.errors()

    # --- the loop ---------------------------------------------------------------------
    async def run(self) -> None:
        next_refresh = time.monotonic() + self.refresh_interval
        while True:
            now = time.monotonic()
            if now >= next_refresh:
                self.queue_refresh()
                next_refresh = now + self.refresh_interval
            await self.reconcile_once()
            delay = min([next_refresh - time.monotonic()] +
                        [max(0.0, self.status[k].retry_at - time.monotonic()) for k in self._failing
                         if self.status[k].status is Status.ERROR and k in self._pending] +
                        ([max(0.0, self._prune_retry_at - time.monotonic())] if self._prune_due else []))
            self._wake.clear()
            if self._prune_ready() or any(self._due(k) for k in self._pending):
                continue  # a change (or mark_synced) came while this pass ran: its wake-up was just cleared
            await wait_event(self._wake, max(delay, 0.01))

    def queue_refresh(self) -> None:
        """Repair drift: every desired key is applied again against the actual object (a failed key
        waits for a change), and actual objects nobody desires are pruned (once synced)."""
        self._prune_due = self.synced
        for key, value in self.desired.items():
            st = self.status.get(key)
            if key not in self._pending and (st is None or st.status is not Status.FAILED):
                self._pending[key] = value
                self._refreshing.add(key)
        self.refreshes += 1
        self._wake.set()

    def _due(self, key: K) -> bool:
        st = self.status.get(key)
        return st is None or st.status is not Status.ERROR or st.retry_at <= time.monotonic()

    def _note_failing(self, key: K, st: ObjectStatus) -> None:
        if self.status.get(key) is st:  # not replaced by a newer change meanwhile
            self._failing.add(key)

    def _prune_ready(self) -> bool:
        return self._prune_due and self._prune_retry_at <= time.monotonic()

    async def reconcile_once(self) -> None:
        if self._prune_ready():
            await self._prune()
        due = [k for k in list(self._pending) if self._due(k)]
        # deletes first: they free room in a full map, and a reader never sees the old and the new side by side
        due.sort(key=lambda k: self._pending[k] is not _ABSENT)
        for n, key in enumerate(due):
            if n % YIELD_EVERY == YIELD_EVERY - 1:
                await asyncio.sleep(0)  # a refresh round of thousands of keys that need no write: let others in
            value = self._pending[key]
            st = self.status.setdefault(key, ObjectStatus(Status.PENDING, self.revision))
            try:
                if value is _ABSENT:
                    await self.target.delete(key)
                elif key in self._refreshing and hasattr(self.target, "refresh"):
                    await self.target.refresh(key, value)
                else:
                    await self.target.update(key, value)
            except Exception as exc:  # noqa: BLE001 - any failure: this key only, keep going with the others
                st.attempts += 1
                st.error = str(exc) or type(exc).__name__
                what = "delete" if value is _ABSENT else "update"
                if isinstance(exc, PermanentError) and value is not _ABSENT:
                    st.status = Status.FAILED  # retrying will not help: wait for a new desired value
                    self._note_failing(key, st)
                    if self._pending.get(key) is value:
                        del self._pending[key]
                    log.error("%s: %s %r failed permanently: %s", self.name, what, key, st.error)
                    continue
                st.status = Status.ERROR
                self._note_failing(key, st)
                st.retry_at = time.monotonic() + backoff_delay(st.attempts, self.backoff_min, self.backoff_max)
                log.warning("%s: %s %r failed (attempt %d): %s", self.name, what, key, st.attempts, st.error)
                continue
            if self._pending.get(key) is value:
                del self._pending[key]
                self._refreshing.discard(key)
                if value is _ABSENT:
                    self.status.pop(key, None)
                else:
                    st.status, st.error, st.attempts = Status.DONE, "", 0
                self._failing.discard(key)
        await self._advance()

    async def _prune(self) -> None:
        try:
            actual = list(await self.target.list_actual())
        except Exception as exc:  # noqa: BLE001 - a target that cannot list: prune later, with back-off
            self._prune_failures += 1
            self._prune_retry_at = time.monotonic() + backoff_delay(self._prune_failures, self.backoff_min,
                                                                    self.backoff_max)
            log.warning("%s: listing actual state failed (attempt %d): %s", self.name, self._prune_failures, exc)
            return
        self._prune_due = False
        self._prune_failures = 0
        for key in actual:
            if key not in self.desired and key not in self._pending:
                self._pending[key] = _ABSENT
                self._set_pending(key)
        if any(v is _ABSENT for v in self._pending.values()):
            self._wake.set()

    async def _advance(self) -> None:
        """Move `reconciled_revision` up to just before the oldest change not attempted yet."""
        pending_revs = [self.status[k].revision for k in self._pending
                        if k in self.status and self.status[k].status is Status.PENDING]
        reached = (min(pending_revs) - 1) if pending_revs else self.revision
        if reached != self.reconciled_revision:
            self.reconciled_revision = max(self.reconciled_revision, reached)
            async with self._progress:
                self._progress.notify_all()


class ReconciledComponent(Component):
    """A component whose health, once started, is its reconciler's (failed keys, retrying errors).
    `reconciler` is None until start where it needs the bus (a KV target)."""

    reconciler: Reconciler[Any, Any] | None = None

    @property
    def health(self) -> Health:
        own = super().health
        if self.reconciler is None or own.state is not State.OK or own.reason == "starting":
            return own
        return self.reconciler.health()

    @health.setter
    def health(self, value: Health) -> None:
        self._health = value
