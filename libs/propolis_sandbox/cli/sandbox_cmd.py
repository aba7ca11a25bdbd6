"""`propolis sandbox …`: a Kubernetes cluster on one machine (up, down, apply, delete, get, exec, probe, wait).

Every verb takes `--name S` (default $PROPOLIS_SANDBOX_NAME, else `propolis`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Coroutine
from typing import Any, overload

import yaml

from propolis.errors import CliError, PermanentError, TemporaryError, ValidationError

DEFAULT_NAME = os.environ.get("PROPOLIS_SANDBOX_NAME", "propolis")


def _name_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", default=DEFAULT_NAME, help="sandbox name (default %(default)s)")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sandbox = subparsers.add_parser("sandbox", help="a Kubernetes cluster on one machine (netns nodes and pods)")
    verbs = sandbox.add_subparsers(dest="sandbox_command", metavar="VERB")

    p = verbs.add_parser("up", help="start the sandbox in the background; return when ready (idempotent)")
    _name_arg(p)
    p.add_argument("--nodes", type=int, default=2, help="number of nodes (default %(default)s)")
    p.add_argument("--cluster-cidr", default=None,
                   help="pod CIDR of the cluster, node n gets its n-th /24 (default: first free of 10.244-255.0.0/16)")
    p.add_argument("--service-cidr", default=None, help="ClusterIP range (default 10.96.0.0/16)")
    p.add_argument("--services", default="all",
                   help="Propolis services to run: all, none, or a comma list (default %(default)s)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for ready")
    p.add_argument("--encryption", choices=("wireguard",), default=None,
                   help="transparent encryption of cross-node pod traffic (Cilium's encryption.type); default off "
                        "(a running sandbox keeps its own)")
    p.add_argument("--encryption-strict", dest="encryption_strict_mode", action="store_true",
                   help="Cilium's encryption.strictMode on the cluster CIDR: unencrypted pod traffic between nodes "
                        "is dropped in BPF (UNENCRYPTED_TRAFFIC); needs --encryption")
    p.add_argument("--node-encryption", dest="encryption_node_encryption", action="store_true",
                   help="Cilium's encryption.nodeEncryption: node-to-node traffic through the tunnel too")
    p.add_argument("--cluster-id", type=int, default=0,
                   help="Cluster Mesh cluster.id 1-255 (runs the clustermesh-apiserver); default 0 = no Cluster Mesh")
    p.add_argument("--nats-replicas", type=int, choices=(1, 3, 5), default=1,
                   help="nats-server processes: 3 or 5 = a JetStream cluster on loopback, every KV bucket "
                        "replicated on each (as the chart's nats.replicas); default %(default)s")
    p.add_argument("--nats-relays", type=int, default=0,
                   help="NATS relays: leafnode servers holding mirrors of the KV buckets, node services connected "
                        "to one (round-robin), cluster services to the hub (as the chart's nats.relays); "
                        "default %(default)s = none")
    p.set_defaults(func=cmd_up)

    p = verbs.add_parser("down", help="stop everything and remove every namespace, veth, pin and run dir")
    _name_arg(p)
    p.add_argument("--all", action="store_true", help="every sandbox on this machine")
    p.set_defaults(func=cmd_down)

    p = verbs.add_parser("status", help="the sandbox's state.json (pids, URLs, nodes, services)")
    _name_arg(p)
    p.set_defaults(func=cmd_status)

    for verb, func, text in (("apply", cmd_apply, "create or replace the objects of YAML files"),
                             ("delete", cmd_delete, "delete the objects of YAML files")):
        p = verbs.add_parser(verb, help=text + " (all documents validated first)")
        _name_arg(p)
        p.add_argument("-f", "--filename", action="append", required=True, metavar="FILE|DIR",
                       help="YAML file or directory (repeatable)")
        p.set_defaults(func=func)

    p = verbs.add_parser("get", help="what the API holds, as YAML or JSON")
    _name_arg(p)
    p.add_argument("kind", help="pods, services, endpointslices, nodes, namespaces, networkpolicies, cnp, ccnp")
    p.add_argument("target", nargs="?", help="NS/NAME (NAME for cluster-scoped kinds); omit to list")
    p.add_argument("-o", "--output", choices=("yaml", "json", "wide"), default="yaml")
    p.set_defaults(func=cmd_get)

    p = verbs.add_parser("exec", help="run a command inside a pod's network namespace, or a node's (and its cgroup)")
    _name_arg(p)
    p.add_argument("pod", metavar="NS/POD|node:NAME")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD …")
    p.set_defaults(func=cmd_exec)

    p = verbs.add_parser("probe", help="connect from a pod to a pod, service or IP (exit 0 = connected)")
    _name_arg(p)
    p.add_argument("source", nargs="?", metavar="FROM", help="ns/pod, node:NAME (the node itself) or world")
    p.add_argument("dest", nargs="?", metavar="TO",
                   help="ns/pod, ns/service, IP, world:IP, node:NAME, or a DNS name (resolved by the pod, through kube-dns)")
    p.add_argument("--port", type=int, default=None, help="default: the target's first declared port, else 80")
    p.add_argument("--protocol", type=str.upper, choices=("TCP", "UDP"), default="TCP")
    p.add_argument("--timeout", type=float, default=None, help="seconds per probe (default 2, --all: 1)")
    p.add_argument("--http", nargs=2, metavar=("METHOD", "PATH"), default=None,
                   help="send one HTTP/1.1 request and print the response's status code")
    p.add_argument("--header", action="append", default=[], metavar="K:V", help="--http: a request header")
    p.add_argument("--grpc", default=None, metavar="/PKG.SVC/METHOD",
                   help="make one unary gRPC call (HTTP/2) and print its grpc-status")
    p.add_argument("--all", action="store_true", help="every running pod to every running pod, in parallel")
    p.add_argument("--ports", default=None, help="--all: comma list (default: each target's declared ports)")
    p.add_argument("--protocols", default="TCP,UDP", help="--all: comma list (default %(default)s)")
    p.add_argument("-o", "--output", choices=("matrix", "json"), default="matrix")
    p.set_defaults(func=cmd_probe)

    p = verbs.add_parser("wait", help="block until every service (and kubelet) caught up with the API")
    _name_arg(p)
    p.add_argument("--timeout", type=float, default=60.0)
    p.set_defaults(func=cmd_wait)


    def show_help(args: argparse.Namespace) -> int:
        sandbox.print_help()
        return 2
    sandbox.set_defaults(func=show_help)


Command = Callable[[argparse.Namespace], int]
AsyncCommand = Callable[[argparse.Namespace], Coroutine[Any, Any, int]]


@overload
def _user_errors(fn: AsyncCommand) -> AsyncCommand: ...
@overload
def _user_errors(fn: Command) -> Command: ...
def _user_errors(fn: Command | AsyncCommand) -> Command | AsyncCommand:
    """Bad input and an unreachable sandbox are one-line CLI errors, not tracebacks."""
    import functools
    import inspect

    if inspect.iscoroutinefunction(fn):
        coroutine_fn = fn

        @functools.wraps(coroutine_fn)
        async def async_wrapper(args: argparse.Namespace) -> int:
            try:
                status: int = await coroutine_fn(args)  # iscoroutinefunction's narrowing drops the int
                return status
            except (PermanentError, TemporaryError) as exc:
                raise CliError(str(exc)) from exc
        return async_wrapper

    plain_fn = fn

    @functools.wraps(plain_fn)
    def wrapper(args: argparse.Namespace) -> int:
        try:
            result = plain_fn(args)
        except (PermanentError, TemporaryError) as exc:
            raise CliError(str(exc)) from exc
        if not isinstance(result, int):
            raise TypeError(f"{plain_fn.__name__} returned {type(result).__name__}, not an exit status")
        return result
    return wrapper


@_user_errors
def cmd_up(args: argparse.Namespace) -> int:
    from propolis_sandbox import cluster
    if os.geteuid() != 0:
        raise CliError("the sandbox creates network namespaces: run as root")
    state = cluster.up(args.name, nodes=args.nodes, cluster_cidr=args.cluster_cidr, service_cidr=args.service_cidr,
                       services=args.services, timeout=args.timeout, encryption=args.encryption,
                       cluster_id=args.cluster_id, encryption_strict_mode=args.encryption_strict_mode,
                       encryption_node_encryption=args.encryption_node_encryption, nats_replicas=args.nats_replicas,
                       nats_relays=args.nats_relays)
    cfg = state.sandbox()
    print(f"sandbox {cfg.name} ready: {cfg.nodes} nodes, cluster CIDR {cfg.cluster_cidr}")
    print(f"kubeconfig: {state.kubeconfig}")
    print(f"NATS: {state.nats_url}")
    if state.nats_relays:
        print(f"NATS relays: {', '.join(r['url'] for r in state.nats_relays)}")
    return 0


@_user_errors
def cmd_down(args: argparse.Namespace) -> int:
    from propolis_sandbox import cluster
    reports = cluster.down_all() if args.all else [cluster.down(args.name)]
    for report in reports:
        print(f"removed {len(report.namespaces)} namespaces, {len(report.pin_dirs)} pin dirs, "
              f"{len(report.cgroups)} cgroups, "
              f"stopped {len(report.processes)} processes{', removed ' + report.run_dir if report.run_dir else ''}")
    return 0


@_user_errors
def cmd_status(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from propolis_sandbox.config import load_state
    state = load_state(args.name)
    if state is None:
        raise CliError(f"sandbox {args.name!r} is not up")
    print(json.dumps(asdict(state), indent=2))
    return 0


@_user_errors
async def cmd_apply(args: argparse.Namespace) -> int:
    """Every document's outcome as kubectl prints it; exit 1 (failures on stderr) if any was not applied."""
    from propolis_sandbox import cluster
    try:
        lines = await cluster.apply(cluster.require_state(args.name), args.filename)
    except cluster.ApplyFailed as exc:
        for line in exc.lines:
            print(line)
        raise
    for line in lines:
        print(line)
    return 0


