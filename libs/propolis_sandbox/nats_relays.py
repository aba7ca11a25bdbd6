"""The sandbox's relay tier (`sandbox up --nats-relays N`): N nats-servers as leafnodes of the hub.

Why in the sandbox: what a node service sees behind a relay (watches on a mirror, writes that travel
to the hub and back, a relay or hub restart) only shows with real servers (`bus/relay.py`). Node ``n``
is served by relay ``(n - 1) % N + 1`` (round-robin, as the chart spreads nodes over its relay
Service); cluster-scoped services keep the hub. Each relay listens on its own loopback port, keeps
its mirrors in ``<run dir>/nats/relay-<n>/`` (a restart keeps them) and logs to
``<run dir>/logs/nats-relay-<n>.log``. The supervisor restarts a dead relay and keeps every relay's
mirrors in place (`supervise`).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from pathlib import Path
from typing import Any

from propolis.bus import relay
from propolis.bus.connection import Bus
from propolis.bus.embedded import EmbeddedNats
from propolis.bus.permissions import Credentials
from propolis.errors import PermanentError, TemporaryError
from propolis_sandbox.nats_cluster import free_loopback_ports, limits_config, server_env

log = logging.getLogger("propolis_sandbox.nats_relays")

#: how long `start` waits for every relay's mirrors (the leafnode connects within milliseconds)
MIRRORS_READY_TIMEOUT_S = 20.0


class NatsRelays:
    """``count`` relay servers for one hub; `hub_config` goes into the hub's config before it starts."""

    def __init__(self, run_dir: Path, *, count: int, users: dict[str, Credentials], admin: Credentials,
                 log_dir: Path, hub_servers: int = 1) -> None:
        if count < 1:
            raise ValueError(f"nats relays: at least 1, got {count}")
        self.admin = admin
        self.leaf = Credentials(relay.LEAFNODE_USER, secrets.token_hex(16))
        self.leafnode_ports = free_loopback_ports(hub_servers)  # one per hub server; a relay fails over between them
        hub = [f"127.0.0.1:{port}" for port in self.leafnode_ports]
        self.servers = [EmbeddedNats(run_dir / relay.relay_domain(n), env=server_env(),
                                     log_file=str(log_dir / f"nats-{relay.relay_domain(n)}.log"),
                                     config_text=relay.relay_config(users, admin=admin, hub_leafnodes=hub, leaf=self.leaf)
                                     + limits_config(relay.relay_domain(n)))
                        for n in range(1, count + 1)]
        self.buses: list[Bus] = []

    def hub_config(self, n: int) -> str:
        """Hub server n's (1-based) leafnode listener for these relays."""
        return relay.hub_leafnode_config(f"127.0.0.1:{self.leafnode_ports[n - 1]}", self.leaf)

    def for_node(self, n: int) -> EmbeddedNats:
        """The relay serving node ``n`` (1-based)."""
        return self.servers[(n - 1) % len(self.servers)]

    async def start(self) -> None:
        """Start every relay and wait until each holds a mirror of every bucket (the hub's buckets exist)."""
        for server in self.servers:
            await server.start()
        for server in self.servers:
            bus = Bus(server.url, name=f"sandbox-relay-admin@{server.run_dir.name}", user=self.admin.user,
                      password=self.admin.password)
            await bus.connect(max_wait=10)
            self.buses.append(bus)
        deadline = time.monotonic() + MIRRORS_READY_TIMEOUT_S
        for bus in self.buses:  # clients come only once the mirrors caught up: a partial one would prune
            behind: object = "not ensured yet"
            while behind:
                try:
                    await relay.ensure_mirrors(bus)
                    behind = await relay.mirrors_behind(bus)
                except TemporaryError as exc:  # the leafnode is not connected yet
                    behind = exc
                if behind and time.monotonic() > deadline:
                    raise TemporaryError(f"relay {bus.url}: mirrors not caught up with the hub within "
                                         f"{MIRRORS_READY_TIMEOUT_S:g}s: {behind}")
                if behind:
                    await asyncio.sleep(0.1)

    async def supervise(self) -> None:
        """Restart a dead relay on its port and store (its clients reconnect, their watches re-sync from the
        mirror) and keep the mirrors in place, reconciler-style."""
        last_check = time.monotonic()
        while True:
            await asyncio.sleep(0.5)
            for server in self.servers:
                if server.proc is not None and server.proc.poll() is None:
                    continue
                log.warning("nats relay %s exited; restarting on the same port and store", server.url)
                try:
                    await asyncio.to_thread(server.restart_sync)
                except Exception as exc:  # noqa: BLE001 - e.g. the port is briefly busy: next round retries
                    log.warning("restarting nats relay %s failed: %s", server.url, exc)
            if time.monotonic() - last_check < relay.MIRROR_CHECK_INTERVAL_S:
                continue
            last_check = time.monotonic()
            for bus in self.buses:
                try:
                    await relay.ensure_mirrors(bus)
                except (TemporaryError, PermanentError) as exc:
                    log.warning("%s", exc)

    async def stop(self) -> None:
        for bus in self.buses:
            await bus.close(timeout=0.5)
        self.buses = []
        await asyncio.gather(*(s.stop() for s in self.servers))

    def describe(self) -> list[dict[str, Any]]:
        """What state.json records of each relay."""
        return [{"url": s.url, "pid": s.proc.pid if s.proc else 0, "dir": str(s.run_dir)} for s in self.servers]
