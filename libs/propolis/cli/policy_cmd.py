"""`propolis policy get [NS/POD]` and `propolis policy selectors`, like `cilium policy get|selectors`.

Why from the bus and not from a node: the policies and identities in KV are what every
datapath-writer compiles from, so compiling them here with the same engine shows what
any node enforces for that pod (`propolis bpf policy get` shows the kernel's copy).
"""

from __future__ import annotations

import argparse
import os

from propolis.bus import subjects
from propolis.cli.common import add_output_flag, add_sandbox_flag, connect_bus, print_json, print_table
from propolis.cli.fqdn_cmd import learned_records
from propolis.errors import CliError, TemporaryError
from propolis.model.types import NumericIdentity
from propolis.policy.engine import PolicyEngine
from propolis.policy.entries import PROTOCOL_NAMES
from propolis.policy.unenforced import not_enforced
from propolis.writer.desired import peer_tables
from propolis.writer.inputs import ClusterInputs


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    policy = sub.add_parser("policy", help="the policy repository and what it compiles to")
    verbs = policy.add_subparsers(dest="policy_command", metavar="VERB", required=True)
    get = verbs.add_parser("get", help="every policy in force; with NS/POD, that pod's compiled rules")
    get.add_argument("pod", nargs="?", metavar="NS/POD")
    add_output_flag(get)
    get.set_defaults(func=policy_get)
    sel = verbs.add_parser("selectors", help="every selector of the policies and the identities it matches")
    add_output_flag(sel)
    sel.set_defaults(func=policy_selectors)
    for p in (get, sel):
        add_sandbox_flag(p)
        p.add_argument("--cluster-name", default=os.environ.get("PROPOLIS_CLUSTER_NAME"),
                       help="cluster name for the `cluster` entity (default $PROPOLIS_CLUSTER_NAME)")
        p.add_argument("--allow-localhost", choices=("always", "policy"), default="always",
                       help="as the datapath-writer's setting (default %(default)s: a pod's node always reaches it)")


async def _engine(args: argparse.Namespace, node: str = "") -> tuple[PolicyEngine, ClusterInputs]:
    """The engine a datapath-writer on `node` runs (its node is `host` for labelled toNodes)."""
    bus = await connect_bus(args)
    try:
        try:
            k8s = await bus.kv(subjects.K8S_BUCKET)
            ids = await bus.kv(subjects.IDENTITIES_BUCKET)
        except TemporaryError as exc:
            raise CliError(f"{exc} (are the k8s-watcher and identity-allocator running?)") from exc
        inputs = await ClusterInputs.snapshot(k8s, ids)
    finally:
        await bus.close()
    engine = PolicyEngine(cluster_name=args.cluster_name, allow_localhost=args.allow_localhost == "always")
    endpoint_ips: dict[int, set[str]] = {}
    for rec in inputs.endpoints.values():
        endpoint_ips.setdefault(rec.identity, set()).update(ip for ip in rec.ips if ":" not in ip)
    engine.update(policies=list(inputs.policies.values()), identities=inputs.identities,
                  named_ports={e.identity: e.named_ports for e in inputs.endpoints.values()},
                  endpoint_ips=endpoint_ips, peer_tables=peer_tables(inputs, node))
    return engine, inputs


def not_enforced_by_policy(inputs: ClusterInputs) -> dict[str, list[str]]:
    """Policy (kind/namespace/name) -> its accepted-but-not-enforced fields, each with why."""
    out = {}
    for rec in inputs.policies.values():
        items = not_enforced(rec.fields)
        if items:
            out[f"{rec.kind}/{rec.namespace + '/' if rec.namespace else ''}{rec.name}"] = [str(i) for i in items]
    return dict(sorted(out.items()))


