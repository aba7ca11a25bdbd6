"""The cluster's health in one document: services (from heartbeats), NATS, Kubernetes, features.

`propolis status` prints it; ``-o json`` gives it to machines. Expected
services are the suite list (`SUITE_SERVICES`): one instance per cluster or
one per node. An instance that missed `STALE_BEATS` heartbeats in a row counts
as unhealthy (unless a newer instance of the same service on the same node
replaced it, as after a restart), and so does an expected service with no
instance at all. Feature states come from the services that own them (their
heartbeat ``features``), checked against what the kernel can do
(`kernel_probe`), never assumed.

`build_report` is pure (heartbeats in, report out) so the rules are testable
without a cluster; `collect` gathers its inputs from the bus.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from propolis.bus import subjects
from propolis.bus.connection import Bus
from propolis.bus.messages import Heartbeat, K8sObject
from propolis.k8s.kinds import POLICY_KINDS
from propolis.kernel_probe import probe_all
from propolis.runtime.heartbeats import is_live, read_heartbeats, stale_after
from propolis.suite import SUITE_SERVICES, SuiteService


@dataclass(frozen=True)
class FeatureSpec:
    """Which service reports a feature in its heartbeat, and the kernel probes it cannot work without."""

    owner: str
    needs: tuple[str, ...] = ()


#: Features `propolis status` always lists, in Cilium's words, in Cilium's order.
FEATURE_SPECS: dict[str, FeatureSpec] = {
    "KubeProxyReplacement": FeatureSpec("datapath-writer", ("clsact", "bpffs")),
    "Policy enforcement": FeatureSpec("datapath-writer", ("clsact", "bpffs")),
    "Hubble": FeatureSpec("hubble"),
    "Encryption": FeatureSpec("wireguard-keymgr"),
    "BandwidthManager": FeatureSpec("datapath-writer"),  # sch_fq only picks the mode (EDT + fq, else tbf)
    "Host firewall": FeatureSpec("datapath-writer", ("clsact", "bpffs")),
    "Cluster Mesh": FeatureSpec("clustermesh-apiserver"),
    "L7 proxy": FeatureSpec("l7-proxy"),
    "DNS proxy": FeatureSpec("dns-proxy"),
    "Socket LB": FeatureSpec("datapath-writer", ("bpffs",)),  # "Enabled (hostNamespaceOnly)" or why not
}
FEATURES = tuple(FEATURE_SPECS)

#: Health values that do not make the cluster unhealthy ("replaced": a restart left its old key behind).
FINE = ("ok", "replaced")


@dataclass
class StatusReport:
    healthy: bool = True
    problems: list[str] = field(default_factory=list)
    nats: dict[str, Any] = field(default_factory=dict)
    kubernetes: dict[str, Any] = field(default_factory=dict)
    services: list[dict[str, Any]] = field(default_factory=list)
    features: dict[str, dict[str, Any]] = field(default_factory=dict)
    kernel: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: policies in force, accepted-but-not-enforced (policy -> fields and why), refused, endpoints failing
    policies: dict[str, Any] = field(default_factory=dict)

    def problem(self, text: str) -> None:
        self.healthy = False
        self.problems.append(text)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def enabled(state: str) -> bool:
    """The convention of feature states: "Disabled…", "False", "Off" mean off; anything else is on."""
    return not str(state).lower().startswith(("disabled", "false", "off"))


def kernel_notes(name: str, kernel: dict[str, dict[str, Any]]) -> list[str]:
    """What this kernel means for a feature: what it lacks, and the fallback a person would look for next."""
    if not kernel or "probes" in kernel:  # not probed (not root): say nothing rather than guess
        return []

    def ok(probe: str) -> bool:
        return bool(kernel.get(probe, {}).get("available"))

    notes = [kernel[p]["detail"] for p in FEATURE_SPECS[name].needs if p in kernel and not ok(p)]
    if name == "BandwidthManager" and "sch_fq" in kernel and not ok("sch_fq"):
        notes.append(kernel["sch_fq"]["detail"] + ": no EDT pacing on this kernel, pods would be shaped with tbf")
    elif name == "Encryption":
        if ok("wireguard"):
            notes.append("kernel WireGuard available")
        elif ok("wireguard-go"):
            notes.append(f"{kernel['wireguard']['detail']}: WireGuard would run in userspace (wireguard-go)")
        elif "wireguard" in kernel:
            notes.append(f"{kernel['wireguard']['detail']} and wireguard-go not installed: no WireGuard")
        if "xfrm-esp" in kernel:
            notes.append("IPsec possible (XFRM ESP)" if ok("xfrm-esp") else kernel["xfrm-esp"]["detail"])
    return notes


def instance_rows(heartbeats: Iterable[Heartbeat], now: float, override: float | None = None) -> list[dict[str, Any]]:
    """One row per heartbeating instance with its health; stale ones are unhealthy unless replaced."""
    beats = sorted(heartbeats, key=lambda h: (h.service, h.node, h.started_at))
    live = {(hb.service, hb.node): hb.instance for hb in beats if is_live(hb, now, override)}
    rows = []
    for hb in beats:
        age, timeout = now - hb.sent_at, stale_after(hb, override)
        reasons = [f"{k}: {v.get('reason') or v.get('state')}" for k, v in hb.components.items()
                   if v.get("state") != "ok"]
        health = hb.health
        if not is_live(hb, now, override):
            successor = live.get((hb.service, hb.node))
            health = "replaced" if successor else "unhealthy"
            reasons = [f"no heartbeat for {age:.0f}s, timeout {timeout:.0f}s"
                       + (f"; replaced by instance {successor}" if successor else "")]
        rows.append({"service": hb.service, "node": hb.node, "instance": hb.instance, "version": hb.version,
                     "pid": hb.pid, "uptime_s": round(now - hb.started_at, 1), "last_heartbeat_s": round(age, 1),
                     "stale_after_s": timeout, "health": health, "reasons": reasons, "progress": hb.progress,
                     "http": hb.http})
    return rows


def malformed_rows(malformed: Mapping[str, str]) -> list[dict[str, Any]]:
    """Heartbeats nobody can read (truncated, wrong field types), by their key `<service>.<node>.<instance>`:
    reported as that instance, malformed, instead of a traceback."""
    rows = []
    for key, reason in sorted(malformed.items()):
        service, node, instance = subjects.parse_heartbeat_key(key) or (key, "", "")
        rows.append({"service": service, "node": node, "instance": instance, "health": "malformed",
                     "reasons": [f"heartbeat unreadable: {reason}"]})
    return rows


def missing_rows(rows: list[dict[str, Any]], suite: Sequence[SuiteService], nodes: Sequence[str]) -> list[dict[str, Any]]:
    """Rows for expected instances that never heartbeat: every cluster service once, every node service per node."""
    seen = {(r["service"], r["node"]) for r in rows}
    services = {r["service"] for r in rows}
    out = []
    for spec in suite:
        if spec.enabled_by and spec.name not in services:
            continue  # optional (e.g. wireguard-keymgr without encryption): expected only where it runs
        if spec.scope == "cluster" and spec.name not in services:
            out.append({"service": spec.name, "node": "", "health": "missing", "reasons": ["not running"]})
        for node in nodes if spec.scope == "node" else ():
            if (spec.name, node) not in seen:
                out.append({"service": spec.name, "node": node, "health": "missing", "reasons": ["not running"]})
    return out


def feature_state(name: str, live: Sequence[Heartbeat], kernel: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A feature as its owner reports it; off with the reason (owner absent, not built, kernel) otherwise."""
    spec = FEATURE_SPECS.get(name, FeatureSpec(""))
    notes = kernel_notes(name, kernel) if name in FEATURE_SPECS else []
    reported = [(hb, hb.features[name]) for hb in live if name in hb.features]
    if not reported:
        owner_runs = any(hb.service == spec.owner for hb in live)
        why = f"not implemented by {spec.owner} yet" if owner_runs else f"{spec.owner} not running"
        return {"state": "Disabled", "reason": "; ".join([why, *notes])}
    hb, value = reported[0]
    entry: dict[str, Any] = {"source": hb.service, **(value if isinstance(value, dict) else {"state": str(value)})}
    per_node = {h.node: (v.get("state") if isinstance(v, dict) else str(v)) for h, v in reported}
    if len(set(per_node.values())) > 1:
        entry["nodes"] = per_node
    lacking = [kernel[p]["detail"] for p in spec.needs if p in kernel and not kernel[p].get("available")]
    if enabled(entry.get("state", "")) and lacking:
        entry["reason"] = "kernel lacks " + "; ".join(lacking)
    return entry


