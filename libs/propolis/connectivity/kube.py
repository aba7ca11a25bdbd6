"""Any cluster reached by a kubeconfig as a `propolis.connectivity.cluster.Cluster` (`connectivity test
--kubeconfig PATH`): no sandbox code, only the Kubernetes API (kubernetes-asyncio) and the suite's bus.

Pods are created through the API with a stock python image: clients sleep, echo pods run `echo.py`.
Probes run as `kubectl exec` does (the `pods/exec` websocket, `v4.channel.k8s.io`): `probe.py` is sent
with the command and runs in the client pod's network namespace; probes from a node run in a
`host-netns-<n>` pod (hostNetwork, created on first use, like Cilium's `host-netns` DaemonSet). Waits
read the suite's heartbeats on the bus, as the sandbox's do: every progress-reporting service has caught
up with the API's latest resourceVersion. No underlay capture: the `encryption` scenario is skipped.

Tested against the sandbox's API server (it serves pods/exec in the pod's network namespace):
`integration/sandbox_api/test_apiserver_exec.py` (manifests accepted, exec, probe and echo programs) and
`integration/connectivity/test_connectivity.py` (scenarios end to end with `--kubeconfig`). On a real
cluster the pods pull PYTHON_IMAGE, and `host-netns-<n>` needs hostNetwork allowed in the test namespace.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
from kubernetes_asyncio import config as kube_config
from kubernetes_asyncio.client import ApiClient, Configuration, CoreV1Api
from kubernetes_asyncio.stream import WsApiClient

from propolis.bus.connection import Bus
from propolis.connectivity import echo as echo_program
from propolis.connectivity import probe as probe_program
from propolis.connectivity.cluster import Manifest, Node, Probe, ProbeResult, feature_states_on
from propolis.connectivity.scenarios import NAMESPACE
from propolis.encryption.capture import UnderlayCapture
from propolis.errors import CliError
from propolis.k8s.kinds import KINDS

#: any image with python3 runs the probe and echo programs
PYTHON_IMAGE = "docker.io/library/python:3.12-alpine"
SLEEP_FOREVER = ["python3", "-c", "import time\nwhile True: time.sleep(3600)"]
STDOUT_CHANNEL, STDERR_CHANNEL, ERROR_CHANNEL = 1, 2, 3
EXEC_TIMEOUT_MARGIN_S = 10.0
POLL_S = 0.2
BY_KIND = {k.kind: k for k in KINDS.values()}


def manifest_path(doc: Manifest, *, item: bool) -> str:
    """The API path of a document's collection (``item=False``) or of the object itself."""
    kind = BY_KIND.get(str(doc.get("kind", "")))
    if kind is None:
        raise CliError(f"kind {doc.get('kind')!r} is not one the connectivity test writes "
                       f"({', '.join(sorted(BY_KIND))})")
    meta = doc.get("metadata") or {}
    group, version = kind.group_version
    path = f"/apis/{group}/{version}" if group else f"/api/{version}"
    if kind.namespaced:
        path += f"/namespaces/{meta.get('namespace') or 'default'}"
    path += f"/{kind.plural}"
    return f"{path}/{meta['name']}" if item else path


