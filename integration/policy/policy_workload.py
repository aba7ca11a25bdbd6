"""Table-driven policy tests with real packets: a workload of namespaces and echo pods, and cases of
"apply these manifests, then these connections must (not) connect".

Why placeholders: namespaces get a unique suffix per test (tests share one sandbox and a leftover
namespace of an interrupted run must never collide), so manifests say ``{ns:a}`` for "the real name of
namespace a" and ``{ip:a/server}`` for "the IP of pod a/server"; `Workload.render` fills them in.

A check is ``(source, destination, port, protocol, expected)``: source ``"a/client"`` (a pod, by its
short namespace) or ``"node:1"`` (node 1's own namespace = the host entity); destination a pod.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from propolis_sandbox import cluster, probe
from propolis_sandbox.config import SandboxState
from propolis_sandbox.resources import KINDS, documents_from

OK, NO = True, False
PROBE_TIMEOUT = 0.75
UDP_PROBE_TIMEOUT = 1.0

#: every server pod listens on these (the echo server answers on each declared containerPort, TCP and UDP)
SERVER_PORTS = (("http", 8080, "TCP"), ("http-alt", 8081, "TCP"), ("http-hi", 8082, "TCP"),
                ("metrics", 9090, "TCP"), ("dns", 5353, "UDP"))

Check = tuple[str, str, int, str, bool]


@dataclass(frozen=True)
class PodDef:
    ref: str  # "<short ns>/<name>"
    node: int  # 1-based
    labels: dict[str, str]
    server: bool = False
    ports: tuple[tuple[str, int, str], ...] = SERVER_PORTS  # (name, containerPort, protocol) of a server
    annotations: tuple[tuple[str, str], ...] = ()  # e.g. (("kubernetes.io/egress-bandwidth", "10M"),)

    @property
    def ns(self) -> str:
        return self.ref.split("/", 1)[0]

    @property
    def name(self) -> str:
        return self.ref.split("/", 1)[1]


@dataclass
class Case:
    name: str
    manifests: list[dict[str, Any]]
    checks: list[Check]


@dataclass
class Workload:
    state: SandboxState
    prefix: str
    namespaces: dict[str, dict[str, str]]  # short name -> namespace labels
    pods: list[PodDef]
    suffix: str = field(default_factory=lambda: uuid.uuid4().hex[:5])
    ips: dict[str, str] = field(default_factory=dict)  # pod ref -> IP
    exact_names: bool = False  # namespaces named as given (manifests used verbatim, e.g. `production`)

    # --- names ---------------------------------------------------------------------------
    def ns(self, short: str) -> str:
        return short if self.exact_names else f"{self.prefix}-{short}-{self.suffix}"

    def ip(self, ref: str) -> str:
        return self.ips[ref]

    def netns(self, source: str) -> str:
        cfg = self.state.sandbox()
        if source.startswith("node:"):
            return cfg.node_netns(int(source.split(":", 1)[1]))
        short, name = source.split("/", 1)
        return cfg.pod_netns(self.ns(short), name)

    def render(self, obj: Any) -> Any:
        """Fill ``{ns:x}`` and ``{ip:x/pod}`` placeholders anywhere in a manifest (keys and values)."""
        def sub(text: str) -> str:
            return re.sub(r"\{(ns|ip):([^}]+)\}",
                          lambda m: self.ns(m.group(2)) if m.group(1) == "ns" else self.ip(m.group(2)), text)
        if isinstance(obj, str):
            return sub(obj)
        if isinstance(obj, dict):
            return {sub(k): self.render(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [self.render(v) for v in obj]
        return obj

    # --- lifecycle -----------------------------------------------------------------------
    def _pod(self, pod: PodDef) -> dict[str, Any]:
        ports = [{"name": n, "containerPort": p, "protocol": proto} for n, p, proto in pod.ports] \
            if pod.server else []
        return {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": pod.name, "namespace": self.ns(pod.ns), "labels": dict(pod.labels),
                             **({"annotations": dict(pod.annotations)} if pod.annotations else {})},
                "spec": {"nodeName": self.state.nodes[pod.node - 1]["name"],
                         "containers": [{"name": "main", "image": "echo", "ports": ports}]}}

    async def deploy(self) -> None:
        docs = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": self.ns(s), "labels": dict(lbl)}}
                for s, lbl in self.namespaces.items()]
        docs += [self._pod(p) for p in self.pods]
        await cluster.apply_documents(self.state, documents_from(self.prefix, docs), dry_run_first=False)
        for short in self.namespaces:
            want = sum(1 for p in self.pods if p.ns == short)
            if want:
                running = await cluster.wait_running(self.state, want, namespace=self.ns(short), timeout=90)
                for key, ip in running.items():
                    ns, name = key.split("/", 1)
                    self.ips[f"{short}/{name}"] = ip
        # no `sandbox wait` here: every case, step and check sequence starts with one

    async def cleanup(self, timeout: float = 90.0) -> None:
        """Delete every namespace of the workload and wait until each is gone, then until enforced."""
        deadline = time.monotonic() + timeout
        async with cluster.Api(self.state.apiserver_url) as api:
            for short in self.namespaces:
                try:
                    await api.request("DELETE", KINDS["Namespace"].path(None, self.ns(short)))
                except cluster.ApiError as exc:
                    if exc.status != 404:
                        raise
            for short in self.namespaces:
                path = KINDS["Namespace"].path(None, self.ns(short))
                while True:
                    try:
                        await api.request("GET", path)
                    except cluster.ApiError as exc:
                        if exc.status == 404:
                            break
                        raise
                    assert time.monotonic() < deadline, f"namespace {self.ns(short)} still terminating"
                    await asyncio.sleep(0.2)
        # gone from the API = every pod torn down by its kubelet; the next test's first wait covers the rest

    async def __aenter__(self) -> Workload:
        started = time.monotonic()
        try:
            await self.deploy()
            print(f"{self.prefix}: {len(self.pods)} pods deployed in {time.monotonic() - started:.2f}s")
        except BaseException:
            await self.cleanup()
            raise
        return self

    async def __aexit__(self, *exc: Any) -> None:
        started = time.monotonic()
        await self.cleanup()
        print(f"{self.prefix}: cleaned up in {time.monotonic() - started:.2f}s")

    # --- policies and probes -------------------------------------------------------------
    def documents(self, manifests: list[dict[str, Any]], source: str) -> list[Any]:
        rendered = []
        for m in manifests:
            m = self.render(m)
            meta = m.setdefault("metadata", {})
            if m["kind"] == "Namespace":
                pass
            elif KINDS[m["kind"]].namespaced:
                short = meta.get("namespace", "a")
                meta["namespace"] = self.ns(short) if short in self.namespaces else short
            else:  # cluster-wide objects (CCNP) share one namespace-less name space: make them unique
                meta["name"] = f"{meta['name']}-{self.suffix}"
            rendered.append(m)
        return documents_from(source, rendered)

    async def apply(self, manifests: list[dict[str, Any]], source: str = "case") -> None:
        await cluster.apply_documents(self.state, self.documents(manifests, source))
        await cluster.wait(self.state, timeout=60)

    async def delete(self, manifests: list[dict[str, Any]], source: str = "case") -> None:
        await cluster.delete_documents(self.state, self.documents(manifests, source))
        await cluster.wait(self.state, timeout=60)

    async def add_pods(self, pods: list[PodDef]) -> list[str]:
        """Create pods in the workload's namespaces, wait until they run; returns their IPs."""
        self.pods += pods
        await cluster.apply_documents(self.state, documents_from("add", [self._pod(p) for p in pods]),
                                      dry_run_first=False)
        for p in pods:
            running = await cluster.wait_running(self.state, sum(1 for q in self.pods if q.ns == p.ns),
                                                 namespace=self.ns(p.ns), timeout=60)
            self.ips[p.ref] = running[f"{self.ns(p.ns)}/{p.name}"]
        return [self.ips[p.ref] for p in pods]

    async def delete_pods(self, refs: list[str]) -> None:
        """Delete pods and wait until they are gone from the API (the kubelet has torn them down)."""
        async with cluster.Api(self.state.apiserver_url) as api:
            for ref in refs:
                short, name = ref.split("/", 1)
                await api.request("DELETE", KINDS["Pod"].path(self.ns(short), name))
            for ref in refs:
                short, name = ref.split("/", 1)
                deadline = time.monotonic() + 60
                while True:
                    try:
                        await api.request("GET", KINDS["Pod"].path(self.ns(short), name))
                    except cluster.ApiError as exc:
                        if exc.status == 404:
                            break
                        raise
                    assert time.monotonic() < deadline, f"pod {ref} not deleted"
                    await asyncio.sleep(0.1)
        self.pods = [p for p in self.pods if p.ref not in refs]
        for ref in refs:
            self.ips.pop(ref, None)

    async def step(self, label: str, checks: list[Check], *, apply: list[dict[str, Any]] = (),
                   delete: list[dict[str, Any]] = ()) -> list[str]:
        """Delete and apply manifests, one `sandbox wait` for both, then probe; returns the failures."""
        if delete:
            await cluster.delete_documents(self.state, self.documents(list(delete), label))
        if apply:
            await cluster.apply_documents(self.state, self.documents(list(apply), label))
        await cluster.wait(self.state, timeout=60)
        return await self.verify(label, checks)

    def spec(self, check: Check) -> probe.ProbeSpec:
        source, dest, port, proto, _ = check
        return probe.ProbeSpec(self.netns(source), self.ip(dest), port, proto, source, dest)

    async def verify(self, label: str, checks: Iterable[Check], timeout: float = PROBE_TIMEOUT) -> list[str]:
        """Probe every check in parallel; returns one line per check whose outcome was not the expected."""
        checks = list(checks)
        # a TCP probe is answered by the kernel (handshake); a UDP one needs the echo process scheduled
        # on a busy machine: give it a little longer
        tcp = [i for i, c in enumerate(checks) if c[3] == "TCP"]
        udp = [i for i, c in enumerate(checks) if c[3] != "TCP"]
        got_tcp, got_udp = await asyncio.gather(
            probe.probe_all([self.spec(checks[i]) for i in tcp], timeout=timeout),
            probe.probe_all([self.spec(checks[i]) for i in udp], timeout=max(timeout, UDP_PROBE_TIMEOUT)))
        by_index = dict(zip(tcp, got_tcp)) | dict(zip(udp, got_udp))
        results = [by_index[i] for i in range(len(checks))]
        failures = []
        for (source, dest, port, proto, expected), res in zip(checks, results):
            if res.connected != expected:
                got = f"connected (answered by {res.answered_by})" if res.connected \
                    else f"not connected ({res.error or 'timeout'})"
                failures.append(f"[{label}] {source} -> {dest}:{port}/{proto} expected "
                                f"{'allowed' if expected else 'dropped'}, got {got}")
            elif res.connected and proto == "TCP" and res.answered_by and \
                    res.answered_by != f"{self.ns(dest.split('/')[0])}/{dest.split('/')[1]}":
                failures.append(f"[{label}] {source} -> {dest}:{port}/{proto} answered by {res.answered_by}")
        return failures

    async def run_cases(self, cases: list[Case]) -> list[str]:
        """Every case runs (a failure does not hide the next ones); returns every failure.

        One `sandbox wait` per case: the previous case's manifests are deleted and this case's applied,
        then the wait covers both (it waits for the API's latest revision), then the probes run.
        """
        failures: list[str] = []
        previous: list[dict[str, Any]] = []
        try:
            for case in cases:
                started = time.monotonic()
                if previous:
                    await cluster.delete_documents(self.state, self.documents(previous, "previous case"))
                    previous = []
                if case.manifests:
                    await cluster.apply_documents(self.state, self.documents(case.manifests, case.name))
                    previous = case.manifests
                await cluster.wait(self.state, timeout=60)
                enforced = time.monotonic()
                failures += await self.verify(case.name, case.checks)
                print(f"{case.name}: enforced in {enforced - started:.2f}s, "
                      f"probed in {time.monotonic() - enforced:.2f}s")
        finally:
            if previous:
                await self.delete(previous, "last case")
        return failures


