"""The sandbox's NATS: one nats-server, or a JetStream cluster (`sandbox up --nats-replicas 3`).

Why a cluster in the sandbox: the chart runs 3 servers with every KV bucket
replicated 3 times, and what a service sees when one of them dies (its
connection fails over, a watch's consumer moves, a put waits for a new stream
leader) only shows with real routes and real Raft. Each server listens on its
own loopback client and route port, keeps its own JetStream store under
`<run dir>/nats/nats-<n>/` and its log in `<run dir>/logs/nats-server-<n>.log`
(beside the services', so a test keeping logs keeps it), and a restart (`EmbeddedNats.restart_sync`)
brings it back on the same ports and store, as the chart's StatefulSet does.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from propolis.bus import relay
from propolis.bus.embedded import EmbeddedNats

#: Server limits, the same as the chart's `nats.limits` (helm/propolis/values.yaml). Why: the server's memory
#: is idle-small but spikes during resync storms (every watcher re-reading a whole bucket after a restart or a
#: reconnect): RSS ≈ watchers × bucket size during syncs (issue #21: 11.6 GB for 1,000 watchers of a 10k-key
#: bucket). GOMEMLIMIT makes the Go GC work harder before the OOM killer does; max_pending caps what the server
#: buffers for one slow client (a watcher that cannot keep up is cut off and re-syncs later instead of growing
#: the server); max_memory_store caps in-memory streams (the KV buckets are file-backed).
GOMEMLIMIT = "1GiB"
MAX_PENDING = "32MB"
MAX_MEMORY_STORE = "256MB"
#: nats-server 2.15 caps every stream at 1,000 consumers unless told otherwise (`default_max_consumers`), and each
#: node runs up to five watchers of the k8s bucket (writer, l7 and DNS proxies, hubble, wireguard-keymgr): the
#: 201st node's services would wait for a consumer forever. The cap stays (it stops runaway consumer leaks), sized
#: for 5,000 directly connected nodes; the chart's `nats.limits.maxConsumersPerStream` is the same.
MAX_CONSUMERS_PER_STREAM = 25000
JETSTREAM_LIMITS = f"{{ default_max_consumers: {MAX_CONSUMERS_PER_STREAM} }}"
#: Cluster sizes JetStream can keep a quorum with (the chart's nats.replicas allows the same).
REPLICA_COUNTS = (1, 3, 5)


def limits_config(domain: str | None = None) -> str:
    """The server-limit lines of a nats-server config (GOMEMLIMIT goes in the environment: `server_env`);
    ``domain``: the JetStream domain, in the same block (a relay tier's hub or relay: `bus/relay.py`)."""
    if domain:
        return f"max_pending: {MAX_PENDING}\n" + relay.jetstream_config(domain, max_memory_store=MAX_MEMORY_STORE,
                                                                         limits=JETSTREAM_LIMITS)
    return (f"max_pending: {MAX_PENDING}\njetstream {{\n  max_memory_store: {MAX_MEMORY_STORE}\n"
            f"  limits: {JETSTREAM_LIMITS}\n}}\n")


def server_env() -> dict[str, str]:
    return {"GOMEMLIMIT": GOMEMLIMIT}


def free_loopback_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free on 127.0.0.1 now (held open together so none repeats)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def cluster_config(cluster_name: str, server_name: str, route_port: int, route_ports: list[int],
                   route_user: str, route_password: str) -> str:
    """The `server_name` and `cluster` block of one server: routes to every peer on loopback, with the
    route credentials (no process on this machine joins the cluster without them)."""
    routes = [f"nats-route://{route_user}:{route_password}@127.0.0.1:{p}" for p in route_ports if p != route_port]
    block = {"name": cluster_name, "listen": f"127.0.0.1:{route_port}",
             "authorization": {"user": route_user, "password": route_password}, "routes": routes}
    return f"server_name: {json.dumps(server_name)}\ncluster " + json.dumps(block, indent=2) + "\n"


class NatsServers:
    """The sandbox's nats-server processes: one (``replicas=1``, store in ``run_dir`` as before) or a
    JetStream cluster of ``replicas`` servers named ``<cluster_name>-<n>``."""

    def __init__(self, run_dir: Path, *, replicas: int, config_text: str, cluster_name: str, log_dir: Path,
                 domain: str | None = None, server_config: Callable[[int], str] | None = None) -> None:
        """``domain``: the JetStream domain; ``server_config(n)``: config of server n (1-based) alone (a relay
        tier's leafnode listener, one port per server: `nats_relays.py`)."""
        if replicas not in REPLICA_COUNTS:
            raise ValueError(f"nats replicas: must be one of {REPLICA_COUNTS}, got {replicas}")
        self.replicas = replicas
        base = config_text + limits_config(domain)
        own = [server_config(n) if server_config else "" for n in range(1, replicas + 1)]
        if replicas == 1:
            self.servers = [EmbeddedNats(run_dir, config_text=base + own[0], env=server_env(),
                                         log_file=str(log_dir / "nats-server.log"))]
            return
        route_ports = free_loopback_ports(replicas)
        route_user, route_password = "route", secrets.token_hex(16)
        self.servers = []
        for n, port in enumerate(route_ports, start=1):
            routes = cluster_config(cluster_name, f"{cluster_name}-{n}", port, route_ports, route_user, route_password)
            self.servers.append(EmbeddedNats(run_dir / f"nats-{n}", config_text=base + routes + own[n - 1], env=server_env(),
                                             log_file=str(log_dir / f"nats-server-{n}.log")))

    @property
    def url(self) -> str:
        """Every server's client URL, comma-separated (what `Bus` and PROPOLIS_NATS_URL take)."""
        return ",".join(s.url for s in self.servers)

    async def start(self) -> str:
        for server in self.servers:  # each reports its port before the cluster has a quorum
            await server.start()
        return self.url

    async def stop(self) -> None:
        await asyncio.gather(*(s.stop() for s in self.servers))

    def dead(self) -> list[EmbeddedNats]:
        """The servers whose process has exited (the supervisor restarts them)."""
        return [s for s in self.servers if s.proc is None or s.proc.poll() is not None]

    def describe(self) -> list[dict[str, Any]]:
        """What state.json records of each server."""
        return [{"url": s.url, "pid": s.proc.pid if s.proc else 0, "dir": str(s.run_dir)} for s in self.servers]
