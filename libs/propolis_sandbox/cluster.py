"""Driving a sandbox from outside: up, down, apply/delete, get, probe, wait.

Why separate from the supervisor: these run in the short-lived CLI (and in
tests), talk to the sandbox only through state.json, the Kubernetes API and
NATS, and must work when the supervisor is dead (`down` after a crash finds
everything by name: namespaces `pp-S-…`, pins `/sys/fs/bpf/propolis/S-worker*`,
processes carrying PROPOLIS_SANDBOX=S).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from propolis.errors import CliError, PermanentError, TemporaryError, ValidationError
from propolis.k8s.kinds import Kind
from propolis.runtime.heartbeats import revision_at_least
from propolis_sandbox import cgroups, readiness
from propolis_sandbox import netns as netns_mod
from propolis_sandbox.config import (
    BPF_ROOT,
    RUN_ROOT,
    SANDBOX_ENV,
    SandboxConfig,
    SandboxState,
    allocate,
    allocation_lock,
    existing_sandboxes,
    load_state,
    validate_sandbox_name,
)
from propolis_sandbox.node_ports import NODE_TCP_PORTS
from propolis_sandbox.resources import KINDS, Document, apply_order, load_documents, resolve_kind, validate_documents

UP_TIMEOUT_S = 60.0


# --- up / down -----------------------------------------------------------------------------

def supervisor_alive(state: SandboxState) -> bool:
    pid = state.supervisor_pid
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().split(b"\0")
    except FileNotFoundError:
        return False
    return b"propolis_sandbox.daemon" in cmdline and state.sandbox().name.encode() in cmdline


def up(name: str, *, nodes: int = 2, cluster_cidr: str | None = None, service_cidr: str | None = None,
       services: str = "all", timeout: float = UP_TIMEOUT_S, encryption: str | None = None,
       cluster_id: int = 0, encryption_strict_mode: bool = False,
       encryption_node_encryption: bool = False, nats_replicas: int = 1, nats_relays: int = 0) -> SandboxState:
    """Start sandbox `name` in the background and return its ready state. Idempotent."""
    validate_sandbox_name(name)
    started = time.monotonic()
    existing = load_state(name)
    if existing is not None and supervisor_alive(existing):
        cfg = existing.sandbox()
        if existing.status == "ready":
            if nodes != cfg.nodes:
                raise ValidationError("nodes", f"sandbox {name!r} is already up with {cfg.nodes} nodes; "
                                               f"`propolis sandbox down --name {name}` first to change it")
            if encryption is not None and encryption != cfg.encryption:
                raise ValidationError("encryption", f"sandbox {name!r} is already up with encryption "
                                                    f"{cfg.encryption or 'off'}; `propolis sandbox down --name {name}` "
                                                    "first to change it")
            if cluster_id != cfg.cluster_id:
                raise ValidationError("cluster_id", f"sandbox {name!r} is already up with cluster id "
                                                    f"{cfg.cluster_id}; `propolis sandbox down --name {name}` "
                                                    "first to change it")
            if nats_replicas != cfg.nats_replicas:
                raise ValidationError("nats_replicas", f"sandbox {name!r} is already up with {cfg.nats_replicas} "
                                                       f"NATS servers; `propolis sandbox down --name {name}` first")
            if nats_relays != cfg.nats_relays:
                raise ValidationError("nats_relays", f"sandbox {name!r} is already up with {cfg.nats_relays} NATS "
                                                     f"relays; `propolis sandbox down --name {name}` first")
            return existing
        return _wait_ready(name, timeout)
    if existing is not None or _leftovers_exist(name):
        down(name)  # a dead sandbox's remains: clean before starting afresh
    with allocation_lock():
        cfg = allocate(name, nodes, cluster_cidr, service_cidr)
        cfg.encryption = encryption or ""
        cfg.encryption_strict_mode, cfg.encryption_node_encryption = encryption_strict_mode, encryption_node_encryption
        cfg.cluster_id = cluster_id
        cfg.nats_replicas = nats_replicas
        cfg.nats_relays = nats_relays
        cfg.__post_init__()  # validates the encryption type, cluster id and NATS replicas
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        SandboxState(config=_config_dict(cfg)).save(cfg.state_path)
    cfg.log_dir.mkdir(parents=True, exist_ok=True)
    with open(cfg.log_dir / "supervisor.log", "ab") as logf:
        proc = subprocess.Popen(supervisor_command(name, services), stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                cwd="/", start_new_session=True, env=dict(os.environ, **{SANDBOX_ENV: name}))
    try:
        state = _wait_ready(name, timeout, proc)
        _run_blocking(readiness.wait_healthy(state, timeout=max(5.0, timeout - (time.monotonic() - started))))
        return state
    except CliError:
        down(name)
        raise


def _run_blocking(coro: Any) -> Any:
    """Run ``coro`` to completion from this synchronous API, also when the caller is inside an event
    loop (async tests, `propolis demo`): then on a loop of its own in a worker thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="sandbox-up") as pool:
        return pool.submit(asyncio.run, coro).result()


