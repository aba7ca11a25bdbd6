"""Reading the heartbeats every service instance publishes (runtime/service.py writes them).

An instance that missed `STALE_BEATS` beats in a row is not live: one late beat is noise, three are a dead
or hung process. `propolis status`, the Hubble client, the CLI and the sandbox all judge liveness with
these same functions, so they never disagree about which instances are up.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any

import nats.errors

from propolis.bus import subjects
from propolis.bus.connection import Bus
from propolis.bus.messages import Heartbeat
from propolis.errors import TemporaryError
from propolis.runtime.settings import CommonSettings

#: Missed beats before an instance is stale: one late beat is noise, three are a dead or hung process.
STALE_BEATS = 3
#: The interval of an instance that does not say its own (heartbeat schema 1.0).
DEFAULT_HEARTBEAT_INTERVAL_S: float = CommonSettings.heartbeat_interval
#: What one `read_heartbeats` meets while a NATS cluster has no leader for the heartbeat stream (a server died:
#: its Raft group elects another after several seconds, more on a loaded machine): JetStream requests time out.
READ_UNANSWERED = (TimeoutError, TemporaryError, nats.errors.Error)
READ_AGAIN_AFTER_S = 0.25


def stale_after(hb: Heartbeat, override: float | None = None) -> float:
    return override or STALE_BEATS * (hb.interval or DEFAULT_HEARTBEAT_INTERVAL_S)


def is_live(hb: Heartbeat, now: float, override: float | None = None) -> bool:
    return now - hb.sent_at <= stale_after(hb, override)


async def read_heartbeats(bus: Bus, malformed: dict[str, str] | None = None) -> list[Heartbeat]:
    """Every instance's last heartbeat (KV `PROPOLIS_HEARTBEATS_V1`), live or not: callers judge with `is_live`.
    One that does not decode is left out (and named in ``malformed``, key -> why, when given)."""
    kv = await bus.kv(subjects.HEARTBEATS_BUCKET)
    return [e.value for e in (await kv.items(refused=malformed)).values() if isinstance(e.value, Heartbeat)]


async def read_heartbeats_answered(bus: Bus, *, unanswered: Callable[[str], None] | None = None) -> list[Heartbeat]:
    """`read_heartbeats`, read again while NATS does not answer (`READ_UNANSWERED`), for the loops that wait for
    progress (`sandbox wait/up`, `connectivity test --kubeconfig`): they end at their own deadline (the caller's
    `asyncio.wait_for`), not at the first unanswered read — that ended `sandbox wait` 5 s after a server was killed,
    saying "within 60s: no heartbeats read (nats: timeout)". ``unanswered`` hears why a read went unanswered
    (and "" once one is answered), for the caller's timeout message."""
    while True:
        try:
            heartbeats = await read_heartbeats(bus)
        except READ_UNANSWERED as exc:
            if unanswered is not None:
                unanswered(str(exc) or type(exc).__name__)
            await asyncio.sleep(READ_AGAIN_AFTER_S)
            continue
        if unanswered is not None:
            unanswered("")
        return heartbeats


def revision_at_least(have: Any, want: str) -> bool:
    """Has a reporter caught up with resourceVersion ``want`` (its progress["k8s_resource_version"] is
    ``have``)? Numeric where both are, else equal: `sandbox wait` and `connectivity test` judge alike."""
    have_s = str(have or "")
    if have_s.isdigit() and want.isdigit():
        return int(have_s) >= int(want)
    return have_s == want and bool(want)


def newest(heartbeats: Iterable[Heartbeat], service: str, node: str | None = None) -> Heartbeat | None:
    """The latest heartbeat of `service` (on `node`, when given)."""
    mine = [hb for hb in heartbeats if hb.service == service and node in (None, hb.node)]
    return max(mine, key=lambda hb: hb.sent_at, default=None)