def build_report(heartbeats: Iterable[Heartbeat], *, now: float, nodes: Sequence[str] = (),
                 kernel: dict[str, dict[str, Any]] | None = None, suite: Sequence[SuiteService] | None = None,
                 stale_override: float | None = None, malformed: Mapping[str, str] | None = None) -> StatusReport:
    """Services, Kubernetes and features from heartbeats (and heartbeat keys that did not decode, with why):
    the rules of `propolis status`, without I/O."""
    rep = StatusReport(kernel=kernel or {})
    heartbeats = list(heartbeats)
    rows = instance_rows(heartbeats, now, stale_override) + malformed_rows(malformed or {})
    nodes = sorted(set(nodes) | {r["node"] for r in rows if r["service"] == "kubelet"})
    rep.services = sorted(rows + missing_rows(rows, SUITE_SERVICES if suite is None else suite, nodes),
                          key=lambda r: (r["node"], r["service"]))
    for r in rep.services:
        if r["health"] not in FINE:
            where = f" on {r['node']}" if r["node"] else ""
            rep.problem(f"{r['service']}{where}: {r['health']} ({'; '.join(r['reasons']) or 'no reason given'})")

    live = [hb for hb in heartbeats if is_live(hb, now, stale_override)]
    watchers = [r for r in rows if r["service"] == "k8s-watcher" and r["health"] not in ("unhealthy", "replaced")]
    leader = next((r for r in watchers if r["progress"].get("leader")), watchers[0] if watchers else None)
    rep.kubernetes = {"nodes": nodes, "watchers": len(watchers),
                      "state": "OK" if leader and leader["health"] == "ok" else
                      ("Unavailable" if leader is None else "Degraded"),
                      "reason": "k8s-watcher not running" if leader is None else "; ".join(leader["reasons"]),
                      "resource_version": leader["progress"].get("k8s_resource_version", "") if leader else ""}

    for name in [*FEATURES, *sorted({n for hb in live for n in hb.features} - set(FEATURES))]:
        rep.features[name] = feature_state(name, live, rep.kernel)
        if "reason" in rep.features[name] and enabled(rep.features[name]["state"]):
            rep.problem(f"{name}: {rep.features[name]['reason']}")
    return rep