@asynccontextmanager
async def lanes(*workloads: Workload) -> AsyncIterator[tuple[Workload, ...]]:
    """Deploy copies of a workload side by side (cleaned up together, even on failure).

    Why: a case costs one `sandbox wait` (~1 s: unchanged kinds catch up with the API through the
    1 s watch bookmarks) plus the probe timeout; cases running on two copies at once share both.
    """
    try:
        await asyncio.gather(*(w.deploy() for w in workloads))
        yield workloads
    finally:
        results = await asyncio.gather(*(w.cleanup() for w in workloads), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]


async def run_in_lanes(workloads: tuple[Workload, ...], cases: list[Case], exclusive: list[Case] = ()) -> None:
    """Cases dealt round-robin to the copies and run concurrently; `exclusive` ones (cluster-wide policies
    that would reach the other copies) run afterwards on the first copy alone. One assertion lists all."""
    n = len(workloads)
    results = await asyncio.gather(*(w.run_cases(cases[i::n]) for i, w in enumerate(workloads)))
    failures = [f for r in results for f in r]
    failures += await workloads[0].run_cases(list(exclusive))
    assert not failures, "\n" + "\n".join(failures)


# --- manifest builders ---------------------------------------------------------------------

def netpol(name: str, spec: dict[str, Any], ns: str = "a") -> dict[str, Any]:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


def cnp(name: str, spec: dict[str, Any], ns: str = "a") -> dict[str, Any]:
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


def ccnp(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumClusterwideNetworkPolicy",
            "metadata": {"name": name}, "spec": spec}


def sel(**labels: str) -> dict[str, Any]:
    return {"matchLabels": dict(labels)}

