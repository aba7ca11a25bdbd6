"""Runs the connectivity scenarios against a cluster: deploy, per scenario apply/wait/probe/delete, clean up.

Why waits and not sleeps: after a policy change the runner blocks on `Cluster.wait_enforced` (every
service's heartbeat says it enforces the API's latest revision), so a probe never races the policy it
tests, and a slow machine only makes the run slower, not red. The cluster is any `cluster.Cluster`: the
sandbox, or a real one reached by a kubeconfig (`kube.py`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from propolis.connectivity.cluster import Cluster, Manifest, Probe, ProbeResult
from propolis.connectivity.probe import PROBE_PAYLOAD
from propolis.connectivity.scenarios import (
    ALLOWED,
    DROPPED,
    ECHO_PORT,
    ECHO_UDP_PORT,
    NAMESPACE,
    Check,
    Scenario,
    Selection,
)
from propolis.encryption.backend import LISTEN_PORT
from propolis.encryption.capture import IPPROTO_UDP, UnderlayCapture
from propolis.errors import CliError

PASS, FAIL, SKIP = "pass", "fail", "skip"
NO_CHECKS = "no checks ran: a scenario that checks nothing cannot pass"
ENFORCE_TIMEOUT_S = 60.0
#: how long a policy drop may take to show up in `propolis observe` (a loaded machine delays the observers'
#: reading of the events ring by seconds; a drop that shows up ends the wait at once)
HUBBLE_WAIT_S = 15.0
#: the workload's pods: name -> extra labels (`kind` and `name` come from the name)
WORKLOAD_PODS = {"client": {}, "client2": {"other": "client"}, "echo-same-node": {}, "echo-other-node": {}}


@dataclass
class CheckOutcome:
    check: Check
    ok: bool
    detail: str


@dataclass
class ScenarioOutcome:
    scenario: Scenario
    result: str
    reason: str = ""
    checks: list[CheckOutcome] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"name": self.scenario.name, "result": self.result, "reason": self.reason,
                "seconds": round(self.seconds, 2),
                "checks": [{"check": c.check.describe(), "expect": c.check.expect, "ok": c.ok, "detail": c.detail}
                           for c in self.checks]}


def workload(cluster: Cluster) -> list[Manifest]:
    """The test namespace, clients and echo pods (node 1 and the last node), and their Services."""
    first, last = cluster.nodes[0].name, cluster.nodes[-1].name

    def pod(name: str, extra: dict[str, str]) -> Manifest:
        role = "echo" if name.startswith("echo") else "client"
        ports: list[Manifest] = ([{"name": "http", "containerPort": ECHO_PORT, "protocol": "TCP"},
                                  {"name": "dns-test", "containerPort": ECHO_UDP_PORT, "protocol": "UDP"}]
                                 if role == "echo" else [])
        return {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": NAMESPACE, "labels": {"kind": role, "name": name, **extra}},
                "spec": {"nodeName": last if name == "echo-other-node" else first,
                         "containers": cluster.containers(role, name, ports)}}

    def service(name: str, svc_type: str) -> Manifest:
        return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": NAMESPACE},
                "spec": {"type": svc_type, "selector": {"name": name},
                         "ports": [{"name": "http", "port": ECHO_PORT, "targetPort": "http", "protocol": "TCP"}]}}

    return [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
            *(pod(name, extra) for name, extra in WORKLOAD_PODS.items()),
            service("echo-same-node", "ClusterIP"), service("echo-other-node", "NodePort")]


class Runner:
    def __init__(self, cluster: Cluster, *, timeout: float = 1.5, features: dict[str, str] | None = None) -> None:
        self.cluster = cluster
        self.timeout = timeout
        self.features = features or {}  # feature name -> state, from `propolis status`
        self.pods: dict[str, str] = {}  # name -> IP
        self.services: dict[str, Manifest] = {}

    async def deploy(self) -> None:
        await self.cleanup()  # a previous run that was interrupted
        await self.cluster.apply(workload(self.cluster))
        self.pods = await self.cluster.wait_running(NAMESPACE, len(WORKLOAD_PODS), timeout=ENFORCE_TIMEOUT_S)
        self.services = await self.cluster.services(NAMESPACE)
        await self.cluster.wait_enforced(timeout=ENFORCE_TIMEOUT_S)

    async def cleanup(self, timeout: float = ENFORCE_TIMEOUT_S) -> None:
        """Delete the test namespace and wait until it is gone."""
        await self.cluster.delete_namespace(NAMESPACE, timeout=timeout)

    async def _resolved_probe(self, check: Check) -> Probe:
        """`fqdn:<name>` targets resolved as the source pod resolves them (through the DNS proxy where policy
        says so); a name that does not resolve is probed at 0.0.0.0 (refused locally, nothing leaves)."""
        what, _, name = check.target.partition(":")
        if what != "fqdn":
            return self._probe(check)
        spec = self._probe(dataclasses.replace(check, target="world:0.0.0.0"))
        try:
            ip = (await self.cluster.resolve(check.source, name))[0]
        except CliError:
            ip = spec.ip
        return dataclasses.replace(spec, ip=ip, target=check.target)

    def _probe(self, check: Check) -> Probe:
        what, _, name = check.target.partition(":")
        port = check.port
        if what == "pod":
            ip = self.pods[name]
        elif what == "service":
            ip = self.services[name]["clusterIP"]
        elif what == "world":
            ip = name
        elif what == "nodeport":
            service, _, node = name.partition("@")
            ip = self.cluster.nodes[int(node) - 1].internal_ip
            port = next(p["nodePort"] for p in self.services[service]["ports"] if p["port"] == check.port)
        else:
            raise ValueError(f"unknown target {check.target!r}")
        return Probe(check.source, ip, port, check.protocol, http=check.http, target=check.target)

    async def _policy_drop_seen(self, probe: Probe, since: float) -> tuple[bool, str]:
        """Did Hubble see this probe dropped by policy? Asks `propolis observe`, as an operator would, until
        the flow shows up or HUBBLE_WAIT_S passed (a drop reaches Hubble asynchronously, through the perf
        buffer, the node's observer and the relay)."""
        deadline = time.monotonic() + HUBBLE_WAIT_S
        while True:
            reasons, err = await self._drop_reasons(probe, since)
            if "POLICY_DENIED" in reasons:
                return True, "dropped by policy (Hubble: POLICY_DENIED)"
            if time.monotonic() > deadline:
                return False, (f"no POLICY_DENIED flow to {probe.ip}:{probe.port} in Hubble within {HUBBLE_WAIT_S:.0f}"
                               f" s (saw {sorted(reasons) or 'none'}{'; ' + err[:200] if err else ''})")
            await asyncio.sleep(0.2)

    async def _drop_reasons(self, probe: Probe, since: float) -> tuple[set[str], str]:
        """Drop reasons of the DROPPED flows to the probe's address since ``since`` (monotonic), and stderr."""
        argv = [sys.executable, "-m", "propolis.cli.main", "observe", "--to-ip", probe.ip, "--to-port",
                str(probe.port), "--verdict", "DROPPED", "--since", f"{max(1, int(time.monotonic() - since) + 2)}s",
                "-o", "json"]
        proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE,
                                                    env=dict(os.environ, **self.cluster.command_env))
        out, err = await proc.communicate()
        reasons = set()
        for line in out.decode().splitlines():
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            flow = doc.get("flow", doc)  # -o json prints flows; jsonpb wraps them in {"flow": …}
            reasons.add(flow.get("drop_reason_desc", ""))
        return reasons, err.decode().strip()

    def skip_reason(self, scenario: Scenario) -> str:
        nodes = len(self.cluster.nodes)
        if scenario.nodes > nodes:
            return f"needs {scenario.nodes} nodes, the cluster has {nodes}"
        for need in scenario.needs:
            state = self.features.get(need, "")
            if not state or state.lower().startswith(("disabled", "false", "off")):
                return f"needs {need} ({state or 'not built yet'})"
        return ""

    async def run(self, scenario: Scenario) -> ScenarioOutcome:
        started = time.monotonic()
        reason = self.skip_reason(scenario)
        if reason:
            return ScenarioOutcome(scenario, SKIP, reason)
        if not scenario.checks:
            return ScenarioOutcome(scenario, *verdict([]))
        capturing: AbstractContextManager[UnderlayCapture | None] = nullcontext()
        if scenario.underlay_capture:
            underlay = self.cluster.underlay_capture()
            if underlay is None:
                return ScenarioOutcome(scenario, SKIP, f"needs a capture of the underlay ({self.cluster.description} "
                                                       f"offers none)")
            capturing = underlay
        docs = list(scenario.policies)
        try:
            if docs:
                await self.cluster.apply(docs)
                await self.cluster.wait_enforced(timeout=ENFORCE_TIMEOUT_S)
            with capturing as capture:
                probes = [await self._resolved_probe(c) for c in scenario.checks]
                results = await self.cluster.probe_all(probes, timeout=self.timeout)
        finally:
            if docs:
                await self.cluster.delete(docs)
                await self.cluster.wait_enforced(timeout=ENFORCE_TIMEOUT_S)
        outcomes = []
        for check, res in zip(scenario.checks, results):
            allowed = res.connected
            ok = allowed == (check.expect == ALLOWED)
            detail = (f"connected, answered by {res.answered_by}" if allowed
                      else f"not connected ({res.error or 'timeout'})")
            if check.http:
                ok = res.http_status == check.status
                detail = f"HTTP {res.http_status}, expected {check.status}" if allowed else detail
            if ok and check.expect == DROPPED and check.target.startswith(("world:", "fqdn:")):
                ok, detail = await self._policy_drop_seen(res.probe, started)
            if ok and capture is not None:
                ok, detail = underlay_verdict(capture, res, detail)
            outcomes.append(CheckOutcome(check, ok, detail))
        return ScenarioOutcome(scenario, *verdict(outcomes), outcomes, time.monotonic() - started)


