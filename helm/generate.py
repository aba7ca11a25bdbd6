"""The chart's parts that come from the product's tables, and the check that they are current.

`python helm/generate.py` rewrites helm/propolis/crds/ (the cilium.io/v2 CRDs, from the tables below) and
helm/propolis/files/nats-permissions.json (and nats-relay-permissions.json, the relays' users) from
libs/propolis/bus/permissions.py (one user per service of the suite list, publish rights =
`publish_allow(service)`; per-node services get the any-node slice, since a chart cannot know its nodes).
`python helm/generate.py --check` fails when the file is stale or a service of the suite list
(libs/propolis/suite.py) has no subchart (matched by its definition's `name`), or a subchart
has no dependency line in Chart.yaml or disagrees with the suite (scope, command, CNI): tests/chart runs it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from propolis.bus import relay
from propolis.bus.permissions import publish_allow
from propolis.suite import SUITE_SERVICES

CHART = Path(__file__).resolve().parent / "propolis"
PERMISSIONS_FILE = CHART / "files" / "nats-permissions.json"
#: The same users on a relay (nats.relays): KV writes allowed on the subjects the relay maps them to.
RELAY_PERMISSIONS_FILE = CHART / "files" / "nats-relay-permissions.json"


def nats_permissions(kv_prefix: str = "") -> dict[str, object]:
    """What the chart's NATS users Secret is built from (passwords are added at install)."""
    return {"users": [{"user": s.name,
                       "permissions": {"publish": {"allow": publish_allow(s.name, kv_prefix=kv_prefix)},
                                       "subscribe": {"allow": [">"]}}}
                      for s in SUITE_SERVICES]}


def render_permissions(kv_prefix: str = "") -> str:
    return json.dumps(nats_permissions(kv_prefix), indent=2) + "\n"


def generated_permission_files() -> dict[Path, str]:
    return {PERMISSIONS_FILE: render_permissions(), RELAY_PERMISSIONS_FILE: render_permissions(relay.KV_WRITE_PREFIX)}


# --- cilium.io/v2 CRDs: structural schemas, so the API server checks types, enums and shapes ---------------
def _s(t: str, **kw: object) -> dict[str, object]:
    return {"type": t, **kw}


def _obj(props: dict[str, object], **kw: object) -> dict[str, object]:
    return {"type": "object", "properties": props, **kw}


def _arr(items: dict[str, object], **kw: object) -> dict[str, object]:
    return {"type": "array", "items": items, **kw}