@_user_errors
async def cmd_delete(args: argparse.Namespace) -> int:
    from propolis_sandbox import cluster
    for line in await cluster.delete(cluster.require_state(args.name), args.filename):
        print(line)
    return 0


@_user_errors
async def cmd_get(args: argparse.Namespace) -> int:
    from propolis_sandbox import cluster
    result = await cluster.get(cluster.require_state(args.name), args.kind, args.target)
    if args.output == "json":
        print(json.dumps(result, indent=2))
    elif args.output == "wide":
        items = result.get("items", [result]) if isinstance(result, dict) else []
        for item in items:
            meta, status = item.get("metadata", {}), item.get("status", {}) or {}
            ident = (meta.get("namespace", "") + "/" if meta.get("namespace") else "") + meta.get("name", "")
            extra = " ".join(str(v) for v in (status.get("phase"), status.get("podIP"),
                                               (item.get("spec") or {}).get("nodeName"),
                                               (item.get("spec") or {}).get("clusterIP")) if v)
            print(f"{ident:<50} {extra}")
    else:
        print(yaml.safe_dump(result, sort_keys=False), end="")
    return 0


def cmd_exec(args: argparse.Namespace) -> int:
    from propolis_sandbox import cluster
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise CliError("usage: propolis sandbox exec NS/POD -- CMD …")
    state = cluster.require_state(args.name)
    netns = cluster.source_netns(state, args.pod)
    node_cgroup = cluster.source_cgroup(state, args.pod)
    if node_cgroup is not None:  # `exec node:NAME`: a process of the node, in its cgroup
        from propolis_sandbox import cgroups
        cgroups.move_self(node_cgroup)
    sys.stdout.flush()
    os.execvp("ip", ["ip", "netns", "exec", netns, *cmd])
    return 127  # not reached


