"""`propolis service list` (like `cilium service list`) and the body of `propolis bpf lb list`
(like `cilium bpf lb list`): the node's service LB maps as the datapath sees them.

Reads the pinned maps of `--node NAME` / `--pin-dir` with bpf(2): no agent, no compile.
"""

from __future__ import annotations

import argparse
from typing import Any

from propolis.cli.bpf_cmd import _open, _pin_dir
from propolis.cli.common import RUN_ROOT, add_output_flag, local_cluster_states, print_json, print_table
from propolis.clustermesh.remotes import load_remotes
from propolis.datapath.services import BackendView, read_services
from propolis.maps import lb as lbmaps


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    group = sub.add_parser("service", help="service load-balancing (kube-proxy replacement), like `cilium service`")
    verbs = group.add_subparsers(dest="service_command", metavar="VERB")
    show = verbs.add_parser("list", help="frontends -> backends of a node (cilium_lb4_* maps)")
    show.add_argument("--node", help="node name (pins under /sys/fs/bpf/propolis/NODE)")
    show.add_argument("--pin-dir", help="pin directory of the node's maps")
    add_output_flag(show)
    show.set_defaults(func=service_list)


def _service_type(flags: list[str]) -> str:
    for name in ("NodePort", "LoadBalancer", "ExternalIPs", "HostPort"):
        if name in flags:
            return name
    return "ClusterIP"


def remote_cluster_names(node: str | None) -> dict[int, str]:
    """Cluster Mesh: id -> name of the clusters the node's sandbox is connected to (the maps hold only ids)."""
    for name, state in local_cluster_states().items():
        if node in {n.get("name") for n in state.get("nodes", [])}:
            return {r.id: r.name for r in load_remotes(RUN_ROOT / name / "clustermesh").values()}
    return {}


def backend_marks(b: BackendView, names: dict[int, str]) -> str:
    """`cilium service list`'s `(preferred)`, after `(remote: CLUSTER)` for another cluster's backend."""
    marks = f" (remote: {names.get(b.cluster_id, f'cluster {b.cluster_id}')})" if b.remote else ""
    return marks + (" (preferred)" if b.preferred else "")


def service_list(args: argparse.Namespace) -> int:
    pin_dir = _pin_dir(args)
    with _open(lbmaps.SERVICES_SPEC, pin_dir) as services, _open(lbmaps.BACKENDS_SPEC, pin_dir) as backends:
        views = read_services(services, backends)
    names = remote_cluster_names(args.node) if any(b.remote for v in views for b in v.backends) else {}
    if args.output == "json":
        out = [v.to_json() for v in views]
        for view in out:
            for b in view["backends"]:
                if b["remote"] and b["cluster_id"] in names:
                    b["cluster"] = names[b["cluster_id"]]
        print_json(out)
        return 0
    rows: list[list[Any]] = []
    for v in views:
        extra = [f for f in v.flags if f not in ("NodePort", "LoadBalancer", "ExternalIPs", "HostPort", "ClusterIP")]
        if v.affinity_timeout:
            extra = [f"sessionAffinity={v.affinity_timeout}s" if f == "sessionAffinity" else f for f in extra]
        kind = _service_type(v.flags) + (f" ({', '.join(extra)})" if extra else "")
        frontend = f"{v.frontend}/{v.protocol}"
        if not v.backends:
            rows.append([v.id, frontend, kind, "(no backends: new connections dropped)"])
        for i, b in enumerate(v.backends):
            rows.append([v.id if i == 0 else "", frontend if i == 0 else "", kind if i == 0 else "",
                         f"{b.id} => {b.address}/{v.protocol} ({b.state}){backend_marks(b, names)}"])
    print_table(["ID", "Frontend", "Service Type", "Backend"], rows)
    return 0


def bpf_lb_list(args: argparse.Namespace) -> int:
    """Every cilium_lb4_services_v2 entry with its backend address (cilium bpf lb list)."""
    pin_dir = _pin_dir(args)
    with _open(lbmaps.SERVICES_SPEC, pin_dir) as services, _open(lbmaps.BACKENDS_SPEC, pin_dir) as backends:
        rows = lbmaps.dump_services(services)
        known = lbmaps.dump_backends(backends)
    if args.output == "json":
        out = []
        for r in rows:
            j = r.to_json()
            if r.slot:
                ip, port, _proto, state, cluster_id = known.get(r.backend_id, ("?", 0, 0, 0, 0))
                j["backend"] = {"address": f"{ip}:{port}", "state": lbmaps.BE_STATE_NAMES.get(state, str(state)),
                                "cluster_id": cluster_id}
            out.append(j)
        print_json(out)
        return 0
    table: list[list[Any]] = []
    for r in rows:
        if r.slot == 0:
            flags = ", ".join(lbmaps.flag_names(r.flags, r.flags2)) or "ClusterIP"
            table.append([f"{r.frontend}/{lbmaps.PROTO_NAMES.get(r.proto, r.proto)}",
                          f"0.0.0.0:0 ({r.rev_nat_index}) (0) [{flags}] count={r.count}"])
        else:
            ip, port, _proto, state, _cluster_id = known.get(r.backend_id, ("?", 0, 0, 0, 0))
            table.append(["", f"{ip}:{port} ({r.rev_nat_index}) ({r.slot}) id={r.backend_id} "
                              f"{lbmaps.BE_STATE_NAMES.get(state, str(state))}"])
    print_table(["SERVICE ADDRESS", "BACKEND ADDRESS (REVNAT_ID) (SLOT)"], table)
    return 0