STR = _s("string")
OPEN = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}  # vendor-specific, passed through
INT_OR_STRING = {"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}]}
CIDR = _s("string", pattern=r"^[0-9a-fA-F:.]+(/[0-9]{1,3})?$")
ENTITIES = ["all", "world", "world-ipv4", "world-ipv6", "cluster", "host", "remote-node", "kube-apiserver",
            "ingress", "init", "health", "unmanaged", "none"]
SELECTOR = _obj({
    "matchLabels": {"type": "object", "additionalProperties": STR},
    "matchExpressions": _arr(_obj({"key": STR, "operator": _s("string", enum=["In", "NotIn", "Exists", "DoesNotExist"]),
                                   "values": _arr(STR)}, required=["key", "operator"])),
})
PORT_PROTOCOL = _obj({"port": INT_OR_STRING, "endPort": _s("integer", minimum=0, maximum=65535),
                      "protocol": _s("string", enum=["TCP", "UDP", "SCTP", "ICMP", "ICMPv6", "ANY"])})
L7_RULES = _obj({
    "http": _arr(_obj({"method": STR, "path": STR, "host": STR, "headers": _arr(STR),
                       "headerMatches": _arr(_obj({"name": STR, "value": STR, "mismatch": _s("string", enum=["LOG", "ADD", "DELETE", "REPLACE"]),
                                                   "secret": _obj({"name": STR, "namespace": STR})}, required=["name"]))})),
    "kafka": _arr(_obj({"role": _s("string", enum=["produce", "consume"]), "apiKey": STR, "apiVersion": STR,
                        "clientID": STR, "topic": STR})),
    "dns": _arr(_obj({"matchName": STR, "matchPattern": STR})),
    "l7proto": STR,
    "l7": _arr({"type": "object", "additionalProperties": STR}),
})
PORT_RULE = _obj({"ports": _arr(PORT_PROTOCOL, maxItems=40), "rules": L7_RULES, "serverNames": _arr(STR),
                  "terminatingTLS": OPEN, "originatingTLS": OPEN, "listener": OPEN})
ICMP = _obj({"fields": _arr(_obj({"type": INT_OR_STRING, "family": _s("string", enum=["IPv4", "IPv6"])},
                                 required=["type"]), maxItems=40)})
CIDR_RULE = _obj({"cidr": CIDR, "except": _arr(CIDR), "cidrGroupRef": STR, "cidrGroupSelector": SELECTOR})
SERVICE = _obj({"k8sService": _obj({"serviceName": STR, "namespace": STR}),
                "k8sServiceSelector": _obj({"selector": SELECTOR, "namespace": STR}, required=["selector"])})


def _peer_rule(direction: str, deny: bool) -> dict[str, object]:
    pre = "from" if direction == "ingress" else "to"
    props: dict[str, object] = {
        f"{pre}Endpoints": _arr(SELECTOR), f"{pre}Requires": _arr(SELECTOR), f"{pre}Nodes": _arr(SELECTOR),
        f"{pre}CIDR": _arr(CIDR), f"{pre}CIDRSet": _arr(CIDR_RULE),
        f"{pre}Entities": _arr(_s("string", enum=ENTITIES)), f"{pre}Groups": _arr(OPEN),
        "toPorts": _arr(PORT_RULE), "icmps": _arr(ICMP),
    }
    if direction == "egress":
        props["toServices"] = _arr(SERVICE)
        if not deny:
            props["toFQDNs"] = _arr(_obj({"matchName": STR, "matchPattern": STR}))
    if not deny:
        props["authentication"] = _obj({"mode": _s("string", enum=["disabled", "required", "test-always-fail"])})
    return _obj(props)


RULE = _obj({
    "endpointSelector": SELECTOR, "nodeSelector": SELECTOR,
    "ingress": _arr(_peer_rule("ingress", False)), "ingressDeny": _arr(_peer_rule("ingress", True)),
    "egress": _arr(_peer_rule("egress", False)), "egressDeny": _arr(_peer_rule("egress", True)),
    "labels": _arr(_obj({"key": STR, "value": STR, "source": STR}, required=["key"])),
    "enableDefaultDeny": _obj({"ingress": _s("boolean"), "egress": _s("boolean")}),
    "description": STR,
})
POLICY_STATUS = _obj({"conditions": _arr(_obj({"type": STR, "status": STR, "reason": STR, "message": STR,
                                               "lastTransitionTime": _s("string", format="date-time")},
                                              required=["type", "status"]))})


def _crd(kind: str, plural: str, short: list[str], scope: str, props: dict[str, object],
         status: bool) -> dict[str, object]:
    schema = _obj({"apiVersion": STR, "kind": STR, "metadata": {"type": "object"}, **props})
    version: dict[str, object] = {"name": "v2", "served": True, "storage": True, "schema": {"openAPIV3Schema": schema}}
    if status:
        version["subresources"] = {"status": {}}
    return {
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.cilium.io", "labels": {"app.kubernetes.io/part-of": "propolis"}},
        "spec": {"group": "cilium.io", "scope": scope, "versions": [version],
                 "names": {"kind": kind, "listKind": f"{kind}List", "plural": plural, "singular": kind.lower(),
                           "shortNames": short, "categories": ["cilium", "ciliumpolicy"]}},
    }


def crds() -> dict[str, dict[str, object]]:
    """File name -> CRD of the cilium.io/v2 kinds Propolis reads (and CiliumCIDRGroup, which
    `fromCIDRSet.cidrGroupRef` names)."""
    policy = {"spec": RULE, "specs": _arr(RULE), "status": POLICY_STATUS}
    return {
        "ciliumnetworkpolicies.yaml": _crd("CiliumNetworkPolicy", "ciliumnetworkpolicies", ["cnp", "ciliumnp"],
                                           "Namespaced", policy, True),
        "ciliumclusterwidenetworkpolicies.yaml": _crd("CiliumClusterwideNetworkPolicy",
                                                      "ciliumclusterwidenetworkpolicies", ["ccnp"], "Cluster",
                                                      policy, True),
        "ciliumcidrgroups.yaml": _crd("CiliumCIDRGroup", "ciliumcidrgroups", ["ccg"], "Cluster",
                                      {"spec": _obj({"externalCIDRs": _arr(CIDR)}, required=["externalCIDRs"])},
                                      False),
    }


def render_crd(crd: dict[str, object]) -> str:
    return ("# Generated by helm/generate.py from its CRD tables: edit those, then run it.\n"
            + yaml.dump(crd, Dumper=_NoAliases, sort_keys=False, width=120))


class _NoAliases(yaml.SafeDumper):
    """Shared sub-schemas are written out in full (no &anchors): plain YAML for every tool."""

    def ignore_aliases(self, data: object) -> bool:
        return True


def subchart_definitions() -> dict[str, dict[str, object]]:
    """charts/<chart>/values.yaml of every subchart: the service definitions the chart renders."""
    return {p.parent.name: yaml.safe_load(p.read_text()) for p in sorted((CHART / "charts").glob("*/values.yaml"))}


def problems() -> list[str]:
    """Everything that makes the chart disagree with the suite list."""
    found = []
    for path, text in generated_permission_files().items():
        if not path.exists() or path.read_text() != text:
            found.append(f"{path.relative_to(CHART.parent.parent)} is stale: run `python helm/generate.py`")
    for name, crd in crds().items():
        path = CHART / "crds" / name
        if not path.exists() or path.read_text() != render_crd(crd):
            found.append(f"helm/propolis/crds/{name} is stale: run `python helm/generate.py`")
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    deps = {d["name"] for d in chart.get("dependencies") or []}
    definitions = subchart_definitions()
    for chart_name in sorted(set(definitions) - deps):
        found.append(f"subchart {chart_name}: no dependency entry in helm/propolis/Chart.yaml")
    by_service = {d.get("name"): (chart_name, d) for chart_name, d in definitions.items()}
    for s in SUITE_SERVICES:
        if s.name not in by_service:
            found.append(f"service {s.name} (sandbox/services.py) has no subchart: add helm/propolis/charts/{s.name}/ "
                         "(Chart.yaml + values.yaml with its definition) and a dependency line in Chart.yaml")
            continue
        chart_name, definition = by_service[s.name]
        where = f"helm/propolis/charts/{chart_name}/values.yaml"
        if definition.get("scope") != s.scope:
            found.append(f"{where}: scope {definition.get('scope')!r} but the suite says {s.scope!r}")
        if list(definition.get("command") or [])[:1] != [s.argv[0]]:
            found.append(f"{where}: command {definition.get('command')} does not run {s.argv[0]}")
        if bool(definition.get("installsCNI")) != s.serves_datapath_socket:
            found.append(f"{where}: installsCNI must be {s.serves_datapath_socket} (serves_datapath_socket)")
    suite = {s.name for s in SUITE_SERVICES}
    for name in sorted(set(by_service) - suite):
        found.append(f"subchart {by_service[name][0]} (service {name}) is not in the suite list (sandbox/services.py)")
    return found


def main(argv: list[str]) -> int:
    if "--check" in argv:
        found = problems()
        for p in found:
            print(p, file=sys.stderr)
        return 1 if found else 0
    for path, text in generated_permission_files().items():
        path.write_text(text)
    for name, crd in crds().items():
        (CHART / "crds" / name).write_text(render_crd(crd))
    print(f"wrote {PERMISSIONS_FILE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