def supervisor_command(name: str, services: str) -> list[str]:
    return [sys.executable, "-m", "propolis_sandbox.daemon", "--name", name, "--services", services]


def _config_dict(cfg: SandboxConfig) -> dict[str, Any]:
    out: dict[str, Any] = {"name": cfg.name, "nodes": cfg.nodes, "index": cfg.index,
                           "cluster_cidr": cfg.cluster_cidr, "service_cidr": cfg.service_cidr}
    if cfg.encryption:  # only when on: state.json of an unencrypted sandbox stays as it was
        out["encryption"] = cfg.encryption
    for option in ("encryption_strict_mode", "encryption_node_encryption"):
        if getattr(cfg, option):
            out[option] = True
    if cfg.cluster_id:  # only when set: Cluster Mesh
        out["cluster_id"] = cfg.cluster_id
    if cfg.nats_replicas != 1:  # only when clustered
        out["nats_replicas"] = cfg.nats_replicas
    if cfg.nats_relays:  # only with a relay tier
        out["nats_relays"] = cfg.nats_relays
    return out


def _wait_ready(name: str, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> SandboxState:
    deadline = time.monotonic() + timeout
    log_path = SandboxConfig(name=name).log_dir / "supervisor.log"
    while time.monotonic() < deadline:
        state = load_state(name)
        if state is not None and state.status == "ready":
            return state
        if state is not None and state.status == "failed":
            raise CliError(f"sandbox {name} failed to start: {state.error}\n{_tail(log_path)}")
        if proc is not None and proc.poll() is not None:
            raise CliError(f"sandbox {name} supervisor exited with {proc.returncode}\n{_tail(log_path)}")
        time.sleep(0.05)
    raise CliError(f"sandbox {name} not ready within {timeout:.0f}s\n{_tail(log_path)}")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""


def _other_sandbox_names(name: str) -> list[str]:
    others = []
    if RUN_ROOT.is_dir():
        others = [d.name for d in RUN_ROOT.iterdir() if d.is_dir() and d.name != name]
    return others


def owned_netns(name: str) -> list[str]:
    """Namespaces of sandbox `name`, by prefix, minus those of another sandbox whose name extends it."""
    cfg = SandboxConfig(name=name)
    longer = [SandboxConfig(name=o) for o in _other_sandbox_names(name) if o.startswith(name + "-")]
    return [ns for ns in netns_mod.list_netns()
            if cfg.owns_netns(ns) and not any(o.owns_netns(ns) for o in longer)]


def owned_pin_dirs(name: str) -> list[Path]:
    cfg = SandboxConfig(name=name)
    if not BPF_ROOT.is_dir():
        return []
    return [d for d in BPF_ROOT.iterdir() if cfg.owns_pin_dir(d.name)]


def _leftovers_exist(name: str) -> bool:
    return bool(owned_netns(name) or owned_pin_dirs(name) or (RUN_ROOT / name).exists()
                or cgroups.sandbox_cgroup_exists(name))


@dataclass
class DownReport:
    processes: list[int] = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)
    pin_dirs: list[str] = field(default_factory=list)
    run_dir: str = ""
    cgroups: list[str] = field(default_factory=list)


