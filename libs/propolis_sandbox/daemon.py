"""The sandbox supervisor: one background process per sandbox that owns everything running in it.

Why a supervisor process: `propolis sandbox up` must return while the cluster
keeps running, and something must restart a crashed service, play kubelet and
scheduler, and publish kubelet heartbeats. Started by `up` (cluster.py) as
`python -m propolis_sandbox.daemon --name S`; it reads the config `up` wrote to
state.json, then:

  network (underlay, nodes) -> embedded nats-server (+ KV buckets) -> API
  server -> Node objects -> Propolis services (propolis.suite.SUITE_SERVICES, per
  cluster and per node) -> scheduler + one kubelet per node -> state "ready".

Every child inherits PROPOLIS_SANDBOX=S, which is how `down` finds leftovers
after a crash. SIGTERM stops children in reverse order; the network stays for
`down` to remove (so a crashed supervisor and a stopped one clean up the same way).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import nats.errors
from kubernetes_asyncio import client
from kubernetes_asyncio import config as kube_config
from kubernetes_asyncio.client.exceptions import ApiException

import propolis
from propolis.bus import permissions, relay, subjects
from propolis.bus.connection import Bus
from propolis.bus.messages import Heartbeat
from propolis.errors import TemporaryError
from propolis.suite import SuiteService, selected, service_env
from propolis_sandbox import cgroups, kube_api, node_ports, world
from propolis_sandbox import netns as netns_mod
from propolis_sandbox.config import SANDBOX_ENV, SandboxConfig, SandboxState
from propolis_sandbox.kube_api import NODES, PODS, SERVICES
from propolis_sandbox.kubelet import Kubelet, Scheduler
from propolis_sandbox.nats_cluster import NatsServers
from propolis_sandbox.nats_relays import NatsRelays

log = logging.getLogger("propolis_sandbox.daemon")

APISERVER_START_TIMEOUT_S = 20.0
HEARTBEAT_INTERVAL_S = 2.0
RESTART_BACKOFF_MAX_S = 10.0
JETSTREAM_READY_TIMEOUT_S = 30.0  # a fresh cluster elects its meta leader first (a few seconds)


def apiserver_command(cfg: SandboxConfig) -> list[str]:
    """The API server writes `<run dir>/kubeconfig` and `<run dir>/apiserver.url` when it listens."""
    return [sys.executable, "-m", "propolis_sandbox.apiserver", "--run-dir", str(cfg.run_dir),
            "--service-cidr", cfg.service_cidr, "--cluster-name", cfg.name,
            "--nodes", str(cfg.nodes)]


def cni_config(cfg: SandboxConfig, node: str, n: int, *, datapath_socket: bool) -> dict[str, Any]:
    """The network configuration the kubelet hands to propolis-cni on stdin (also saved as a .conf file)."""
    conf: dict[str, Any] = {
        "cniVersion": "1.0.0",
        "name": cfg.cni_network_name(),
        "type": "propolis-cni",
        "node": node,
        "mtu": 1500,
        "ipam": {"type": "host-local", "ranges": [[{"subnet": cfg.pod_cidr(n)}]],
                 "dataDir": str(cfg.ipam_dir / node)},
    }
    if datapath_socket:
        conf["datapathSocket"] = str(cfg.datapath_socket(node))
    return conf


class SupervisedProcess:
    """A child restarted with back-off when it dies (a Propolis service or the API server)."""

    def __init__(self, name: str, scope: str, node: str, argv: list[str], env: dict[str, str], log_path: Path,
                 cgroup: Path | None = None) -> None:
        self.name = name
        self.cgroup = cgroup  # started inside this cgroup v2 (its node's, `cgroups.py`); None = the supervisor's
        self.scope = scope
        self.node = node
        self.argv = argv
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self.stopping = False
        self.on_restart: Callable[[], None] | None = None  # the supervisor re-saves state.json (new pid)
        # Runs before each restart: the supervisor re-runs the bucket bootstrap, so a service that died
        # because its bucket was deleted comes back to a bucket instead of crash-looping.
        self.before_restart: Callable[[], Awaitable[None]] | None = None
        self.started = 0.0
        self.log_offset = 0  # where this run's output starts in the log file

    def start(self) -> None:
        self.started = time.monotonic()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as logf:
            self.log_offset = logf.tell()
            argv = cgroups.in_cgroup_argv(self.cgroup, self.argv) if self.cgroup else self.argv
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                         env=dict(os.environ, **self.env), start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else 0

    async def supervise(self) -> None:
        delay = 0.5
        while not self.stopping:
            assert self.proc is not None
            # polling: a waiting thread per child would starve the pool
            while (code := self.proc.poll()) is None:  # noqa: ASYNC110
                await asyncio.sleep(0.5)
            if self.stopping:
                return
            if time.monotonic() - self.started > 60:
                delay = 0.5  # it ran fine for a while: this is a new failure, not a crash loop
            log.warning("%s on %s exited with %s: %s; restarting in %.1fs", self.name, self.node or "cluster", code,
                        self.exit_reason(), delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RESTART_BACKOFF_MAX_S)
            if self.before_restart is not None:
                await self.before_restart()
            self.restarts += 1
            self.start()
            if self.on_restart is not None:
                self.on_restart()

    def exit_reason(self, lines: int = 5, limit: int = 600) -> str:
        """The last lines this run wrote (its stderr shares the log file): why it died, in the restart log."""
        try:
            with open(self.log_path, "rb") as logf:
                logf.seek(max(self.log_offset, logf.seek(0, os.SEEK_END) - 64 * 1024))
                tail = logf.read().decode(errors="replace").strip().splitlines()[-lines:]
        except OSError as exc:
            return f"(log {self.log_path} unreadable: {exc})"
        text = " | ".join(line.strip() for line in tail if line.strip())
        return (text[-limit:] if text else f"(no output; see {self.log_path})")

    def stop(self, timeout: float = 10.0) -> None:
        self.stopping = True
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def state(self) -> dict[str, Any]:
        return {"name": self.name, "scope": self.scope, "node": self.node, "pid": self.pid, "argv": self.argv,
                "log": str(self.log_path)}


class Supervisor:
    """Brings one sandbox up and keeps it running until SIGTERM."""

    def __init__(self, name: str, services: str | None) -> None:
        self.state_path = SandboxConfig(name=name).state_path
        self.state = SandboxState.load(self.state_path)
        self.cfg = self.state.sandbox()
        self.service_defs: list[SuiteService] = [s for s in selected(services) if s.runs_in(self.cfg)]
        self.nats: NatsServers | None = None
        self.relays: NatsRelays | None = None  # `sandbox up --nats-relays N`
        self.nats_users: dict[str, permissions.Credentials] = {}  # service user name -> credentials
        self.bus: Bus | None = None
        self.apiserver: SupervisedProcess | None = None
        self.children: list[SupervisedProcess] = []
        self.world: list[SupervisedProcess] = []  # the world's hosts and DNS (sandbox/world.py)
        self.api: client.ApiClient | None = None
        self.kubelets: list[Kubelet] = []
        self.tasks: list[asyncio.Task[Any]] = []
        self.instance = uuid.uuid4().hex[:8]
        self.started_at = time.time()

    def context(self, node: str = "", n: int = 0) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "sandbox": cfg.name, "node": node, "node_netns": cfg.node_netns(n) if n else "",
            "kubeconfig": self.state.kubeconfig, "nats_url": self.nats_url(n), "run_dir": str(cfg.run_dir),
            "pin_dir": str(cfg.pin_dir(node)) if node else "", "datapath_socket": str(cfg.datapath_socket(node)) if node else "",
            "apiserver_url": self.state.apiserver_url, "node_ip": cfg.node_ip(n) if n else "",
            "pod_cidr": cfg.pod_cidr(n) if n else "", "cluster_cidr": cfg.cluster_cidr, "service_cidr": cfg.service_cidr,
            "cluster_id": cfg.cluster_id, "encryption_strict_mode": cfg.encryption_strict_mode,
            "encryption_node_encryption": cfg.encryption_node_encryption,
            "cgroup": str(cgroups.node_cgroup(cfg.name, node)) if n else "",
        }

    def nats_url(self, n: int) -> str:
        """Where node ``n``'s services connect: its relay with a relay tier, else (and for the cluster-scoped
        services, ``n`` = 0) the hub."""
        return self.relays.for_node(n).url if self.relays is not None and n else self.state.nats_url

    def save(self, status: str | None = None, error: str = "") -> None:
        if status:
            self.state.status = status
        if error:
            self.state.error = error
        self.state.services = [c.state() for c in self.children]
        self.state.save(self.state_path)

    # --- bring-up ---------------------------------------------------------------------
    async def start(self) -> None:
        cfg = self.cfg
        self.state.supervisor_pid = os.getpid()
        self.state.started_at = self.started_at
        cfg.log_dir.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(netns_mod.build_underlay, cfg)
        # the world is built beside NATS and the API server (it is needed only once pods run)
        world_built = asyncio.create_task(asyncio.to_thread(world.build_world, cfg), name="build-world")
        self.state.nodes = [{
            "name": cfg.node_name(n), "netns": cfg.node_netns(n), "internal_ip": cfg.node_ip(n),
            "pod_cidr": cfg.pod_cidr(n), "pin_dir": str(cfg.pin_dir(cfg.node_name(n))),
            "datapath_socket": str(cfg.datapath_socket(cfg.node_name(n))),
            "cgroup": str(cgroups.node_cgroup(cfg.name, cfg.node_name(n))),
        } for n in range(1, cfg.nodes + 1)]
        await asyncio.to_thread(cgroups.create_node_cgroups, cfg.name, cfg.node_names())
        for node in cfg.node_names():
            cfg.node_dir(node).mkdir(parents=True, exist_ok=True)
        self.save()

        admin, self.nats_users = permissions.generate_credentials(
            [s.name for s in self.service_defs] + permissions.remote_users([s.name for s in self.service_defs]),
            nodes={s.name: cfg.node_names() for s in self.service_defs if s.scope == "node"})
        permissions.save_credentials(cfg.nats_credentials, admin, self.nats_users)
        for svc in self.service_defs:
            if svc.name not in subjects.slices():
                log.warning("%s has no slice in bus/subjects.py: its NATS user may read but write nothing", svc.name)
        self.state.nats_credentials = str(cfg.nats_credentials)
        if cfg.nats_relays:
            self.relays = NatsRelays(cfg.nats_dir, count=cfg.nats_relays, users=self.nats_users, admin=admin,
                                     log_dir=cfg.log_dir, hub_servers=cfg.nats_replicas)
        self.nats = NatsServers(cfg.nats_dir, replicas=cfg.nats_replicas, cluster_name=f"propolis-{cfg.name}",
                                log_dir=cfg.log_dir, domain=relay.HUB_DOMAIN if self.relays else None,
                                server_config=self.relays.hub_config if self.relays else None,
                                config_text=permissions.server_config(self.nats_users, admin=admin))
        self.state.nats_url = await self.nats.start()
        self._record_nats()
        self.bus = self.state.admin_bus(f"sandbox-supervisor@{cfg.name}")
        await self.bus.connect(max_wait=10)
        await self._create_buckets()
        if self.relays is not None:
            await self.relays.start()
            self.state.nats_relays = self.relays.describe()
            self.tasks.append(asyncio.create_task(self._supervise_relays(), name="supervise-nats-relays"))
        self.save()
        self.tasks.append(asyncio.create_task(self._supervise_nats(), name="supervise-nats"))

        await self._start_apiserver()
        await self._register_nodes()
        await world_built
        self._start_world()

        datapath = any(s.serves_datapath_socket for s in self.service_defs)
        if datapath:  # its ClusterIP needs the datapath's service LB, as CoreDNS needs kube-proxy or Cilium
            self.tasks.append(asyncio.create_task(self._deploy_kube_dns(), name="deploy-kube-dns"))
        for svc in self.service_defs:
            if svc.scope == "cluster":
                self._spawn(svc, node="", n=0)
        for n in range(1, cfg.nodes + 1):
            for svc in self.service_defs:
                if svc.scope == "node":
                    self._spawn(svc, node=cfg.node_name(n), n=n)
        for child in self.children:
            self.tasks.append(asyncio.create_task(child.supervise(), name=f"supervise-{child.name}-{child.node}"))

        cni_dir = cfg.cni_conf_dir
        cni_dir.mkdir(parents=True, exist_ok=True)
        assert self.api is not None
        for n in range(1, cfg.nodes + 1):
            node = cfg.node_name(n)
            conf = cni_config(cfg, node, n, datapath_socket=datapath)
            (cni_dir / f"10-propolis-{node}.conf").write_text(json.dumps(conf, indent=2))
            kubelet = Kubelet(cfg, node, self.api, conf, datapath_socket_required=datapath)
            self.kubelets.append(kubelet)
            self.tasks.append(asyncio.create_task(kubelet.run(), name=f"kubelet-{node}"))
        self.tasks.append(asyncio.create_task(Scheduler(self.api, cfg.node_names()).run(), name="scheduler"))
        self.tasks.append(asyncio.create_task(self._heartbeats(), name="kubelet-heartbeats"))
        self.save("ready")
        log.info("sandbox %s ready: %s, %s", cfg.name, self.state.kubeconfig, self.state.nats_url)

    def _start_world(self) -> None:
        """The outside world's servers and the nodes' own listeners (10250, 22), supervised like the API server
        (not suite services: not in `status`)."""
        world_procs: list[tuple[str, list[str], Path | None]] = [(name, argv, None)
                                                                 for name, argv in world.world_processes(self.cfg)]
        node_procs = [(name, argv, cgroups.node_cgroup(self.cfg.name, node))
                      for node, name, argv in node_ports.node_processes(self.cfg)]
        for name, argv, cgroup in world_procs + node_procs:
            proc = SupervisedProcess(name, "world", "", argv, {}, self.cfg.log_dir / f"{name}.log", cgroup)
            proc.start()
            self.world.append(proc)
            self.tasks.append(asyncio.create_task(proc.supervise(), name=f"supervise-{name}"))

    def _record_nats(self) -> None:
        """state.json: every server (url, pid, dir); ``nats_pid`` stays the first one's."""
        assert self.nats is not None
        self.state.nats_servers = self.nats.describe()
        self.state.nats_pid = self.state.nats_servers[0]["pid"]

    async def _create_buckets(self) -> None:
        """The buckets, each with one replica per server; retried while a fresh cluster has no meta leader."""
        assert self.bus is not None and self.nats is not None
        deadline = time.monotonic() + JETSTREAM_READY_TIMEOUT_S
        while True:
            try:
                await self.bus.ensure_buckets(replicas=self.nats.replicas)
                return
            except (TemporaryError, nats.errors.Error) as exc:
                if time.monotonic() > deadline:
                    raise TemporaryError(f"JetStream not ready within {JETSTREAM_READY_TIMEOUT_S:g}s: {exc}") from exc
                log.info("JetStream not ready yet (%s); retrying", exc or type(exc).__name__)
                await asyncio.sleep(0.5)

    async def _supervise_relays(self) -> None:
        """The relays' own supervision, and state.json's record of their pids after a restart."""
        assert self.relays is not None
        supervise = asyncio.create_task(self.relays.supervise(), name="nats-relays")
        try:
            while not supervise.done():
                await asyncio.sleep(1.0)
                if self.relays.describe() != self.state.nats_relays:
                    self.state.nats_relays = self.relays.describe()
                    self.save()
            supervise.result()
        finally:
            supervise.cancel()

    async def _supervise_nats(self) -> None:
        """Restart a dead nats-server on the same ports and JetStream store, as its StatefulSet would:
        the services reconnect (to a peer, in a cluster) and their KV watches re-sync or carry on;
        a restarted cluster member catches up from its peers; the kernel keeps enforcing meanwhile."""
        assert self.nats is not None
        while True:
            await asyncio.sleep(0.5)
            for server in self.nats.dead():
                code = server.proc.returncode if server.proc else None
                log.warning("nats-server %s exited with %s; restarting on the same port and store", server.url, code)
                try:
                    await asyncio.to_thread(server.restart_sync)
                except Exception as exc:  # noqa: BLE001 - e.g. the port is briefly busy: next round retries
                    log.warning("restarting nats-server %s failed: %s", server.url, exc)
                    continue
                self._record_nats()
                self.save()

    async def _start_apiserver(self) -> None:
        cfg = self.cfg
        url_file = cfg.run_dir / "apiserver.url"
        url_file.unlink(missing_ok=True)
        self.apiserver = SupervisedProcess("apiserver", "cluster", "", apiserver_command(cfg), {},
                                           cfg.log_dir / "apiserver.log")
        self.apiserver.start()
        deadline = time.monotonic() + APISERVER_START_TIMEOUT_S
        while not url_file.exists() or not url_file.read_text().strip():
            if self.apiserver.proc is not None and self.apiserver.proc.poll() is not None:
                tail = (cfg.log_dir / "apiserver.log").read_text(errors="replace").strip().splitlines()[-5:]
                raise RuntimeError(f"API server exited with {self.apiserver.proc.returncode}: " + " | ".join(tail))
            if time.monotonic() > deadline:
                raise RuntimeError(f"API server did not write {url_file} within {APISERVER_START_TIMEOUT_S}s")
            await asyncio.sleep(0.05)
        self.state.apiserver_url = url_file.read_text().strip()
        self.state.apiserver_pid = self.apiserver.pid
        # A restart must answer on the same URL (state.json, kubeconfig, every client keep it) with the same
        # store (it loads <run dir>/apiserver-store), like a static kube-apiserver pod on its host port.
        self.apiserver.argv += ["--port", self.state.apiserver_url.rsplit(":", 1)[1]]
        self.apiserver.on_restart = self._apiserver_restarted
        self.state.kubeconfig = str(cfg.run_dir / "kubeconfig")
        configuration = client.Configuration()
        await kube_config.load_kube_config(config_file=self.state.kubeconfig, client_configuration=configuration)
        self.api = client.ApiClient(configuration)
        self.tasks.append(asyncio.create_task(self.apiserver.supervise(), name="supervise-apiserver"))

    def _apiserver_restarted(self) -> None:
        assert self.apiserver is not None
        log.warning("API server restarted (pid %d) on %s with its store", self.apiserver.pid, self.state.apiserver_url)
        self.state.apiserver_pid = self.apiserver.pid
        self.save()

    async def _register_nodes(self) -> None:
        """Node objects with spec.podCIDR, InternalIP and a Ready condition, as a kubelet registers them."""
        assert self.api is not None
        api = self.api
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        for n in range(1, self.cfg.nodes + 1):
            name = self.cfg.node_name(n)
            status = {
                "addresses": [{"type": "InternalIP", "address": self.cfg.node_ip(n)},
                              {"type": "Hostname", "address": name}],
                "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                                "message": "propolis sandbox kubelet is posting ready status",
                                "lastHeartbeatTime": now, "lastTransitionTime": now}],
                "nodeInfo": {"kubeletVersion": "v1.31.0-propolis", "operatingSystem": "linux", "architecture": "amd64",
                             "containerRuntimeVersion": "propolis-sandbox://" + propolis.__version__
                             if hasattr(propolis, "__version__") else "propolis-sandbox"},
            }
            body = {"apiVersion": "v1", "kind": "Node",
                    "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                                                          "propolis.io/sandbox": self.cfg.name,
                                                          "node-role.kubernetes.io/worker": ""}},  # kind's workers
                    "spec": {"podCIDR": self.cfg.pod_cidr(n), "podCIDRs": [self.cfg.pod_cidr(n)]},
                    "status": status}
            try:
                await kube_api.call(api, "POST", NODES.path(), body=body)
            except ApiException as exc:
                if exc.status != 409:
                    raise
            try:
                await kube_api.call(api, "PATCH", NODES.path(None, name) + "/status", body={"status": status},
                                    content_type=kube_api.MERGE_PATCH)
            except ApiException as exc:
                if exc.status not in (404, 405):
                    raise
                # no nodes/status subresource: status travels on the object itself
                await kube_api.call(api, "PATCH", NODES.path(None, name), body={"status": status},
                                    content_type=kube_api.MERGE_PATCH)

    async def _deploy_kube_dns(self) -> None:
        """kube-system's cluster DNS, as kind deploys CoreDNS: Service `kube-dns` at the service CIDR's 10th
        address (UDP and TCP 53) in front of a pod labelled `k8s-app: kube-dns` (the kubelet runs kube_dns.py)."""
        assert self.api is not None
        # once every node's datapath answers: created earlier, the pod would only collect kubelet back-off
        # a socket file appearing has no event to wait on
        while not all(self.cfg.datapath_socket(node).exists() for node in self.cfg.node_names()):  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        labels = {"k8s-app": "kube-dns"}
        ports = [{"name": "dns", "port": 53, "protocol": "UDP"}, {"name": "dns-tcp", "port": 53, "protocol": "TCP"}]
        service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "kube-dns", "namespace": "kube-system",
                                                                       "labels": labels},
                   "spec": {"selector": labels, "clusterIP": self.cfg.cluster_dns_ip,
                            "ports": [dict(p, targetPort=53) for p in ports]}}
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "coredns", "namespace": "kube-system",
                                                               "labels": labels},
               "spec": {"containers": [{"name": "coredns", "image": "registry.k8s.io/coredns/coredns:v1.11.3",
                                        "ports": [{"name": p["name"], "containerPort": 53, "protocol": p["protocol"]}
                                                  for p in ports]}]}}
        for kind, body in ((SERVICES, service), (PODS, pod)):
            try:
                await kube_api.call(self.api, "POST", kind.path("kube-system"), body=body)
            except ApiException as exc:
                if exc.status != 409:
                    raise

    def _spawn(self, svc: SuiteService, *, node: str, n: int) -> None:
        ctx = self.context(node, n)
        env = service_env(ctx)
        if not node:
            env["PROPOLIS_NODE_NAME"] = f"{self.cfg.name}-control-plane"
        nats_user = self.nats_users[permissions.user_name(svc.name, node or None)]  # as in production
        env.update(PROPOLIS_NATS_USER=nats_user.user, PROPOLIS_NATS_PASSWORD=nats_user.password)
        label = svc.name + (f"-{node}" if node else "")
        child = SupervisedProcess(svc.name, svc.scope, node or env["PROPOLIS_NODE_NAME"], svc.command(ctx), env,
                                  self.cfg.log_dir / f"{label}.log", Path(ctx["cgroup"]) if node else None)
        child.on_restart = self.save
        child.before_restart = self._bootstrap_buckets
        child.start()
        self.children.append(child)

    async def _bootstrap_buckets(self) -> None:
        """Re-create any bucket that was deleted (the admin's bootstrap, idempotent), as the chart's
        bootstrap Job would on a re-run. Best effort: NATS may be away, the service retries anyway."""
        if self.bus is None:
            return
        try:
            await asyncio.wait_for(self.bus.ensure_buckets(replicas=self.cfg.nats_replicas), timeout=5)
        except Exception as exc:  # noqa: BLE001 - the restart goes ahead; the service reports what it lacks
            log.warning("bucket bootstrap before a restart failed: %s", exc)

    async def _heartbeats(self) -> None:
        """Kubelet heartbeats (service "kubelet", one per node) with the revision each has caught up with."""
        assert self.bus is not None
        kv = await self.bus.kv(subjects.HEARTBEATS_BUCKET)
        while True:
            for kubelet in self.kubelets:
                beat = Heartbeat(service="kubelet", node=kubelet.node, instance=self.instance,
                                 version=getattr(propolis, "__version__", "0"), pid=os.getpid(),
                                 started_at=self.started_at, sent_at=time.time(),
                                 health="degraded" if kubelet.errors else "ok",
                                 components={"kubelet": {"state": "degraded" if kubelet.errors else "ok",
                                                         "reason": "; ".join(f"{k}: {v}" for k, v in
                                                                             kubelet.status()["errors"].items())[:300]}},
                                 progress={"k8s_resource_version": kubelet.synced_resource_version,
                                           "pods": len(kubelet.records)},
                                 interval=HEARTBEAT_INTERVAL_S)
                try:
                    await kv.put(subjects.heartbeat_key("kubelet", kubelet.node, self.instance), beat)
                    await self.bus.publish(subjects.heartbeat_subject("kubelet", kubelet.node), beat)
                except Exception as exc:  # noqa: BLE001 - NATS away for a moment: next beat
                    log.debug("heartbeat failed: %s", exc)
            waiters = [asyncio.create_task(k.progress_changed.wait()) for k in self.kubelets]
            await asyncio.wait(waiters, timeout=HEARTBEAT_INTERVAL_S, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waiters:
                waiter.cancel()
            for kubelet in self.kubelets:
                kubelet.progress_changed.clear()

    # --- shutdown ---------------------------------------------------------------------
    async def stop(self) -> None:
        for kubelet in self.kubelets:
            await kubelet.stop()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for child in reversed(self.children + self.world):
            await asyncio.to_thread(child.stop)
        if self.api is not None:
            await self.api.close()
        if self.apiserver is not None:
            await asyncio.to_thread(self.apiserver.stop)
        if self.bus is not None:
            try:
                await self.bus.close()
            except Exception:  # noqa: BLE001
                pass
        if self.relays is not None:
            await self.relays.stop()
        if self.nats is not None:
            await self.nats.stop()


async def run(name: str, services: str | None) -> int:
    sup = Supervisor(name, services)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # kubelets run namespace and netlink work in threads, up to MAX_PARALLEL_SANDBOXES per node
    loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(max_workers=32, thread_name_prefix="sandbox"))
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await sup.start()
    except Exception as exc:  # reported through state.json to the waiting `up`
        log.exception("sandbox %s failed to start", name)
        sup.save("failed", error=f"{type(exc).__name__}: {exc}")
        await sup.stop()
        return 1
    await stop.wait()
    sup.save("stopping")
    await sup.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--services", default="all")
    args = parser.parse_args(argv)
    os.environ[SANDBOX_ENV] = args.name
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(run(args.name, args.services))


if __name__ == "__main__":
    sys.exit(main())