def policy_summary(policies: Iterable[K8sObject], heartbeats: Iterable[Heartbeat]) -> dict[str, Any]:
    """What `status` says about policies: how many are in force, which are accepted but have fields not
    enforced (and why), how many the k8s-watcher refused, and which endpoints' policy failed on which node."""
    from propolis.policy.unenforced import not_enforced

    policies = list(policies)
    unenforced = {f"{p.kind}/{p.namespace + '/' if p.namespace else ''}{p.name}": [str(i) for i in items]
                  for p in policies for items in [not_enforced(p.fields)] if items}
    beats = list(heartbeats)
    watcher = next((hb for hb in sorted(beats, key=lambda h: -h.sent_at)
                    if hb.service == "k8s-watcher" and hb.progress.get("leader")), None)
    failed = {hb.node: dict(hb.progress["endpoint_policy_failures"]) for hb in beats
              if hb.service == "datapath-writer" and isinstance(hb.progress.get("endpoint_policy_failures"), dict)
              and hb.progress["endpoint_policy_failures"]}
    return {"in_force": len(policies), "not_enforced": dict(sorted(unenforced.items())),
            "refused": int(watcher.progress.get("refused_policies") or 0) if watcher else 0,
            "failed_endpoints": failed}


async def collect(bus: Bus, *, stale_after: float | None = None, probe_kernel: bool = True,
                  suite: Sequence[SuiteService] | None = None) -> StatusReport:
    """Read heartbeats and mirrored Nodes from the bus, probe the kernel, and judge (`build_report`)."""
    problems: list[str] = []
    heartbeats: list[Heartbeat] = []
    malformed: dict[str, str] = {}
    try:
        heartbeats = await read_heartbeats(bus, malformed)
    except Exception as exc:  # noqa: BLE001 - reported, not raised: status must always print
        problems.append(f"heartbeats bucket unreadable: {exc}")
    nodes: list[str] = []
    policies: list[K8sObject] = []
    try:
        k8s_kv = await bus.kv(subjects.K8S_BUCKET)
        nodes = [e.value.name for e in (await k8s_kv.items(subjects.k8s_keys("nodes"))).values()
                 if isinstance(e.value, K8sObject)]
        for plural in POLICY_KINDS:
            policies += [e.value for e in (await k8s_kv.items(subjects.k8s_keys(plural))).values()
                         if isinstance(e.value, K8sObject)]
    except Exception:  # noqa: BLE001 - no mirror yet: the k8s-watcher row says why
        pass
    kernel = {f.name: {"available": f.available, "detail": f.detail} for f in probe_all()} if probe_kernel else {}
    rep = build_report(heartbeats, now=time.time(), nodes=nodes, kernel=kernel, suite=suite,
                       stale_override=stale_after, malformed=malformed)
    rep.policies = policy_summary(policies, heartbeats)
    rep.nats = await nats_status(bus, problems)
    for p in problems:
        rep.problem(p)
    return rep


async def nats_status(bus: Bus, problems: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"url": bus.url, "connected": bus.is_connected, "server_version": bus.server_version}
    try:
        info = await bus.jetstream_info()
        out["jetstream"] = {"state": "OK", "streams": info.streams, "consumers": info.consumers,
                            "storage_bytes": info.storage, "memory_bytes": info.memory}
    except Exception as exc:  # noqa: BLE001
        out["jetstream"] = {"state": "Unavailable", "reason": str(exc) or type(exc).__name__}
        problems.append(f"JetStream unavailable: {out['jetstream']['reason']}")
    return out