def down(name: str) -> DownReport:
    """Stop every process and remove every namespace, pin dir and the run dir of sandbox `name`."""
    validate_sandbox_name(name)
    report = DownReport()
    state = load_state(name)
    if state is not None and supervisor_alive(state):
        netns_mod.terminate([state.supervisor_pid], timeout=15.0)
        report.processes.append(state.supervisor_pid)
    namespaces = owned_netns(name)
    leftovers = netns_mod.pids_with_env(SANDBOX_ENV, name) + netns_mod.pids_in_netns(namespaces)
    leftovers = [p for p in set(leftovers) if p != os.getpid()]
    netns_mod.terminate(leftovers, timeout=5.0)
    report.processes += leftovers
    # pods first, then nodes, then the underlay: deleting a pod namespace takes its veth with it
    cfg = SandboxConfig(name=name)
    node_like = {cfg.node_netns(n) for n in range(1, 256)} | {cfg.underlay_netns}
    ordered = [n for n in namespaces if n not in node_like] + [n for n in namespaces if n in node_like]
    for ns in ordered:
        netns_mod.delete_netns(ns)
        report.namespaces.append(ns)
    for pin in owned_pin_dirs(name):  # socket LB's links go with them: nothing stays attached to a cgroup
        shutil.rmtree(pin, ignore_errors=True)
        report.pin_dirs.append(str(pin))
    report.cgroups = cgroups.remove_sandbox_cgroups(name)  # after the processes: a cgroup goes once empty
    run_dir = RUN_ROOT / name
    if run_dir.exists():
        shutil.rmtree(run_dir, ignore_errors=True)
        report.run_dir = str(run_dir)
    return report


def require_state(name: str) -> SandboxState:
    state = load_state(name)
    if state is None:
        raise CliError(f"sandbox {name!r} is not up (no {RUN_ROOT / name / 'state.json'}); "
                       f"run `propolis sandbox up --name {name}`")
    if state.status != "ready":
        raise CliError(f"sandbox {name!r} is {state.status}{': ' + state.error if state.error else ''}")
    return state


# --- the Kubernetes API, generically --------------------------------------------------------

class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


class Api:
    """A small generic client for the sandbox API (any kind in resources.KINDS, by path)."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Api:
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.session is not None:
            await self.session.close()

    async def request(self, method: str, path: str, *, body: Any = None, params: dict[str, str] | None = None,
                      content_type: str = "application/json") -> dict[str, Any]:
        assert self.session is not None
        data = json.dumps(body) if body is not None else None
        try:
            async with self.session.request(method, self.base_url + path, data=data, params=params,
                                            headers={"Content-Type": content_type}) as resp:
                text = await resp.text()
                payload = json.loads(text) if text.strip() else {}
                if resp.status >= 400:
                    raise ApiError(resp.status, payload.get("message", text[:300]) if isinstance(payload, dict) else text)
                return payload
        except aiohttp.ClientError as exc:
            raise TemporaryError(f"{method} {path}: {exc}") from exc

    async def get(self, kind: Kind, namespace: str | None, name: str) -> dict[str, Any]:
        return await self.request("GET", kind.path(namespace, name))

    async def list(self, kind: Kind, namespace: str | None = None) -> dict[str, Any]:
        return await self.request("GET", kind.path(namespace))

    async def resource_version(self) -> str:
        """The API's latest revision (any list carries it)."""
        body = await self.list(KINDS["Namespace"])
        return str(body.get("metadata", {}).get("resourceVersion", ""))


# --- apply / delete ------------------------------------------------------------------------

class ApplyFailed(CliError):
    """Some documents were not applied: `lines` holds every document's outcome, as `kubectl apply` prints them;
    the message names each failure with the API's own words."""

    def __init__(self, lines: list[str], failures: list[str], *, nothing_applied: bool = False) -> None:
        what = "nothing was applied" if nothing_applied else f"{len(failures)} of them failed"
        super().__init__(f"{what}:\n  " + "\n  ".join(failures))
        self.lines = lines
        self.failures = failures


