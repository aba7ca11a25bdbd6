"""The sandbox as a `propolis.connectivity.cluster.Cluster`: what `propolis connectivity test` runs against
without `--kubeconfig` (found through the `propolis.clusters` entry point ``sandbox``).

Probes are sockets opened inside the pod's (or node's) network namespace (`probe.py`), names are
resolved from the pod's namespace with its own resolv.conf (`pod_dns.py`), and waits read the suite's
heartbeats (`cluster.wait`): no exec, no process per probe.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from propolis.connectivity.cluster import Cluster, Manifest, Node, Probe, ProbeResult, feature_states_on
from propolis.encryption.capture import UnderlayCapture
from propolis.errors import CliError
from propolis_sandbox import cluster, pod_dns, probe
from propolis_sandbox.config import SandboxState
from propolis_sandbox.resources import KINDS, documents_from

#: the sandbox kubelet runs its echo server for any image it does not know (kubelet.WORKLOAD_IMAGES)
ECHO_IMAGE = "echo"


class SandboxCluster:
    def __init__(self, state: SandboxState) -> None:
        self.state = state
        self.cfg = state.sandbox()

    @property
    def description(self) -> str:
        return f"sandbox {self.state.config['name']}"

    @property
    def nodes(self) -> Sequence[Node]:
        return [Node(n["name"], n.get("internal_ip", "")) for n in self.state.nodes]

    @property
    def command_env(self) -> dict[str, str]:
        return {"PROPOLIS_SANDBOX_NAME": self.state.config["name"]}

    def containers(self, role: str, name: str, ports: list[Manifest]) -> list[Manifest]:
        return [{"name": name, "image": ECHO_IMAGE, "ports": ports}]

    async def apply(self, docs: Sequence[Manifest]) -> None:
        await cluster.apply_documents(self.state, documents_from("connectivity test", list(docs)))

    async def delete(self, docs: Sequence[Manifest]) -> None:
        await cluster.delete_documents(self.state, documents_from("connectivity test", list(docs)))

    async def delete_namespace(self, namespace: str, *, timeout: float) -> None:
        path = KINDS["Namespace"].path(None, namespace)
        deadline = time.monotonic() + timeout
        async with cluster.Api(self.state.apiserver_url) as api:
            try:
                await api.request("DELETE", path)
                while time.monotonic() < deadline:
                    await api.request("GET", path)
                    await asyncio.sleep(0.2)
            except cluster.ApiError as exc:
                if exc.status != 404:
                    raise
                return
        raise CliError(f"namespace {namespace} still terminating after {timeout:.0f} s")

    async def wait_enforced(self, *, timeout: float) -> None:
        await cluster.wait(self.state, timeout=timeout)

    async def wait_running(self, namespace: str, count: int, *, timeout: float) -> dict[str, str]:
        running = await cluster.wait_running(self.state, count, namespace=namespace, timeout=timeout)
        return {key.split("/", 1)[1]: ip for key, ip in running.items()}

    async def services(self, namespace: str) -> dict[str, Manifest]:
        async with cluster.Api(self.state.apiserver_url) as api:
            items = (await api.list(KINDS["Service"], namespace)).get("items", [])
        return {svc["metadata"]["name"]: svc["spec"] for svc in items}

    def netns(self, source: str) -> str:
        """The network namespace a probe source (`node:<n>` or a pod of the test namespace) sends from."""
        from propolis.connectivity.scenarios import NAMESPACE
        if source.startswith("node:"):
            return self.cfg.node_netns(int(source.split(":", 1)[1]))
        return self.cfg.pod_netns(NAMESPACE, source)

    async def resolve(self, source: str, name: str) -> list[str]:
        return await pod_dns.resolve(self.netns(source), name)

    async def probe_all(self, probes: Sequence[Probe], *, timeout: float) -> list[ProbeResult]:
        specs = [probe.ProbeSpec(self.netns(p.source), p.ip, p.port, p.protocol, p.source, p.target, http=p.http)
                 for p in probes]
        results = await probe.probe_all(specs, timeout=timeout)
        return [ProbeResult(p, r.connected, r.answered_by, r.error, r.http_status) for p, r in zip(probes, results)]

    def underlay_capture(self) -> UnderlayCapture:
        return UnderlayCapture(self.cfg.underlay_netns)

    async def feature_states(self) -> dict[str, str]:
        return await feature_states_on(self.state.admin_bus("propolis-connectivity"))

    async def close(self) -> None:
        """Nothing is held open between calls (each opens its own API session or bus)."""


async def open_sandbox(name: str) -> Cluster:
    """The `propolis.clusters` entry point: the running sandbox ``name`` (CliError if it is not up)."""
    return SandboxCluster(cluster.require_state(name))