class ApiRefused(CliError):
    """The API answered >= 400: ``status`` is the HTTP code, the message the API's own words."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class ExecFailed(CliError):
    """A command run in a pod did not succeed (non-zero exit, no status, or no end in time)."""


class KubeCluster:
    def __init__(self, kubeconfig: str, api: ApiClient, ws: WsApiClient, nodes: list[Node],
                 bus: tuple[str, str | None, str | None]) -> None:
        self.kubeconfig = kubeconfig
        self.api = api
        self.ws = ws
        self._nodes = nodes
        self.bus_url, self.bus_user, self.bus_password = bus
        self._host_pods: set[int] = set()

    @classmethod
    async def open(cls, kubeconfig: str, bus: tuple[str, str | None, str | None], *,
                   context: str | None = None) -> KubeCluster:
        """A client for the kubeconfig's (current or named) context; ``bus``: the suite's NATS (url, user,
        password)."""
        if not Path(kubeconfig).is_file():
            raise CliError(f"--kubeconfig {kubeconfig}: no such file")
        configuration = Configuration()
        await kube_config.load_kube_config(config_file=kubeconfig, context=context,
                                           client_configuration=configuration)
        api, ws = ApiClient(configuration), WsApiClient(configuration)
        self = cls(kubeconfig, api, ws, [], bus)
        try:
            nodes = (await self.request("GET", "/api/v1/nodes")).get("items", [])
        except BaseException:
            await self.close()
            raise
        self._nodes = sorted((Node(n["metadata"]["name"], next(
            (a["address"] for a in (n.get("status") or {}).get("addresses", []) if a.get("type") == "InternalIP"),
            "")) for n in nodes), key=lambda n: n.name)
        if not self._nodes:
            await self.close()
            raise CliError(f"the cluster of {kubeconfig} has no nodes")
        return self

    # --- the API, generically ---------------------------------------------------------------------

    async def request(self, method: str, path: str, body: Any = None, query: list[tuple[str, str]] | None = None,
                      content_type: str = "application/json") -> dict[str, Any]:
        """One API call, the JSON answer; CliError naming the path and the API's message on >= 400
        (ApiRefused)."""
        resp = await self.api.call_api(path, method, query_params=query or [], body=body,
                                       header_params={"Accept": "application/json",
                                                      "Content-Type": content_type},
                                       auth_settings=["BearerToken"], _preload_content=False)
        try:
            text = await resp.text()
            payload = json.loads(text) if text.strip() else {}
            if resp.status >= 400:
                message = payload.get("message", text[:300]) if isinstance(payload, dict) else text[:300]
                raise ApiRefused(f"{method} {path}: {resp.status} {message}", resp.status)
            return payload if isinstance(payload, dict) else {}
        finally:
            resp.release()

    async def _status_of(self, method: str, path: str, body: Any = None) -> tuple[int, dict[str, Any]]:
        try:
            return 200, await self.request(method, path, body)
        except ApiRefused as exc:
            return exc.status, {}

    # --- Cluster ------------------------------------------------------------------------------------

    @property
    def description(self) -> str:
        return f"kubeconfig {self.kubeconfig}"

    @property
    def nodes(self) -> Sequence[Node]:
        return self._nodes

    @property
    def command_env(self) -> dict[str, str]:
        env = {"PROPOLIS_NATS_URL": self.bus_url}
        if self.bus_user:
            env |= {"PROPOLIS_NATS_USER": self.bus_user, "PROPOLIS_NATS_PASSWORD": self.bus_password or ""}
        return env

    def containers(self, role: str, name: str, ports: list[Manifest]) -> list[Manifest]:
        if role == "client":
            return [{"name": name, "image": PYTHON_IMAGE, "command": SLEEP_FOREVER}]
        tcp = next(p["containerPort"] for p in ports if p["protocol"] == "TCP")
        udp = next(p["containerPort"] for p in ports if p["protocol"] == "UDP")
        return [{"name": name, "image": PYTHON_IMAGE,
                 "command": ["python3", "-c", Path(echo_program.__file__).read_text(), str(tcp), str(udp)],
                 "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                         {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}],
                 "ports": ports, "readinessProbe": {"tcpSocket": {"port": tcp}, "periodSeconds": 1}}]

    def host_netns_pod(self, n: int) -> Manifest:
        """The pod probes from node ``n`` (1-based) run in: the node's own network namespace."""
        return {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": f"host-netns-{n}", "namespace": NAMESPACE,
                             "labels": {"kind": "host-netns", "name": f"host-netns-{n}"}},
                "spec": {"nodeName": self._nodes[n - 1].name, "hostNetwork": True,
                         "containers": [{"name": "host-netns", "image": PYTHON_IMAGE, "command": SLEEP_FOREVER}]}}

    async def apply(self, docs: Sequence[Manifest]) -> None:
        for doc in docs:
            status, _ = await self._status_of("POST", manifest_path(doc, item=False), doc)
            if status == 409:
                current = await self.request("GET", manifest_path(doc, item=True))
                meta = {**doc.get("metadata", {}), "resourceVersion": current["metadata"]["resourceVersion"]}
                await self.request("PUT", manifest_path(doc, item=True), {**doc, "metadata": meta})
            elif status != 200:
                await self.request("POST", manifest_path(doc, item=False), doc)  # raises with the API's words

    async def delete(self, docs: Sequence[Manifest]) -> None:
        for doc in reversed(docs):
            status, _ = await self._status_of("DELETE", manifest_path(doc, item=True))
            if status not in (200, 404):
                await self.request("DELETE", manifest_path(doc, item=True))

    async def delete_namespace(self, namespace: str, *, timeout: float) -> None:
        path = f"/api/v1/namespaces/{namespace}"
        deadline = time.monotonic() + timeout
        status, _ = await self._status_of("DELETE", path)
        self._host_pods.clear()
        while status != 404:
            if time.monotonic() > deadline:
                raise CliError(f"namespace {namespace} still terminating after {timeout:.0f} s")
            await asyncio.sleep(POLL_S)
            status, _ = await self._status_of("GET", path)

    async def wait_running(self, namespace: str, count: int, *, timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            pods = (await self.request("GET", f"/api/v1/namespaces/{namespace}/pods")).get("items", [])
            running = {p["metadata"]["name"]: p["status"]["podIP"] for p in pods if pod_ready(p)}
            if len(running) >= count:
                return running
            if time.monotonic() > deadline:
                raise CliError(f"only {len(running)}/{count} pods of {namespace} ready after {timeout:.0f} s: "
                               f"{sorted(running)}")
            await asyncio.sleep(POLL_S)

    async def services(self, namespace: str) -> dict[str, Manifest]:
        items = (await self.request("GET", f"/api/v1/namespaces/{namespace}/services")).get("items", [])
        return {svc["metadata"]["name"]: svc["spec"] for svc in items}

    async def wait_enforced(self, *, timeout: float) -> None:
        from propolis.runtime.heartbeats import is_live, newest, read_heartbeats_answered, revision_at_least
        from propolis.suite import SUITE_SERVICES

        target = str((await self.request("GET", "/api/v1/namespaces")).get("metadata", {}).get("resourceVersion", ""))
        reporting = {s.name for s in SUITE_SERVICES if s.reports_progress}
        behind: list[str] = ["no heartbeat read yet"]
        bus = Bus(self.bus_url, name="propolis-connectivity-wait", user=self.bus_user, password=self.bus_password)

        def note_unanswered(why: str) -> None:
            nonlocal behind
            if why:  # e.g. a NATS stream leader election: read again
                behind = [f"NATS did not answer a heartbeat read: {why}"]

        async def caught_up() -> None:
            nonlocal behind
            await bus.connect(max_wait=timeout)
            while True:
                heartbeats = await read_heartbeats_answered(bus, unanswered=note_unanswered)
                now = time.time()
                live = [hb for hb in heartbeats if is_live(hb, now) and hb.service in reporting]
                latest = {(hb.service, hb.node): newest(live, hb.service, hb.node) for hb in live}
                behind = [f"{s}/{n} at {hb.progress.get('k8s_resource_version') or 'nothing'}"
                          for (s, n), hb in latest.items()
                          if hb is not None and not revision_at_least(hb.progress.get("k8s_resource_version"), target)]
                if latest and not behind:
                    return
                if not latest:
                    behind = [f"no live heartbeat of {', '.join(sorted(reporting))} on {self.bus_url}"]
                await asyncio.sleep(0.05)

        try:
            await asyncio.wait_for(caught_up(), timeout)
        except TimeoutError:
            raise CliError(f"not caught up with resourceVersion {target} within {timeout:.0f}s: "
                           f"{', '.join(behind)}") from None
        finally:
            await bus.close(timeout=0.5)

    async def exec(self, pod: str, command: list[str], *, timeout: float) -> str:
        """Run ``command`` in the pod's first container as `kubectl exec` does; its stdout. ExecFailed names
        the exit code and stderr when it fails."""
        #: Any: the generated signature says command is a str and the answer a str; through WsApiClient a list
        #: is sent as repeated `command` parameters and the answer is the websocket
        core: Any = CoreV1Api(self.ws)
        stdout, stderr, error = bytearray(), bytearray(), b""

        async def run() -> None:
            nonlocal error
            connect = await core.connect_get_namespaced_pod_exec(pod, NAMESPACE, command=command, stdout=True,
                                                                 stderr=True, stdin=False, tty=False,
                                                                 _preload_content=False)
            async with connect as ws:
                async for msg in ws:
                    data = msg.data if isinstance(msg.data, bytes) else str(msg.data).encode()
                    if not data:
                        continue
                    channel, payload = data[0], data[1:]
                    if channel == STDOUT_CHANNEL:
                        stdout.extend(payload)
                    elif channel == STDERR_CHANNEL:
                        stderr.extend(payload)
                    elif channel == ERROR_CHANNEL and payload:
                        error = payload

        try:
            await asyncio.wait_for(run(), timeout)
        except TimeoutError:
            raise ExecFailed(f"exec in {NAMESPACE}/{pod}: no end within {timeout:.0f} s") from None
        except aiohttp.WSServerHandshakeError as exc:
            raise ExecFailed(f"exec in {NAMESPACE}/{pod} refused by the API: {exc.status} {exc.message}") from None
        status = json.loads(error) if error else {"status": "Failure", "message": "no status on the error channel"}
        if status.get("status") != "Success":
            raise ExecFailed(f"exec in {NAMESPACE}/{pod} failed: {status.get('message', status)}"
                             f"{'; stderr: ' + stderr.decode(errors='replace').strip()[-300:] if stderr else ''}")
        return stdout.decode(errors="replace")

    async def _source_pod(self, source: str) -> str:
        if not source.startswith("node:"):
            return source
        n = int(source.split(":", 1)[1])
        if n not in self._host_pods:
            await self.apply([self.host_netns_pod(n)])
            await self.wait_running_named(f"host-netns-{n}", timeout=60)
            self._host_pods.add(n)
        return f"host-netns-{n}"

    async def wait_running_named(self, name: str, *, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not pod_ready(await self.request("GET", f"/api/v1/namespaces/{NAMESPACE}/pods/{name}")):
            if time.monotonic() > deadline:
                raise CliError(f"pod {NAMESPACE}/{name} not ready after {timeout:.0f} s")
            await asyncio.sleep(POLL_S)

    async def resolve(self, source: str, name: str) -> list[str]:
        program = ("import json, socket, sys\n"
                   "print(json.dumps(sorted({a[4][0] for a in socket.getaddrinfo(sys.argv[1], None, "
                   "socket.AF_INET)})))")
        try:
            out = await self.exec(await self._source_pod(source), ["python3", "-c", program, name], timeout=10)
        except ExecFailed as exc:
            raise CliError(f"{name}: does not resolve from {source} ({exc})") from None
        addresses: list[str] = json.loads(out)
        return addresses

    async def probe_all(self, probes: Sequence[Probe], *, timeout: float) -> list[ProbeResult]:
        """One exec per source pod runs all of its probes in parallel."""
        by_source: dict[str, list[int]] = defaultdict(list)
        for i, p in enumerate(probes):
            by_source[p.source].append(i)
        results: list[ProbeResult | None] = [None] * len(probes)
        source_code = Path(probe_program.__file__).read_text()

        async def from_source(source: str, indexes: list[int]) -> None:
            batch = [probe_request(probes[i], timeout) for i in indexes]
            out = await self.exec(await self._source_pod(source), ["python3", "-c", source_code, json.dumps(batch)],
                                  timeout=timeout + EXEC_TIMEOUT_MARGIN_S)
            for i, got in zip(indexes, json.loads(out)):
                results[i] = ProbeResult(probes[i], bool(got["connected"]), got.get("answered_by", ""),
                                         got.get("error", ""), got.get("http_status"))

        await asyncio.gather(*(from_source(s, ix) for s, ix in by_source.items()))
        return [r for r in results if r is not None]

    def underlay_capture(self) -> UnderlayCapture | None:
        return None  # the wires between a real cluster's nodes are not ours to capture

    async def feature_states(self) -> dict[str, str]:
        return await feature_states_on(
            Bus(self.bus_url, name="propolis-connectivity", user=self.bus_user, password=self.bus_password))

    async def close(self) -> None:
        await self.ws.close()
        await self.api.close()


def probe_request(probe: Probe, timeout: float) -> dict[str, Any]:
    """One probe as `probe.py` reads it."""
    return {"ip": probe.ip, "port": probe.port, "protocol": probe.protocol,
            "http": list(probe.http) if probe.http else None, "timeout": timeout}


def pod_ready(pod: dict[str, Any]) -> bool:
    """Running with an IP, not terminating, and Ready where the kubelet reports conditions."""
    status = pod.get("status") or {}
    if status.get("phase") != "Running" or not status.get("podIP") or (pod.get("metadata") or {}).get(
            "deletionTimestamp"):
        return False
    ready = [c for c in status.get("conditions") or [] if c.get("type") == "Ready"]
    return not ready or ready[0].get("status") == "True"