def verdict(checks: list[CheckOutcome]) -> tuple[str, str]:
    """(result, reason) of a scenario that ran: PASS only when at least one check ran and none failed."""
    if not checks:
        return FAIL, NO_CHECKS
    failed = sum(not c.ok for c in checks)
    if failed:
        return FAIL, f"{failed}/{len(checks)} checks failed"
    return PASS, ""


def run_passed(outcomes: list[ScenarioOutcome]) -> bool:
    """A run passes when some scenario ran and none failed: a run that skipped everything proved nothing."""
    results = {o.result for o in outcomes}
    return PASS in results and FAIL not in results


def underlay_verdict(capture: UnderlayCapture, res: ProbeResult, detail: str) -> tuple[bool, str]:
    """A probe that connected passes only if neither it nor its answer crossed the underlay in cleartext,
    while WireGuard traffic (UDP 51871) did cross it."""
    clear = [text for text in (PROBE_PAYLOAD.strip(), (res.answered_by or "").encode()) if text]
    seen = [t.decode() for t in clear if capture.contains(t)]
    if seen:
        return False, f"{detail}; CLEARTEXT on the underlay: {', '.join(seen)}"
    wireguard = capture.count(IPPROTO_UDP, LISTEN_PORT)
    if not wireguard:
        return False, f"{detail}; no WireGuard UDP {LISTEN_PORT} on the underlay"
    return True, f"{detail}; underlay: {wireguard} frames UDP {LISTEN_PORT}, no cleartext"


