"""`propolis sandbox up` returns once every service it started reports healthy.

Why: the supervisor marks the sandbox ready once its processes run, but a service beats only after its
components started (the datapath-writer compiles its programs first), so a `propolis status` right after
`up` used to report datapath-writers missing for a few seconds. Now `up` waits for a live heartbeat with
health `ok` from every (service, node) pair in state.json, and fails naming the ones that never got there.
"""

from __future__ import annotations

import asyncio
import time

from propolis.errors import CliError
from propolis_sandbox.config import SandboxState


def describe(service: str, node: str, hb: object | None) -> str:
    if hb is None:
        return f"{service} on {node}: no heartbeat"
    reasons = "; ".join(c.get("reason", "") for c in getattr(hb, "components", {}).values() if c.get("reason"))
    return f"{service} on {node}: {getattr(hb, 'health', '?')}" + (f" ({reasons})" if reasons else "")


async def wait_healthy(state: SandboxState, *, timeout: float) -> None:
    """Block until every started service has a live heartbeat saying `ok`; CliError after `timeout`
    (a hard limit, NATS connect included) naming each service that is not healthy and why."""
    from propolis.runtime.heartbeats import is_live, newest, read_heartbeats_answered

    wanted = sorted({(s["name"], s["node"]) for s in state.services})
    not_ready = {pair: None for pair in wanted}
    bus = state.admin_bus("propolis-sandbox-up")

    async def healthy() -> None:
        await bus.connect(max_wait=timeout)
        while True:
            heartbeats = await read_heartbeats_answered(bus)
            now = time.time()
            live = [hb for hb in heartbeats if is_live(hb, now)]
            latest = {pair: newest(live, *pair) for pair in wanted}
            not_ready.clear()
            not_ready.update({pair: hb for pair, hb in latest.items() if hb is None or hb.health != "ok"})
            if not not_ready:
                return
            await asyncio.sleep(0.1)

    try:
        await asyncio.wait_for(healthy(), timeout)
    except TimeoutError:
        raise CliError(f"sandbox {state.config.get('name', '?')}: services not healthy within {timeout:.0f}s: "
                       + ", ".join(describe(s, n, hb) for (s, n), hb in not_ready.items())) from None
    finally:
        await bus.close()
