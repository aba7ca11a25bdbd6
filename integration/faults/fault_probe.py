"""Helpers of the fault tests: the policy tests' workload (pods, manifests, probes), the services'
heartbeats and pids, and a probe loop that proves a denied pair stays denied while a fault lasts."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "policy"))  # one workload helper, not two

from policy_workload import NO, OK, Check, PodDef, Workload, cnp, netpol, sel

from propolis.bus.messages import Heartbeat
from propolis.runtime.heartbeats import newest, read_heartbeats
from propolis_sandbox.config import SandboxState

__all__ = ["NO", "OK", "Check", "PodDef", "Workload", "cnp", "netpol", "sel", "beat", "wait_beat", "Prober"]


async def beat(state: SandboxState, service: str, node: str | None = None) -> Heartbeat | None:
    """The newest heartbeat of `service` (on `node`)."""
    bus = state.admin_bus("fault-test-beats")
    await bus.connect(max_wait=5)
    try:
        return newest(await read_heartbeats(bus), service, node)
    finally:
        await bus.close()


async def wait_beat(state: SandboxState, service: str, node: str | None, what: str, predicate: Any,
                    timeout: float = 30.0) -> Heartbeat:
    """Poll heartbeats until `predicate(heartbeat)` holds; fail naming `what` and the last heartbeat."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = await beat(state, service, node)
        if last is not None and predicate(last):
            return last
        await asyncio.sleep(0.2)
    raise AssertionError(f"{service}: {what} not seen within {timeout:.0f}s; last heartbeat: "
                         f"{last and {'pid': last.pid, 'health': last.health, 'components': last.components}}")


class Prober:
    """Probes `checks` in a loop in the background (several staggered loops, so a short fail-open window
    is seen); every wrong outcome is kept with the time it was seen."""

    def __init__(self, w: Workload, checks: list[Check], *, loops: int = 2, timeout: float = 0.5) -> None:
        self.w, self.checks, self.loops, self.timeout = w, checks, loops, timeout
        self.failures: list[str] = []
        self.rounds = 0
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def _loop(self, offset: float) -> None:
        await asyncio.sleep(offset)
        while not self._stop.is_set():
            now = time.time()
            seen = f"{time.strftime('%H:%M:%S', time.gmtime(now))}.{int(now * 1000) % 1000:03d}"
            self.failures += await self.w.verify(f"probe round {self.rounds} at {seen}", self.checks,
                                                 timeout=self.timeout)
            self.rounds += 1

    async def __aenter__(self) -> Prober:
        self._tasks = [asyncio.create_task(self._loop(i * self.timeout / self.loops)) for i in range(self.loops)]
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)