async def run_tests(cluster: Cluster, selection: Selection, *, features: dict[str, str] | None = None,
                    keep: bool = False,
                    progress: Callable[[ScenarioOutcome], None] | None = None) -> list[ScenarioOutcome]:
    """Deploy, run every chosen scenario in order, clean up (unless ``keep``). ``progress(outcome)`` per scenario."""
    unknown = selection.unknown()
    if unknown:
        raise CliError(f"unknown test(s): {', '.join(unknown)}")
    runner = Runner(cluster, features=features)
    outcomes: list[ScenarioOutcome] = []
    try:
        await runner.deploy()
        for scenario in selection.chosen():
            outcome = await runner.run(scenario)
            outcomes.append(outcome)
            if progress is not None:
                progress(outcome)
    finally:
        if not keep:
            await runner.cleanup()
    return outcomes


def render(outcome: ScenarioOutcome, verbose: bool = False) -> str:
    mark = {PASS: "[PASS]", FAIL: "[FAIL]", SKIP: "[SKIP]"}[outcome.result]
    head = f"{mark} {outcome.scenario.name:<32}"
    if outcome.result == SKIP:
        return f"{head} {outcome.reason}"
    lines = [f"{head} {len(outcome.checks)} checks, {outcome.seconds:.1f}s" +
             (f" — {outcome.reason}" if outcome.reason else "")]
    for c in outcome.checks:
        if verbose or not c.ok:
            lines.append(f"    {'ok  ' if c.ok else 'FAIL'} {c.check.describe()} expected {c.check.expect}: {c.detail}")
    return "\n".join(lines)


def summary(outcomes: list[ScenarioOutcome]) -> str:
    counts = {r: sum(o.result == r for o in outcomes) for r in (PASS, FAIL, SKIP)}
    ran = counts[PASS] + counts[FAIL]
    if not ran:
        return f"No test ran, {counts[SKIP]} skipped: nothing was checked"
    if counts[FAIL]:
        return f"{counts[FAIL]} of {ran} tests failed, {counts[SKIP]} skipped"
    return f"All {ran} tests passed, {counts[SKIP]} skipped"