def _csv(value: str, what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise ValidationError(what, "empty list")
    return items


@_user_errors
async def cmd_probe(args: argparse.Namespace) -> int:
    from propolis_sandbox import cluster, probe
    state = cluster.require_state(args.name)
    if args.all:
        return await _probe_all(args, state)
    if not args.source or not args.dest:
        raise CliError("usage: propolis sandbox probe FROM TO [--port P] [--protocol TCP|UDP] | probe --all")
    netns = cluster.source_netns(state, args.source)
    async with cluster.Api(state.apiserver_url) as api:
        dest = await cluster.resolve_destination(api, args.dest, from_netns=netns)
    port = args.port or (dest.ports.get(args.protocol) or [80])[0]
    headers = []
    for h in args.header:
        key, sep, value = h.partition(":")
        if not sep or not key.strip():
            raise CliError(f"--header {h!r}: expected K:V")
        headers.append((key.strip(), value.strip()))
    node_cgroup = cluster.source_cgroup(state, args.source)
    spec = probe.ProbeSpec(netns, dest.ip, port, args.protocol, from_label=args.source, to_label=dest.label,
                           http=tuple(args.http) if args.http else None, headers=tuple(headers), grpc=args.grpc,
                           from_cgroup=str(node_cgroup or ""))
    result = await probe.probe(spec, timeout=args.timeout or 2.0)
    if args.output == "json":
        print(json.dumps(dict(result.to_json(), addresses=dest.addresses or [dest.ip])))
        return 0 if result.connected else 1
    verdict = "connected" if result.connected else f"not connected ({result.error})"
    by = f", answered by {result.answered_by}" if result.answered_by else ""
    if spec.http:
        by = f", HTTP {result.http_status if result.http_status is not None else 'no response'}"
    if spec.grpc:
        from propolis_sandbox.grpc_echo import status_name
        by = f", grpc-status {status_name(result.grpc_status)}" + \
             (f" ({result.grpc_status})" if result.grpc_status is not None else "")
    print(f"{args.source} -> {dest.label} ({dest.ip}) {args.protocol}/{port}: {verdict}{by}")
    return 0 if result.connected else 1


async def _probe_all(args: argparse.Namespace, state: Any) -> int:
    from propolis_sandbox import cluster, probe
    protocols = [p.upper() for p in _csv(args.protocols, "--protocols")]
    for p in protocols:
        if p not in probe.PROTOCOLS:
            raise ValidationError("--protocols", f"must be TCP or UDP, got {p!r}")
    ports = [int(p) for p in _csv(args.ports, "--ports")] if args.ports else None
    cfg = state.sandbox()
    async with cluster.Api(state.apiserver_url) as api:
        pods = await cluster.running_pods(api, state)
    specs = []
    for src in pods:
        s_meta = src["metadata"]
        s_label = f"{s_meta.get('namespace', 'default')}/{s_meta['name']}"
        s_netns = cfg.pod_netns(s_meta.get("namespace", "default"), s_meta["name"])
        for dst in pods:
            d_meta = dst["metadata"]
            d_label = f"{d_meta.get('namespace', 'default')}/{d_meta['name']}"
            declared = cluster.pod_ports(dst)
            for protocol in protocols:
                for port in (ports if ports is not None else declared.get(protocol, [])):
                    specs.append(probe.ProbeSpec(s_netns, dst["status"]["podIP"], port, protocol,
                                                 from_label=s_label, to_label=d_label))
    results = await probe.probe_all(specs, timeout=args.timeout or 1.0)
    if args.output == "json":
        print(json.dumps([{k: v for k, v in r.to_json().items() if k in ("from", "to", "port", "protocol", "connected")}
                          for r in results], indent=1))
    else:
        print(probe.Matrix.from_results(results).render(), end="")
    return 0  # the matrix is the result (policies make some pairs unreachable on purpose)


@_user_errors
async def cmd_wait(args: argparse.Namespace) -> int:
    import logging

    from propolis_sandbox import cluster
    logging.getLogger("propolis.bus").setLevel(logging.ERROR)  # our own disconnect at the end is not news
    progress = await cluster.wait(cluster.require_state(args.name), timeout=args.timeout)
    rv = progress.pop("resourceVersion")
    print(f"caught up with resourceVersion {rv}: " + ", ".join(f"{k}={v}" for k, v in sorted(progress.items())))
    return 0
