"""The cluster `propolis connectivity test` (and `propolis status`) talks to, as a small interface.

Why an interface: the runner (`runner.py`) knows scenarios, not clusters. Two implementations exist: the
sandbox (`propolis_sandbox.connectivity_cluster`, found through the `propolis.clusters` entry point, never
imported by the product) and any cluster reached by a kubeconfig (`kube.py`: pods created through the
Kubernetes API, probes run by exec into the client pods).

A probe's source is a pod of the test workload (its name in the test namespace) or ``node:<n>`` (1-based):
the node's own network namespace.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Protocol

from propolis.bus.connection import Bus
from propolis.encryption.capture import UnderlayCapture
from propolis.errors import CliError

#: entry point group naming cluster factories other distributions provide (the sandbox's: ``sandbox``)
CLUSTERS_GROUP = "propolis.clusters"

Manifest = dict[str, Any]


@dataclass(frozen=True)
class Node:
    name: str
    internal_ip: str


@dataclass(frozen=True)
class Probe:
    """One connection to try: from a workload pod (or ``node:<n>``) to ip:port."""

    source: str
    ip: str
    port: int
    protocol: str = "TCP"
    http: tuple[str, str] | None = None  # (method, path): one HTTP/1.1 request, judged by its status
    target: str = ""  # the check's target as written (`pod:echo-same-node`), for reports


@dataclass(frozen=True)
class ProbeResult:
    """TCP: connected = the handshake completed (the echo pod then names itself in ``answered_by``);
    UDP: connected = an answer came back."""

    probe: Probe
    connected: bool
    answered_by: str = ""
    error: str = ""
    http_status: int | None = None


class Cluster(Protocol):
    """What the connectivity runner needs from a cluster; every wait has a hard timeout."""

    @property
    def description(self) -> str:
        """How the run's header names the cluster (`sandbox demo`, `kubeconfig ~/.kube/config`)."""
        ...

    @property
    def nodes(self) -> Sequence[Node]:
        ...

    @property
    def command_env(self) -> dict[str, str]:
        """Environment variables pointing `propolis observe`/`status` at this cluster's bus."""
        ...

    def containers(self, role: str, name: str, ports: list[Manifest]) -> list[Manifest]:
        """The containers of a workload pod: ``role`` is ``client`` (probes run there) or ``echo`` (answers TCP
        and UDP naming itself `NS/NAME`, HTTP 200)."""
        ...

    async def apply(self, docs: Sequence[Manifest]) -> None:
        """Create or replace every document (kubectl apply)."""
        ...

    async def delete(self, docs: Sequence[Manifest]) -> None:
        """Delete every document; one already gone is fine."""
        ...

    async def delete_namespace(self, namespace: str, *, timeout: float) -> None:
        """Delete the namespace and block until it is gone (Terminating first, like Kubernetes)."""
        ...

    async def wait_enforced(self, *, timeout: float) -> None:
        """Block until every service enforces the API's latest revision (the suite's heartbeats say so)."""
        ...

    async def wait_running(self, namespace: str, count: int, *, timeout: float) -> dict[str, str]:
        """Block until ``count`` pods of ``namespace`` run with an IP; pod name -> IP."""
        ...

    async def services(self, namespace: str) -> dict[str, Manifest]:
        """Service name -> its spec (clusterIP, ports with nodePort)."""
        ...

    async def resolve(self, source: str, name: str) -> list[str]:
        """A records of ``name`` as the pod ``source`` resolves it (its resolver, from its namespace);
        CliError when it does not resolve."""
        ...

    async def probe_all(self, probes: Sequence[Probe], *, timeout: float) -> list[ProbeResult]:
        """Run the probes (in parallel where possible), results in the order given."""
        ...

    def underlay_capture(self) -> AbstractContextManager[UnderlayCapture] | None:
        """A capture of the underlay between nodes, None where there is none to open (a real cluster)."""
        ...

    async def feature_states(self) -> dict[str, str]:
        """Feature name -> state as the running services report them (`propolis status`)."""
        ...

    async def close(self) -> None:
        ...


class ClusterFactory(Protocol):
    async def __call__(self, name: str) -> Cluster:
        ...


async def feature_states_on(bus: Bus) -> dict[str, str]:
    """`Cluster.feature_states` for any cluster whose suite reports on `bus` (connected here, closed after)."""
    from propolis.status import collect  # status pulls in most of the library: only when a run asks

    await bus.connect(max_wait=5)
    try:
        report = await collect(bus, probe_kernel=False)
    finally:
        await bus.close()
    return {name: str(f.get("state", "")) for name, f in report.features.items()}


def installed_cluster(kind: str) -> ClusterFactory:
    """The factory another distribution registered under ``kind`` (entry point group `propolis.clusters`)."""
    found = {e.name: e for e in entry_points(group=CLUSTERS_GROUP)}
    if kind not in found:
        raise CliError(f"no {kind!r} cluster installed (entry point group {CLUSTERS_GROUP} has "
                       f"{', '.join(sorted(found)) or 'nothing'}); pass --kubeconfig PATH to test a real cluster")
    factory: ClusterFactory = found[kind].load()
    return factory