async def apply(state: SandboxState, paths: list[str], *, dry_run_first: bool = True) -> list[str]:
    """Validate every document first (nothing is applied if one is bad), then create-or-replace each."""
    return await apply_documents(state, load_documents(paths), dry_run_first=dry_run_first)


async def apply_documents(state: SandboxState, docs: list[Document], *, dry_run_first: bool = True) -> list[str]:
    """kubectl apply's outcome per document (`networkpolicy.networking.k8s.io/foo created|configured|unchanged`).

    A document the API refuses at write time does not stop the others (as kubectl); ApplyFailed then carries
    every outcome. One refused by the dry run stops everything before the first write."""
    validate_documents(docs)
    out: list[str] = []
    async with Api(state.apiserver_url) as api:
        namespaces = {d.name for d in docs if d.kind.kind == "Namespace"}
        missing: set[str] = set()
        for ns in sorted({d.namespace for d in docs if d.namespace is not None} - namespaces):
            try:
                await api.get(KINDS["Namespace"], None, ns)
            except ApiError as exc:
                if exc.status != 404:
                    raise
                missing.add(ns)
        if dry_run_first:
            refused = [f"{doc.where}: {message}" for doc in docs if (message := await _dry_run(api, doc))]
            if refused:
                raise ApplyFailed([], refused, nothing_applied=True)
        for ns in sorted(missing):
            await api.request("POST", KINDS["Namespace"].path(None),
                              body={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
            out.append(f"namespace/{ns} created (implicitly)")
        failures = []
        for doc in sorted(docs, key=lambda d: apply_order(d.kind)):
            try:
                out.append(f"{kubectl_name(doc)} {await _apply_one(api, doc)}")
            except ApiError as exc:
                failures.append(f"{doc.where}: {exc.message}")
        if failures:
            raise ApplyFailed(out, failures)
    return out


def kubectl_name(doc: Document) -> str:
    """`pod/web`, `networkpolicy.networking.k8s.io/foo`: how kubectl names an object in its output."""
    group = doc.kind.api_version.rpartition("/")[0]
    return f"{doc.kind.singular}{'.' + group if group else ''}/{doc.name}"


async def _dry_run(api: Api, doc: Document) -> str:
    """Server-side validation without persisting (dryRun=All): the API's refusal, or "" when accepted."""
    try:
        await api.request("POST", doc.kind.path(doc.namespace), body=doc.body, params={"dryRun": "All"})
    except ApiError as exc:
        if exc.status in (409, 404):  # exists already (replace later) / namespace created later
            return ""
        if exc.status in (400, 413, 422):
            return f"refused by the API server: {exc.message}"
        raise
    return ""


async def _apply_one(api: Api, doc: Document) -> str:
    """created, configured or unchanged (a replace the API found identical keeps its resourceVersion)."""
    try:
        await api.request("POST", doc.kind.path(doc.namespace), body=doc.body)
        return "created"
    except ApiError as exc:
        if exc.status != 409:
            raise
    current = await api.get(doc.kind, doc.namespace, doc.name)
    current_rv = current.get("metadata", {}).get("resourceVersion", "")
    body = json.loads(json.dumps(doc.body))
    body.setdefault("metadata", {})["resourceVersion"] = current_rv
    if "status" in current and "status" not in body:
        body["status"] = current["status"]
    if doc.kind.kind == "Pod":
        # pods are immutable apart from a few fields in Kubernetes: keep the binding the scheduler made
        body.setdefault("spec", {}).setdefault("nodeName", current.get("spec", {}).get("nodeName", ""))
    replaced = await api.request("PUT", doc.kind.path(doc.namespace, doc.name), body=body)
    return "unchanged" if replaced.get("metadata", {}).get("resourceVersion") == current_rv else "configured"


async def delete(state: SandboxState, paths: list[str]) -> list[str]:
    return await delete_documents(state, load_documents(paths))


async def delete_documents(state: SandboxState, docs: list[Document]) -> list[str]:
    validate_documents(docs)
    out = []
    async with Api(state.apiserver_url) as api:
        for doc in sorted(docs, key=lambda d: -apply_order(d.kind)):
            label = f"{doc.kind.singular}/{doc.name}" + (f" in {doc.namespace}" if doc.kind.namespaced else "")
            try:
                await api.request("DELETE", doc.kind.path(doc.namespace, doc.name))
                out.append(f"{label} deleted")
            except ApiError as exc:
                if exc.status != 404:
                    raise CliError(f"{doc.where}: {exc.message}") from None
                out.append(f"{label} not found")
    return out


async def get(state: SandboxState, kind_name: str, target: str | None) -> Any:
    kind = resolve_kind(kind_name)
    async with Api(state.apiserver_url) as api:
        if target is None:
            body = await api.list(kind)
            return body
        namespace, name = split_target(target, kind.namespaced)
        try:
            return await api.get(kind, namespace, name)
        except ApiError as exc:
            raise CliError(f"{kind.singular} {target}: {exc.message}") from None


def split_target(target: str, namespaced: bool = True) -> tuple[str | None, str]:
    if not namespaced:
        return None, target
    if "/" in target:
        ns, _, name = target.partition("/")
        return ns, name
    return "default", target


# --- probes --------------------------------------------------------------------------------

@dataclass
class Destination:
    ip: str
    label: str
    ports: dict[str, list[int]]  # protocol -> declared ports (first is the default)
    addresses: list[str] = field(default_factory=list)  # every address a DNS name resolved to (ip is the first)


async def resolve_destination(api: Api, target: str, *, from_netns: str = "") -> Destination:
    """TO of `probe`: ns/pod, ns/service (its ClusterIP), an IP (`world:IP` for a world host), `node:NAME` (its
    InternalIP), or a DNS name.

    A name is resolved by the pod in `from_netns` itself (`pod_dns.py`: its resolv.conf, through kube-dns);
    without one, only a Service's cluster name (`svc.ns[.svc[.cluster.local]]`) is answered, from the API."""
    if target.startswith("node:"):  # the node's InternalIP; its listeners: sandbox/node_ports.py
        node = await api.get(KINDS["Node"], None, target.removeprefix("node:"))
        ips = [a["address"] for a in node.get("status", {}).get("addresses", []) if a.get("type") == "InternalIP"]
        if not ips:
            raise CliError(f"probe target {target!r}: the node has no InternalIP")
        return Destination(ips[0], target, {"TCP": list(NODE_TCP_PORTS)})
    address = target.removeprefix("world:")  # `world:203.0.113.10`: a world host (sandbox/world.py), by address
    try:
        ipaddress.IPv4Address(address)
        return Destination(address, target, {})
    except ValueError:
        pass
    if "/" not in target and from_netns:
        from propolis_sandbox import pod_dns
        addresses = await pod_dns.resolve(from_netns, target)
        ports: dict[str, list[int]] = {}
        parts = target.rstrip(".").split(".")
        if len(parts) >= 2 and parts[2:] in ([], ["svc"], ["svc", "cluster", "local"]):
            try:  # a Service's name: its declared ports are the default, as before
                ports = (await _service_destination(api, parts[1], parts[0], target)).ports
            except CliError:
                pass
        return Destination(addresses[0], target, ports, addresses)
    if "/" not in target:
        parts = target.rstrip(".").split(".")
        if len(parts) < 2 or parts[2:] not in ([], ["svc"], ["svc", "cluster", "local"]):
            raise CliError(f"probe target {target!r}: only cluster Service names resolve here (svc.ns, "
                           "svc.ns.svc[.cluster.local]); nothing leaves the sandbox. Or use ns/pod, ns/service, an IP")
        return await _service_destination(api, parts[1], parts[0], target, not_found=(
            f"{target}: no Service {parts[0]} in namespace {parts[1]} (only cluster Service names resolve here; "
            "nothing leaves the sandbox)"))
    namespace, name = split_target(target)
    try:
        pod = await api.get(KINDS["Pod"], namespace, name)
        ip = pod.get("status", {}).get("podIP", "")
        if not ip:
            raise CliError(f"pod {target} has no IP yet (phase {pod.get('status', {}).get('phase', 'Pending')})")
        return Destination(ip, target, pod_ports(pod))
    except ApiError as exc:
        if exc.status != 404:
            raise
    return await _service_destination(api, namespace, name, target)


async def _service_destination(api: Api, namespace: str | None, name: str, target: str, *,
                               not_found: str = "") -> Destination:
    try:
        svc = await api.get(KINDS["Service"], namespace, name)
    except ApiError as exc:
        if exc.status == 404:
            raise CliError(not_found or f"no pod or service named {target}") from None
        raise
    ip = svc.get("spec", {}).get("clusterIP", "")
    if not ip or ip == "None":
        raise CliError(f"service {target} has no ClusterIP")
    ports: dict[str, list[int]] = {}
    for port in svc.get("spec", {}).get("ports", []) or []:
        ports.setdefault(str(port.get("protocol", "TCP")).upper(), []).append(int(port["port"]))
    return Destination(ip, target, ports)


def pod_ports(pod: dict[str, Any]) -> dict[str, list[int]]:
    ports: dict[str, list[int]] = {}
    for container in pod.get("spec", {}).get("containers", []) or []:
        for port in container.get("ports", []) or []:
            ports.setdefault(str(port.get("protocol", "TCP")).upper(), []).append(int(port["containerPort"]))
    return ports


def source_netns(state: SandboxState, source: str) -> str:
    """FROM of `probe`: ns/pod, `node:NAME` (the node's own namespace) or `world` (outside the cluster)."""
    cfg = state.sandbox()
    if source == "world":
        netns = cfg.world_netns
    elif source.startswith("node:"):
        node = source.removeprefix("node:")
        if node not in cfg.node_names():
            raise CliError(f"probe source {source!r}: no node {node} (nodes: {', '.join(cfg.node_names())})")
        netns = cfg.node_netns(cfg.node_names().index(node) + 1)
    else:
        netns = ""
    if netns:
        if not netns_mod.netns_exists(netns):
            raise CliError(f"probe source {source!r}: namespace {netns} does not exist")
        return netns
    namespace, name = split_target(source)
    netns = state.sandbox().pod_netns(namespace or "default", name)
    if not netns_mod.netns_exists(netns):
        raise CliError(f"pod {namespace}/{name} has no network namespace in sandbox {state.sandbox().name} "
                       "(not scheduled or not running yet?)")
    return netns


def source_cgroup(state: SandboxState, source: str) -> Path | None:
    """The cgroup a command or probe FROM `node:NAME` runs in: the node's own (socket LB applies there)."""
    if not source.startswith("node:"):
        return None
    return cgroups.node_cgroup(state.sandbox().name, source.removeprefix("node:"))


async def running_pods(api: Api, state: SandboxState) -> list[dict[str, Any]]:
    body = await api.list(KINDS["Pod"])
    cfg = state.sandbox()
    pods = []
    for pod in body.get("items", []):
        meta = pod.get("metadata", {})
        if pod.get("status", {}).get("podIP") and not meta.get("deletionTimestamp") and \
                netns_mod.netns_exists(cfg.pod_netns_of(pod)):
            pods.append(pod)
    return sorted(pods, key=lambda p: (p["metadata"].get("namespace", ""), p["metadata"]["name"]))


async def wait_running(state: SandboxState, count: int, *, namespace: str | None = None,
                       timeout: float = 60.0) -> dict[str, str]:
    """Block until ``count`` pods (of ``namespace``, or all) run with an IP; returns "ns/name" -> IP."""
    deadline = time.monotonic() + timeout
    async with Api(state.apiserver_url) as api:
        while True:
            pods = {f"{p['metadata'].get('namespace', 'default')}/{p['metadata']['name']}": p["status"]["podIP"]
                    for p in await running_pods(api, state)
                    if namespace is None or p["metadata"].get("namespace") == namespace}
            if len(pods) >= count:
                return pods
            if time.monotonic() > deadline:
                raise CliError(f"only {len(pods)}/{count} pods running after {timeout:.0f} s: {sorted(pods)}")
            await asyncio.sleep(0.05)


# --- wait ----------------------------------------------------------------------------------

def expected_reporters(state: SandboxState) -> list[tuple[str, str]]:
    """(service, node) pairs whose heartbeat progress `wait` waits for: kubelets + progress-reporting services."""
    from propolis.suite import SUITE_SERVICES
    reporting = {s.name for s in SUITE_SERVICES if s.reports_progress}
    pairs = [("kubelet", n["name"]) for n in state.nodes]
    pairs += [(s["name"], s["node"]) for s in state.services if s["name"] in reporting]
    return pairs


async def wait(state: SandboxState, *, timeout: float = 60.0) -> dict[str, str]:
    """Block until every expected reporter's heartbeat says it caught up with the API's latest revision.

    ``timeout`` is a hard limit on the whole call (API, NATS connect and every read included), so a slow
    or stuck NATS fails it on time, saying how far each reporter got."""
    from propolis.runtime.heartbeats import is_live, newest, read_heartbeats_answered

    seen: dict[str, Any] = {"target": "?", "progress": {}, "reasons": {}, "unanswered": ""}
    bus = state.admin_bus("propolis-sandbox-wait")

    async def caught_up() -> dict[str, str]:
        async with Api(state.apiserver_url) as api:
            target = seen["target"] = await api.resource_version()
        wanted = expected_reporters(state)
        await bus.connect(max_wait=timeout)
        while True:
            heartbeats = await read_heartbeats_answered(bus, unanswered=lambda why: seen.update(unanswered=why))
            now = time.time()
            live = [hb for hb in heartbeats if is_live(hb, now)]  # a dead instance says nothing
            latest = {(s, n): newest(live, s, n) for s, n in wanted}
            seen["reasons"] = {f"{s}/{n}": "; ".join(c.get("reason", "") for c in hb.components.values()
                                                    if c.get("reason"))
                               for (s, n), hb in latest.items() if hb is not None}
            progress = seen["progress"] = {f"{s}/{n}": str(hb.progress.get("k8s_resource_version", "")) if hb else ""
                                           for (s, n), hb in latest.items()}
            if all(revision_at_least(rv, target) for rv in progress.values()):
                return {"resourceVersion": target, **progress}
            await asyncio.sleep(0.05)

    try:
        return await asyncio.wait_for(caught_up(), timeout)
    except (TimeoutError, TemporaryError) as exc:
        progress, reasons = seen["progress"], seen["reasons"]
        behind = [k for k, rv in progress.items() if not revision_at_least(rv, seen["target"])]
        detail = (", ".join(f"{k} at {progress[k] or 'nothing'}" + (f" ({reasons[k]})" if reasons.get(k) else "")
                            for k in behind) if progress else f"no heartbeats read ({exc or 'NATS too slow'})")
        if seen["unanswered"]:
            detail += f"; NATS did not answer the last heartbeat read: {seen['unanswered']}"
        raise CliError(f"not caught up with resourceVersion {seen['target']} within {timeout:.0f}s: {detail}") from None
    finally:
        await bus.close(timeout=0.5)


def down_all() -> list[DownReport]:
    """`down --all`: every sandbox with a state file on this machine (not other run dirs like `dev`)."""
    return [down(name) for name in sorted(existing_sandboxes()) if _is_sandbox_name(name)]


def _is_sandbox_name(name: str) -> bool:
    try:
        validate_sandbox_name(name)
        return True
    except ValidationError:
        return False


def load_state_or_fail(name: str) -> SandboxState:
    state = load_state(name)
    if state is None:
        raise CliError(f"sandbox {name!r} has no state file")
    return state


__all__ = ["up", "down", "down_all", "apply", "delete", "get", "wait", "Api", "ApiError", "require_state",
           "PermanentError"]
