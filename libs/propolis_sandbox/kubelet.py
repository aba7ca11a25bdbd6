"""The sandbox's kubelet (one per node) and scheduler: pods become namespaces wired by the CNI plugin.

Why its own kubelet: there is no container runtime here, yet everything the
suite reacts to — a pod getting an IP through CNI ADD, becoming Ready, going
away through CNI DEL — must happen exactly as on a real node. Per pod:

  create `pp-S-<ns>-<pod>` -> CNI ADD (plugin run in the node namespace, spec 1.0
  env + stdin) -> start the echo server on every containerPort -> write
  status.podIP/podIPs/phase Running/Ready via the status subresource.

Deletion (a deletionTimestamp, or the object gone) runs the reverse: stop the
server, CNI DEL, remove the namespace, then finalize (delete with grace 0).
A `spec.hostNetwork` pod gets neither namespace nor CNI call: its server runs in
the node's namespace (and, like every pod's, the node's cgroup), its podIP is the
node's InternalIP, and its teardown stops only its own processes (found by
`POD_UID_ENV`, never by the node's namespace).
The loop is level-triggered: a watch event only marks a pod dirty and
`sync_pod` compares what the API wants with what exists, so restarts adopt
existing pods (records under /run/propolis/S/<node>/pods/) and failures retry
with back-off. `synced_resource_version` is what `propolis sandbox wait`
reads through the kubelet heartbeat: the API revision at which every pod of
this node was in its desired state.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from propolis.cni.plugin import host_ifname
from propolis.errors import TemporaryError, ValidationError
from propolis_sandbox import cgroups, kube_api
from propolis_sandbox import netns as netns_mod
from propolis_sandbox.config import POD_UID_ENV, SANDBOX_ENV, SandboxConfig
from propolis_sandbox.kube_api import PODS

log = logging.getLogger("propolis_sandbox.kubelet")

CNI_IFNAME = "eth0"
CNI_BIN_DIRS = [str(Path(sys.executable).parent), "/usr/lib/cni", "/opt/cni/bin"]
ECHO_READY_TIMEOUT_S = 10.0
RESYNC_INTERVAL_S = 1.0
MAX_PARALLEL_SANDBOXES = 8
#: Images whose pods run a sandbox program instead of the echo server, as a runtime would run the image.
WORKLOAD_IMAGES = {"registry.k8s.io/coredns/coredns": "kube-dns", "apache/kafka": "kafka"}


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def pod_key(obj: dict[str, Any]) -> tuple[str, str]:
    meta = obj.get("metadata", {})
    return meta.get("namespace", "default"), meta.get("name", "")


def pod_workload(obj: dict[str, Any]) -> str:
    """The sandbox program a pod's image stands for (`WORKLOAD_IMAGES`), "" for the echo server."""
    for container in obj.get("spec", {}).get("containers", []) or []:
        image = str(container.get("image", "")).split("@", 1)[0].rsplit(":", 1)[0]
        if image in WORKLOAD_IMAGES:
            return WORKLOAD_IMAGES[image]
    return ""


def container_ports(obj: dict[str, Any]) -> tuple[list[int], list[int]]:
    """(tcp ports, udp ports) declared by the pod's containers."""
    tcp: list[int] = []
    udp: list[int] = []
    for container in obj.get("spec", {}).get("containers", []) or []:
        for port in container.get("ports", []) or []:
            number = int(port.get("containerPort", 0))
            if not number:
                continue
            (udp if str(port.get("protocol", "TCP")).upper() == "UDP" else tcp).append(number)
    return sorted(set(tcp)), sorted(set(udp))


def grpc_ports(obj: dict[str, Any]) -> list[int]:
    """TCP ports whose name starts with `grpc` (as Istio and Cilium name gRPC ports): the pod serves gRPC there."""
    return sorted({int(port["containerPort"]) for container in obj.get("spec", {}).get("containers", []) or []
                   for port in container.get("ports", []) or []
                   if str(port.get("name", "")).startswith("grpc") and port.get("containerPort")
                   and str(port.get("protocol", "TCP")).upper() == "TCP"})


