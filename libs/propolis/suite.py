"""The Propolis suite: one list of its services, per cluster and per node.

The sandbox runs it, `propolis dev up` runs its cluster-scoped part
(`deploy.without_node`) and `propolis status` expects every entry to heartbeat.

Why a list: `propolis sandbox up` must start whatever the suite consists of at
the time, and later work adds a service by appending one `SuiteService` to
`SUITE_SERVICES` below — nothing else changes. The supervisor starts each
entry (once, or once per node), restarts it with back-off when it dies,
records it in state.json, and `propolis sandbox wait` waits for the heartbeat
progress of every entry with `reports_progress`.

Every process gets the environment of `service_env` (the runtime's settings
read PROPOLIS_NATS_URL, PROPOLIS_NODE_NAME, PROPOLIS_CLUSTER_NAME; the sandbox
adds PROPOLIS_KUBECONFIG, PROPOLIS_NODE_NETNS, PROPOLIS_BPF_PIN_DIR,
PROPOLIS_DATAPATH_SOCKET, PROPOLIS_CGROUP_ROOT, PROPOLIS_RUN_DIR and PROPOLIS_SANDBOX). `argv` items
may use the same values as `{placeholders}`: {sandbox} {node} {node_netns}
{kubeconfig} {nats_url} {run_dir} {pin_dir} {datapath_socket} {apiserver_url}
{node_ip} {pod_cidr} {cluster_cidr} {service_cidr}.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from propolis.errors import ValidationError


@dataclass(frozen=True)
class SuiteService:
    """One deployable process of the suite as the sandbox runs it."""

    name: str  # the service name used in heartbeats (e.g. "datapath-writer")
    scope: str  # "cluster": one instance; "node": one per node (like a DaemonSet)
    argv: tuple[str, ...]  # command line; {placeholders} filled from the service context
    #: node scope only: this service answers the CNI plugin on {datapath_socket}; the CNI config then
    #: names the socket (fail closed) and the kubelet waits for it before wiring pods.
    serves_datapath_socket: bool = False
    #: `propolis sandbox wait` waits until its heartbeat progress["k8s_resource_version"] >= the API's latest.
    reports_progress: bool = True
    #: a `SandboxConfig` option this service needs on (e.g. "encryption"): without it the sandbox does not start
    #: the service and `propolis status` expects it only where it runs.
    enabled_by: str = ""

    def runs_in(self, cfg: Any) -> bool:
        """Whether a sandbox with config `cfg` (a `SandboxConfig`) runs this service."""
        return not self.enabled_by or bool(getattr(cfg, self.enabled_by, ""))

    def __post_init__(self) -> None:
        if self.scope not in ("cluster", "node"):
            raise ValidationError("scope", f"must be 'cluster' or 'node', got {self.scope!r}")
        if self.serves_datapath_socket and self.scope != "node":
            raise ValidationError("serves_datapath_socket", "only a per-node service can serve the datapath socket")

    def command(self, context: dict[str, Any]) -> list[str]:
        """argv with placeholders filled; a bare console-script name is taken from this interpreter's
        bin directory (the venv), so the suite runs without the venv on PATH."""
        argv = [part.format(**context) for part in self.argv]
        beside = Path(sys.executable).parent / argv[0]
        if "/" not in argv[0] and beside.exists():
            argv[0] = str(beside)
        return argv


#: The suite. Append here (one line per service) as services come to exist, e.g.
#:   SuiteService("k8s-watcher", "cluster", ("propolis-k8s-watcher",)),
#:   SuiteService("datapath-writer", "node", ("propolis-datapath-writer",), serves_datapath_socket=True),
SUITE_SERVICES: list[SuiteService] = [
    SuiteService("k8s-watcher", "cluster", ("propolis-k8s-watcher",)),
    SuiteService("identity-allocator", "cluster", ("propolis-identity-allocator",)),
    SuiteService("datapath-writer", "node", ("propolis-datapath-writer", "--devices", "eth0",
                                                   "--enable-bandwidth-manager", "true", "--host-firewall", "true",
                                                   "--bpf-lb-sock", "true"),
                   serves_datapath_socket=True),
    SuiteService("hubble", "node", ("propolis-hubble",), reports_progress=False),
    SuiteService("l7-proxy", "node", ("propolis-l7-proxy",), reports_progress=False),
    SuiteService("dns-proxy", "node", ("propolis-dns-proxy",)),
    SuiteService("hubble-relay", "cluster", ("propolis-hubble-relay", "--hubble-relay-listen-address",
                                               "127.0.0.1:0"), reports_progress=False),
    SuiteService("wireguard-keymgr", "node", ("propolis-wireguard-keymgr",), reports_progress=False,
                   enabled_by="encryption"),
    SuiteService("clustermesh-apiserver", "cluster", ("propolis-clustermesh-apiserver",), reports_progress=False,
                   enabled_by="cluster_id"),
]


def selected(names: str | None) -> list[SuiteService]:
    """`--services all|none|a,b`: which entries of the list to run (tests of the bare sandbox use none)."""
    if names in (None, "", "all"):
        return list(SUITE_SERVICES)
    if names == "none":
        return []
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    known = {s.name: s for s in SUITE_SERVICES}
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise ValidationError("services", f"unknown service(s) {', '.join(unknown)}; known: "
                                          f"{', '.join(known) or '(none yet)'}")
    return [known[n] for n in wanted]


def service_env(context: dict[str, Any]) -> dict[str, str]:
    """Environment of a service process (runtime settings + sandbox specifics)."""
    env = {
        "PROPOLIS_NATS_URL": context["nats_url"],
        "PROPOLIS_CLUSTER_NAME": context["sandbox"],
        "PROPOLIS_KUBECONFIG": context["kubeconfig"],
        "KUBECONFIG": context["kubeconfig"],
        "PROPOLIS_RUN_DIR": context["run_dir"],
        "PROPOLIS_SANDBOX": context["sandbox"],
    }
    if context.get("cluster_id"):  # Cluster Mesh: identities are allocated in this cluster's range
        env["PROPOLIS_CLUSTER_ID"] = str(context["cluster_id"])
    if context.get("encryption_strict_mode"):  # the datapath-writer's: pod traffic in the cluster CIDR
        env["PROPOLIS_ENCRYPTION_STRICT_MODE_ENABLED"] = "true"
        env["PROPOLIS_ENCRYPTION_STRICT_MODE_CIDR"] = context["cluster_cidr"]
    if context.get("encryption_node_encryption"):  # the wireguard-keymgr's
        env["PROPOLIS_ENCRYPTION_NODE_ENCRYPTION"] = "true"
    if context.get("node"):
        env.update({
            "PROPOLIS_NODE_NAME": context["node"],
            "PROPOLIS_NODE_NETNS": context["node_netns"],
            "PROPOLIS_BPF_PIN_DIR": context["pin_dir"],
            "PROPOLIS_DATAPATH_SOCKET": context["datapath_socket"],
        })
        if context.get("cgroup"):  # the node's own cgroup v2 (socket LB attaches there)
            env["PROPOLIS_CGROUP_ROOT"] = context["cgroup"]
    return env