async def policy_get(args: argparse.Namespace) -> int:
    if args.pod:
        namespace, _, name = args.pod.partition("/")
        engine, inputs = await _engine(args)
        endpoint = inputs.endpoints.get((namespace, name))
        if endpoint is not None and endpoint.node:  # labelled toNodes resolve as the pod's own node does
            engine.update(peer_tables=peer_tables(inputs, endpoint.node))
        return _pod_rules(engine, inputs, args)
    engine, inputs = await _engine(args)
    rows = []
    for key, policy in sorted(engine.policies.items()):
        sections = {d: sum(len(getattr(r, d, ())) for r in policy.rules)
                    for d in ("ingress", "ingress_deny", "egress", "egress_deny")}
        rows.append({"policy": key, "rules": len(policy.rules), **sections})
    refused = {key: str(err) for key, err in sorted(engine.errors.items())}
    unenforced = not_enforced_by_policy(inputs)
    if args.output == "json":
        print_json({"policies": rows, "refused": refused, "notEnforced": unenforced, "revision": engine.revision})
        return 0
    print_table(("POLICY", "RULES", "INGRESS", "INGRESS-DENY", "EGRESS", "EGRESS-DENY"),
                [(r["policy"], r["rules"], r["ingress"], r["ingress_deny"], r["egress"], r["egress_deny"])
                 for r in rows])
    for key, err in refused.items():
        print(f"refused {key}: {err}")
    for key, items in unenforced.items():
        for item in items:
            print(f"accepted, not enforced {key}: {item}")
    return 0


def _pod_rules(engine: PolicyEngine, inputs: ClusterInputs, args: argparse.Namespace) -> int:
    namespace, _, name = args.pod.partition("/")
    endpoint = inputs.endpoints.get((namespace, name))
    if not name or endpoint is None:
        raise CliError(f"no endpoint {args.pod!r} (NS/POD of a scheduled pod; see `propolis endpoint list`)")
    result = engine.compile_endpoint(endpoint.identity, namespace=namespace)
    if args.output == "json":
        print_json(result.to_json())
        return 0
    print(f"{args.pod}: identity {endpoint.identity}; ingress "
          f"{'default-deny' if result.ingress_enforced else 'allow-all'}, egress "
          f"{'default-deny' if result.egress_enforced else 'allow-all'}"
          + ("" if result.l7_enforced else "; L7 rules present: L4 port allowed, L7 not enforced yet"))
    print(f"selected by: {', '.join(result.origins) or 'no policy'}")
    for note in result.notes:
        print(f"note: {note}")

    def peer(identity: int) -> str:
        if identity == 0:
            return "any"
        labels = inputs.identities.get(NumericIdentity(identity)) or []
        shown = [lbl for lbl in labels if "namespace.labels" not in lbl]
        return f"{identity} ({', '.join(shown[:3])}{'…' if len(shown) > 3 else ''})"

    rows = []
    for e in result.entries:
        port = "*" if e.port == 0 else str(e.port) + (f"-{e.end_port}" if e.end_port else "")
        rows.append((e.direction, "deny" if e.deny else "allow", PROTOCOL_NAMES.get(e.protocol, e.protocol),
                     port, peer(e.identity)))
    print_table(("DIRECTION", "VERDICT", "PROTO", "PORT", "PEER IDENTITY"), rows)
    return 0


async def policy_selectors(args: argparse.Namespace) -> int:
    engine, inputs = await _engine(args)
    selections: dict[str, list] = dict(engine.selections())  # type: ignore[type-arg]
    records = await learned_records(args) if engine.fqdn_selectors() else []
    for fq in sorted(engine.fqdn_selectors(), key=str):  # toFQDNs: the addresses learned for it (any node)
        selections[str(fq)] = sorted({str(row["ip"]) for r in records for row in r.entries
                                      if fq.matches(str(row.get("name", "")))})
    if args.output == "json":
        print_json(selections)
        return 0
    print_table(("SELECTOR", "IDENTITIES"),
                [(sel, " ".join(str(i) for i in ids) or "(none)") for sel, ids in sorted(selections.items())])
    return 0