@dataclass
class PodRecord:
    """What the kubelet created for a pod (persisted: a restarted kubelet adopts it)."""

    namespace: str
    name: str
    uid: str
    container_id: str
    netns: str
    host_ifname: str
    ip: str = ""
    mac: str = ""
    echo_pid: int = 0
    ports: dict[str, list[int]] = field(default_factory=dict)
    workload: str = ""  # pod_workload(): "" = the echo server
    host_network: bool = False  # spec.hostNetwork: `netns` is the node's, `ip` its InternalIP, no CNI
    cni_result: dict[str, Any] = field(default_factory=dict)
    started_at: str = ""


class CniRuntime:
    """Calls `propolis-cni` exactly as a container runtime does, inside the node namespace."""

    def __init__(self, cfg: SandboxConfig, node_netns: str, conf: dict[str, Any]) -> None:
        self.cfg = cfg
        self.node_netns = node_netns
        self.conf = conf

    async def invoke(self, command: str, record: PodRecord, prev_result: dict[str, Any] | None = None) -> dict[str, Any]:
        conf = dict(self.conf)
        if prev_result is not None:
            conf["prevResult"] = prev_result
        env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": record.container_id,
            "CNI_NETNS": netns_mod.netns_path(record.netns),
            "CNI_IFNAME": CNI_IFNAME,
            "CNI_PATH": ":".join(CNI_BIN_DIRS),
            "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE={record.namespace};K8S_POD_NAME={record.name};"
                        f"K8S_POD_INFRA_CONTAINER_ID={record.container_id};K8S_POD_UID={record.uid}",
            SANDBOX_ENV: self.cfg.name,
        }
        plugin = str(Path(sys.executable).parent / "propolis-cni")
        proc = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", self.node_netns, plugin, env=env,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate(json.dumps(conf).encode())
        if proc.returncode != 0:
            try:
                detail = json.loads(out)
                message = f"CNI {command} failed (code {detail.get('code')}): {detail.get('msg')}"
                if detail.get("details"):
                    message += f": {detail['details']}"
            except ValueError:
                message = f"CNI {command} exited {proc.returncode}: {(err or out).decode(errors='replace').strip()}"
            raise TemporaryError(message)
        return json.loads(out) if out.strip() else {}


class Kubelet:
    """One node's kubelet: watch its pods, make namespaces/CNI/echo servers match them."""

    def __init__(self, cfg: SandboxConfig, node: str, api: client.ApiClient, cni_conf: dict[str, Any],
                 *, datapath_socket_required: bool = False) -> None:
        self.cfg = cfg
        self.node = node
        self.node_number = cfg.node_number(node)
        self.node_netns = cfg.node_netns(self.node_number)
        self.api = api
        if not api.configuration.host:
            raise ValidationError("api", f"kubelet {node}: the API client has no host")
        self.apiserver_url: str = api.configuration.host
        self.cni = CniRuntime(cfg, self.node_netns, cni_conf)
        self.datapath_socket_required = datapath_socket_required
        self.record_dir = cfg.node_dir(node) / "pods"
        self.log_dir = cfg.log_dir / "pods"
        self.cache: dict[tuple[str, str], dict[str, Any]] = {}
        self.records: dict[tuple[str, str], PodRecord] = {}
        self.echo_procs: dict[tuple[str, str], asyncio.subprocess.Process] = {}
        self.dirty: set[tuple[str, str]] = set()
        self.running: dict[tuple[str, str], asyncio.Task[None]] = {}
        self.failures: dict[tuple[str, str], int] = {}
        self.retry_at: dict[tuple[str, str], float] = {}
        self.errors: dict[tuple[str, str], str] = {}
        self.gate = asyncio.Semaphore(MAX_PARALLEL_SANDBOXES)
        self.synced_resource_version = ""
        self.progress_changed = asyncio.Event()
        #: the revision the pod watch has delivered everything up to (events and bookmarks)
        self.watch_rv = ""
        self._stopping = False

    # --- records ----------------------------------------------------------------------
    def _record_path(self, key: tuple[str, str]) -> Path:
        return self.record_dir / f"{key[0]}_{key[1]}.json"

    def _save(self, record: PodRecord) -> None:
        self.record_dir.mkdir(parents=True, exist_ok=True)
        path = self._record_path((record.namespace, record.name))
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(record)))
        os.replace(tmp, path)

    def load_records(self) -> None:
        if not self.record_dir.is_dir():
            return
        for path in self.record_dir.glob("*.json"):
            try:
                record = PodRecord(**json.loads(path.read_text()))
            except (ValueError, TypeError):
                path.unlink(missing_ok=True)
                continue
            self.records[(record.namespace, record.name)] = record

    # --- main loop --------------------------------------------------------------------
    async def run(self) -> None:
        """List+watch this node's pods forever (relist on 410 or a broken stream)."""
        self.load_records()
        selector = f"spec.nodeName={self.node}"
        resync = asyncio.create_task(self._resync_loop(), name=f"kubelet-resync-{self.node}")
        try:
            while not self._stopping:
                try:
                    rv = await self._list(selector)
                    await self._watch(selector, rv)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - API away or 410: relist after a pause
                    log.info("kubelet %s: relisting after %s", self.node, exc)
                    await asyncio.sleep(0.5)
        finally:
            resync.cancel()
            await asyncio.gather(resync, return_exceptions=True)

    async def _list(self, selector: str) -> str:
        body = await kube_api.call(self.api, "GET", PODS.path(), query=[("fieldSelector", selector)])
        fresh = {pod_key(item): item for item in body.get("items", [])}
        for key in set(self.cache) | set(fresh) | set(self.records):
            if key in fresh:
                self.cache[key] = fresh[key]
            else:
                self.cache.pop(key, None)
            self.mark(key)
        return str(body.get("metadata", {}).get("resourceVersion", ""))

    async def _watch(self, selector: str, rv: str) -> None:
        while not self._stopping:
            resp = await kube_api.request(self.api, "GET", PODS.path(), query=[
                ("fieldSelector", selector), ("watch", "true"), ("resourceVersion", rv),
                ("allowWatchBookmarks", "true"), ("timeoutSeconds", "300")])
            async with resp:
                if resp.status != 200:
                    raise TemporaryError(f"watch answered {resp.status}: {(await resp.text())[:200]}")
                async for line in resp.content:
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    kind, obj = event.get("type"), event.get("object", {})
                    if kind not in ("ADDED", "MODIFIED", "DELETED", "BOOKMARK", "ERROR") or not isinstance(obj, dict):
                        raise TemporaryError(f"not a watch event: {line[:100]!r}")
                    if kind == "ERROR":
                        raise TemporaryError(f"watch error: {obj.get('message', obj)}")
                    rv = str(obj.get("metadata", {}).get("resourceVersion", rv))
                    self.watch_rv = rv
                    if kind == "BOOKMARK":
                        # the API moved on (e.g. a policy changed): this node is caught up if its pods are
                        self.publish_progress(self.cache, rv)
                        continue
                    key = pod_key(obj)
                    if kind == "DELETED":
                        self.cache.pop(key, None)
                    else:
                        self.cache[key] = obj
                    self.mark(key)

    def mark(self, key: tuple[str, str]) -> None:
        """Something changed for `key`: (re)run its sync now, or right after the running one."""
        self.dirty.add(key)
        if key not in self.running:
            self._start_sync(key)

    def _start_sync(self, key: tuple[str, str]) -> None:
        self.dirty.discard(key)
        self.running[key] = asyncio.create_task(self._sync_guarded(key), name=f"kubelet-sync-{key[0]}/{key[1]}")

    async def _sync_guarded(self, key: tuple[str, str]) -> None:
        try:
            async with self.gate:
                await self.sync_pod(key)
            self.failures.pop(key, None)
            self.retry_at.pop(key, None)
            self.errors.pop(key, None)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure retries with back-off
            count = self.failures.get(key, 0) + 1
            self.failures[key] = count
            delay = min(0.2 * 2 ** (count - 1), 10.0)
            self.retry_at[key] = time.monotonic() + delay
            self.errors[key] = str(exc)
            log.warning("kubelet %s: pod %s/%s: %s (retry in %.1fs)", self.node, key[0], key[1], exc, delay)
            await self._report_failure(key, str(exc))
        finally:
            self.running.pop(key, None)
            if key in self.dirty and not self._stopping:
                self._start_sync(key)
            elif self.watch_rv:
                self.publish_progress(self.cache, self.watch_rv)

    async def _resync_loop(self) -> None:
        """Retry failed pods, restart dead servers, and compute the revision this node has caught up with."""
        while True:
            await asyncio.sleep(RESYNC_INTERVAL_S)
            now = time.monotonic()
            for key, when in list(self.retry_at.items()):
                if when <= now and key not in self.running:
                    self.retry_at.pop(key, None)
                    self.mark(key)
            for key, proc in list(self.echo_procs.items()):
                if proc.returncode is not None and key in self.records and key not in self.running:
                    self.mark(key)
            try:
                await self.refresh_progress()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - API away: keep the last progress
                log.debug("kubelet %s: progress check failed: %s", self.node, exc)

    async def refresh_progress(self) -> None:
        """Publishes `synced_resource_version` = the API's revision if every pod of this node is as wanted."""
        body = await kube_api.call(self.api, "GET", PODS.path(), query=[("fieldSelector", f"spec.nodeName={self.node}")])
        rv = str(body.get("metadata", {}).get("resourceVersion", ""))
        wanted = {pod_key(item): item for item in body.get("items", [])}
        self._catch_up(wanted, rv)
        self.publish_progress(wanted, rv)

    def publish_progress(self, wanted: dict[tuple[str, str], dict[str, Any]], rv: str) -> None:
        """`synced_resource_version` = rv when every pod of `wanted` (this node's, as of rv) is as wanted.

        Called with the watch's view on every bookmark and after every pod sync (milliseconds after a
        change), and with a fresh list by the periodic resync (the safety net)."""
        if self.running or self.dirty or self.retry_at:
            return
        for key, item in wanted.items():
            record = self.records.get(key)
            terminating = bool(item.get("metadata", {}).get("deletionTimestamp"))
            if terminating or record is None or record.uid != item["metadata"].get("uid"):
                return
            if not item.get("status", {}).get("podIP"):
                return
        if set(self.records) - set(wanted):
            return
        if rv != self.synced_resource_version:
            self.synced_resource_version = rv
            self.progress_changed.set()

    def _catch_up(self, listed: dict[tuple[str, str], dict[str, Any]], list_rv: str) -> None:
        """Level-triggered safety net: anything the watch missed (e.g. a pod bound to this node) is synced."""
        for key, item in listed.items():
            cached = self.cache.get(key)
            if cached is None or _rv_newer(item, cached):
                self.cache[key] = item
                self.mark(key)
        for key in list(self.cache):
            if key not in listed and _rv_int(self.cache[key]) <= _int_or_zero(list_rv):
                self.cache.pop(key, None)
                self.mark(key)
        for key in self.records:
            if key not in listed and key not in self.cache and key not in self.running:
                self.mark(key)

    # --- one pod ----------------------------------------------------------------------
    async def sync_pod(self, key: tuple[str, str]) -> None:
        obj = self.cache.get(key)
        record = self.records.get(key)
        if obj is None or obj.get("metadata", {}).get("deletionTimestamp"):
            if record is not None or netns_mod.netns_exists(self.cfg.pod_netns(*key)):
                await self.teardown(key, record)
            if obj is not None:
                await self._finalize(key)
            return
        uid = obj["metadata"].get("uid", "")
        if record is not None and record.uid != uid:  # same name, new pod: the old one goes first
            await self.teardown(key, record)
            record = None
        if record is None:
            record = await self.setup(key, obj)
        elif key not in self.echo_procs or self.echo_procs[key].returncode is not None:
            if not _pid_alive(record.echo_pid):
                await self._start_echo(key, record)
        status = obj.get("status", {})
        if status.get("podIP") != record.ip or status.get("phase") != "Running":
            await self._write_status(key, record)

    async def setup(self, key: tuple[str, str], obj: dict[str, Any]) -> PodRecord:
        namespace, name = key
        uid = obj["metadata"].get("uid", "") or f"{namespace}-{name}"
        container_id = uid.replace("-", "")[:32] or host_ifname(f"{namespace}/{name}")
        record = PodRecord(namespace=namespace, name=name, uid=uid, container_id=container_id,
                           netns=self.cfg.pod_netns(namespace, name), host_ifname=host_ifname(container_id),
                           started_at=now_rfc3339())
        tcp, udp = container_ports(obj)
        record.ports = {"TCP": tcp, "UDP": udp, "GRPC": grpc_ports(obj)}
        record.workload = pod_workload(obj)
        if obj.get("spec", {}).get("hostNetwork"):
            return await self.setup_host_network(key, record)
        if netns_mod.netns_exists(record.netns):  # remains of an interrupted setup: start clean
            try:
                await self.cni.invoke("DEL", record)
            except TemporaryError as exc:
                log.info("kubelet %s: DEL of interrupted %s/%s: %s", self.node, namespace, name, exc)
            await asyncio.to_thread(netns_mod.terminate, netns_mod.pids_in_netns([record.netns]), timeout=3.0)
            await asyncio.to_thread(netns_mod.delete_netns, record.netns)
        if self.datapath_socket_required and not self.cfg.datapath_socket(self.node).exists():
            raise TemporaryError(f"datapath service socket {self.cfg.datapath_socket(self.node)} not there yet")
        await asyncio.to_thread(netns_mod.create_netns, record.netns)
        try:
            result = await self.cni.invoke("ADD", record)
        except BaseException:
            await asyncio.to_thread(netns_mod.delete_netns, record.netns)
            raise
        record.cni_result = result
        record.ip = result["ips"][0]["address"].split("/")[0]
        record.mac = next((i.get("mac", "") for i in result.get("interfaces", []) if i.get("sandbox")), "")
        await asyncio.to_thread(netns_mod.write_resolv_conf, record.netns, self.cfg.cluster_dns_ip,
                                self.cfg.dns_search(namespace))
        self.records[key] = record
        self._save(record)
        await self._start_echo(key, record)
        log.info("kubelet %s: pod %s/%s up at %s", self.node, namespace, name, record.ip)
        return record

    async def setup_host_network(self, key: tuple[str, str], record: PodRecord) -> PodRecord:
        """A hostNetwork pod: the node's namespace and InternalIP, no CNI (a real kubelet starts these even
        before the pod network is ready). The node's resolv.conf is left alone (ClusterFirst on the host
        network falls back to the node's DNS)."""
        record.host_network, record.host_ifname = True, ""
        record.netns, record.ip = self.node_netns, self.cfg.node_ip(self.node_number)
        # remains of an interrupted setup (a server started, its record not yet written): start clean
        leftovers = await asyncio.to_thread(netns_mod.pids_with_env, POD_UID_ENV, record.uid)
        await asyncio.to_thread(netns_mod.terminate, leftovers, timeout=3.0)
        self.records[key] = record
        self._save(record)
        await self._start_echo(key, record)
        log.info("kubelet %s: hostNetwork pod %s/%s up at %s", self.node, *key, record.ip)
        return record

    async def _start_echo(self, key: tuple[str, str], record: PodRecord) -> None:
        # in the node's cgroup, as kubepods under a node's root: socket LB sees the pods' sockets and leaves
        # them to the per-packet path (another network namespace: hostNamespaceOnly)
        argv = cgroups.in_cgroup_argv(cgroups.node_cgroup(self.cfg.name, self.node), self.workload_argv(record))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        # a local append-only log file: opening it does not block the loop in any way that matters
        with open(self.log_dir / f"{record.namespace}_{record.name}.log", "ab") as logf:  # noqa: ASYNC230
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=logf, start_new_session=True,
                env=dict(os.environ, **{SANDBOX_ENV: self.cfg.name, POD_UID_ENV: record.uid}))
        assert proc.stdout is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), ECHO_READY_TIMEOUT_S)
        except TimeoutError:
            line = b""
        if line.strip() != b"ready":
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
            raise TemporaryError(f"pod server for {record.namespace}/{record.name} did not start "
                                 f"(see {self.log_dir}/{record.namespace}_{record.name}.log)")
        self.echo_procs[key] = proc
        record.echo_pid = proc.pid
        self._save(record)

    def workload_argv(self, record: PodRecord) -> list[str]:
        """The pod's process: the echo server inside its namespace, or kube-dns (which reads the API from
        the root namespace and opens its sockets in the pod's, see `kube_dns.py`)."""
        pod = f"{record.namespace}/{record.name}"
        if record.workload == "kube-dns":
            from propolis_sandbox.world import WORLD_DNS_IP
            return [sys.executable, "-m", "propolis_sandbox.kube_dns", "--pod", pod, "--netns", record.netns,
                    "--apiserver", self.apiserver_url, "--upstream", WORLD_DNS_IP]
        if record.workload == "kafka":  # a real broker (kafka_broker.py) on the first declared TCP port
            port = (record.ports.get("TCP") or [9092])[0]
            return netns_mod.netns_exec_argv(record.netns, [sys.executable, "-m", "propolis_sandbox.kafka_broker",
                                                            "--pod", pod, "--advertise", record.ip, "--port", str(port)])
        tcp, udp, grpc = record.ports.get("TCP", []), record.ports.get("UDP", []), record.ports.get("GRPC", [])
        argv = [sys.executable, "-m", "propolis_sandbox.echo", "--pod", pod]
        argv += [a for p in tcp if p not in grpc for a in ("--tcp", str(p))]
        argv += [a for p in udp for a in ("--udp", str(p))] + [a for p in grpc for a in ("--grpc", str(p))]
        return netns_mod.netns_exec_argv(record.netns, argv)

    async def teardown(self, key: tuple[str, str], record: PodRecord | None) -> None:
        """Stop the pod's processes, CNI DEL, remove the namespace; each step tolerates 'already gone'.
        A hostNetwork pod shares the node's namespace: only its own processes go, the namespace stays."""
        proc = self.echo_procs.pop(key, None)
        pids = [record.echo_pid] if record and record.echo_pid and _pid_alive(record.echo_pid) else []
        if record is not None:
            pids += await asyncio.to_thread(netns_mod.pids_with_env, POD_UID_ENV, record.uid)
        pod_netns = None if record and record.host_network else record.netns if record else self.cfg.pod_netns(*key)
        if pod_netns is not None:
            pids += netns_mod.pids_in_netns([pod_netns])
        await asyncio.to_thread(netns_mod.terminate, pids, timeout=3.0)
        if proc is not None:
            await proc.wait()
        if pod_netns is not None:
            if record is not None:
                await self.cni.invoke("DEL", record)
            await asyncio.to_thread(netns_mod.delete_netns, pod_netns)
        self.records.pop(key, None)
        self._record_path(key).unlink(missing_ok=True)
        log.info("kubelet %s: pod %s/%s torn down", self.node, *key)

    async def _finalize(self, key: tuple[str, str]) -> None:
        try:
            await kube_api.call(self.api, "DELETE", PODS.path(key[0], key[1]), query=[("gracePeriodSeconds", "0")])
        except ApiException as exc:
            if exc.status != 404:
                raise

    async def _write_status(self, key: tuple[str, str], record: PodRecord) -> None:
        obj = self.cache.get(key, {})
        now = now_rfc3339()
        containers = obj.get("spec", {}).get("containers", []) or []
        status = {
            "phase": "Running",
            "podIP": record.ip,
            "podIPs": [{"ip": record.ip}],
            "hostIP": self.cfg.node_ip(self.node_number),
            "hostIPs": [{"ip": self.cfg.node_ip(self.node_number)}],
            "startTime": record.started_at or now,
            "conditions": [
                {"type": t, "status": "True", "lastProbeTime": None, "lastTransitionTime": now}
                for t in ("PodReadyToStartContainers", "Initialized", "Ready", "ContainersReady", "PodScheduled")
            ],
            "containerStatuses": [
                {"name": c.get("name", f"c{i}"), "image": c.get("image", ""), "imageID": "", "ready": True,
                 "started": True, "restartCount": 0, "containerID": f"propolis://{record.container_id}",
                 "state": {"running": {"startedAt": record.started_at or now}}}
                for i, c in enumerate(containers)
            ],
        }
        try:
            await kube_api.call(self.api, "PATCH", PODS.path(key[0], key[1]) + "/status", body={"status": status},
                                content_type=kube_api.MERGE_PATCH)
        except ApiException as exc:
            if exc.status == 404:
                return  # deleted meanwhile: the DELETED event cleans up
            raise

    async def _report_failure(self, key: tuple[str, str], message: str) -> None:
        obj = self.cache.get(key)
        if obj is None or obj.get("metadata", {}).get("deletionTimestamp") or key in self.records:
            return
        status = {"phase": "Pending", "conditions": [
            {"type": "Ready", "status": "False", "reason": "FailedCreatePodSandBox", "message": message[:500],
             "lastTransitionTime": now_rfc3339()},
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": now_rfc3339()}]}
        try:
            await kube_api.call(self.api, "PATCH", PODS.path(key[0], key[1]) + "/status", body={"status": status},
                                content_type=kube_api.MERGE_PATCH)
        except Exception:  # noqa: BLE001 - best effort: the retry is what matters
            pass

    async def stop(self) -> None:
        """Stop syncing; pods stay (state is kept for `up` again, `down` removes everything)."""
        self._stopping = True
        tasks = list(self.running.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def status(self) -> dict[str, Any]:
        return {"node": self.node, "pods": len(self.records), "errors": dict(
            (f"{k[0]}/{k[1]}", v) for k, v in self.errors.items()), "synced_resource_version":
            self.synced_resource_version}


def _int_or_zero(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _rv_int(obj: dict[str, Any]) -> int:
    return _int_or_zero(obj.get("metadata", {}).get("resourceVersion"))


def _rv_newer(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return _rv_int(a) > _rv_int(b)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


class Scheduler:
    """Binds unscheduled pods to nodes round-robin (spec.nodeName), as kube-scheduler would."""

    def __init__(self, api: client.ApiClient, nodes: list[str]) -> None:
        self.api = api
        self.nodes = nodes
        self.next = 0

    async def run(self) -> None:
        while True:
            try:
                body = await kube_api.call(self.api, "GET", PODS.path())
                for item in body.get("items", []):
                    await self._maybe_bind(item)
                rv = str(body.get("metadata", {}).get("resourceVersion", ""))
                resp = await kube_api.request(self.api, "GET", PODS.path(), query=[
                    ("watch", "true"), ("resourceVersion", rv), ("allowWatchBookmarks", "true"),
                    ("timeoutSeconds", "300")])
                async with resp:
                    if resp.status != 200:
                        raise TemporaryError(f"watch answered {resp.status}")
                    async for line in resp.content:
                        if line.strip():
                            event = json.loads(line)
                            if event.get("type") in ("ADDED", "MODIFIED"):
                                await self._maybe_bind(event.get("object", {}))
                            elif event.get("type") == "ERROR":
                                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - API away: retry
                log.info("scheduler: relisting after %s", exc)
                await asyncio.sleep(0.5)

    async def _maybe_bind(self, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata", {})
        if obj.get("spec", {}).get("nodeName") or meta.get("deletionTimestamp"):
            return
        node = self.nodes[self.next % len(self.nodes)]
        self.next += 1
        binding = {"apiVersion": "v1", "kind": "Binding", "metadata": {"name": meta["name"]},
                   "target": {"apiVersion": "v1", "kind": "Node", "name": node}}
        try:  # the pods/binding subresource, as kube-scheduler binds
            await kube_api.call(self.api, "POST", PODS.path(meta.get("namespace", "default"), meta["name"]) + "/binding",
                                body=binding)
        except ApiException as exc:
            if exc.status not in (404, 409):  # gone meanwhile / bound meanwhile
                raise
