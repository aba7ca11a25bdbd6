"""Runs the connectivity scenarios against a sandbox: deploy, per scenario apply/wait/probe/delete, clean up.

Why waits and not sleeps: after a policy change the runner blocks on `sandbox wait`
(every service's heartbeat says it enforces the API's latest revision), so a
probe never races the policy it tests, and a slow machine only makes the run
slower, not red.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

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
from propolis_sandbox import cluster, pod_dns, probe
from propolis_sandbox.config import SandboxState
from propolis_sandbox.resources import KINDS, documents_from

PASS, FAIL, SKIP = "pass", "fail", "skip"
NO_CHECKS = "no checks ran: a scenario that checks nothing cannot pass"


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


def workload(state: SandboxState) -> list[dict[str, Any]]:
    """The test namespace, clients and echo pods (node 1 and the last node), and their Services."""
    first, last = state.nodes[0]["name"], state.nodes[-1]["name"]

    def pod(name: str, node: str, **extra: str) -> dict[str, Any]:
        kind = "echo" if name.startswith("echo") else "client"
        ports = [{"name": "http", "containerPort": ECHO_PORT, "protocol": "TCP"},
                 {"name": "dns-test", "containerPort": ECHO_UDP_PORT, "protocol": "UDP"}] if kind == "echo" else []
        return {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": NAMESPACE, "labels": {"kind": kind, "name": name, **extra}},
                "spec": {"nodeName": node, "containers": [{"name": name, "image": "echo", "ports": ports}]}}

    def service(name: str, svc_type: str) -> dict[str, Any]:
        return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": NAMESPACE},
                "spec": {"type": svc_type, "selector": {"name": name},
                         "ports": [{"name": "http", "port": ECHO_PORT, "targetPort": "http", "protocol": "TCP"}]}}

    return [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
            pod("client", first), pod("client2", first, other="client"),
            pod("echo-same-node", first), pod("echo-other-node", last),
            service("echo-same-node", "ClusterIP"), service("echo-other-node", "NodePort")]


class Runner:
    def __init__(self, state: SandboxState, *, timeout: float = 1.5, features: dict[str, str] | None = None) -> None:
        self.state = state
        self.cfg = state.sandbox()
        self.timeout = timeout
        self.features = features or {}  # feature name -> state, from `propolis status`
        self.pods: dict[str, str] = {}  # name -> IP
        self.services: dict[str, dict[str, Any]] = {}

    async def deploy(self) -> None:
        await self.cleanup()  # a previous run that was interrupted
        await cluster.apply_documents(self.state, documents_from("connectivity-test", workload(self.state)))
        running = await cluster.wait_running(self.state, 4, namespace=NAMESPACE)
        self.pods = {key.split("/", 1)[1]: ip for key, ip in running.items()}
        async with cluster.Api(self.state.apiserver_url) as api:
            for svc in (await api.list(KINDS["Service"], NAMESPACE)).get("items", []):
                self.services[svc["metadata"]["name"]] = svc["spec"]
        await cluster.wait(self.state, timeout=60)

    async def cleanup(self, timeout: float = 60.0) -> None:
        """Delete the test namespace and wait until it is gone (Terminating first, like Kubernetes)."""
        path = KINDS["Namespace"].path(None, NAMESPACE)
        deadline = time.monotonic() + timeout
        async with cluster.Api(self.state.apiserver_url) as api:
            try:
                await api.request("DELETE", path)
                while time.monotonic() < deadline:
                    await api.request("GET", path)
                    await asyncio.sleep(0.2)
            except cluster.ApiError as exc:
                if exc.status != 404:
                    raise
                return
        raise CliError(f"namespace {NAMESPACE} still terminating after {timeout:.0f} s")

    async def _resolved_spec(self, check: Check) -> probe.ProbeSpec:
        """`fqdn:<name>` targets resolved as the source pod resolves them (through the DNS proxy where policy
        says so); a name that does not resolve is probed at 0.0.0.0 (refused locally, nothing leaves)."""
        what, _, name = check.target.partition(":")
        if what != "fqdn":
            return self._spec(check)
        spec = self._spec(dataclasses.replace(check, target="world:0.0.0.0"))
        try:
            ip = (await pod_dns.resolve(spec.from_netns, name))[0]
        except CliError:
            ip = spec.ip
        return dataclasses.replace(spec, ip=ip, to_label=check.target)

    def _spec(self, check: Check) -> probe.ProbeSpec:
        if check.source.startswith("node:"):
            source_netns = self.cfg.node_netns(int(check.source.split(":", 1)[1]))
        else:
            source_netns = self.cfg.pod_netns(NAMESPACE, check.source)
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
            ip = self.state.nodes[int(node) - 1]["internal_ip"]
            port = next(p["nodePort"] for p in self.services[service]["ports"] if p["port"] == check.port)
        else:
            raise ValueError(f"unknown target {check.target!r}")
        return probe.ProbeSpec(source_netns, ip, port, check.protocol, check.source, check.target, http=check.http)

    async def _policy_drop_seen(self, spec: probe.ProbeSpec, since: float) -> tuple[bool, str]:
        """Did Hubble see this probe dropped by policy? Asks `propolis observe`, as an operator would."""
        argv = [sys.executable, "-m", "propolis.cli.main", "observe", "--to-ip", spec.ip, "--to-port", str(spec.port),
                "--verdict", "DROPPED", "--since", f"{max(1, int(time.monotonic() - since) + 2)}s", "-o", "json"]
        proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE,
                                                    env=dict(os.environ, PROPOLIS_SANDBOX_NAME=self.state.config["name"]))
        out, err = await proc.communicate()
        reasons = set()
        for line in out.decode().splitlines():
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            flow = doc.get("flow", doc)  # -o json prints flows; jsonpb wraps them in {"flow": …}
            reasons.add(flow.get("drop_reason_desc", ""))
        if "POLICY_DENIED" in reasons:
            return True, "dropped by policy (Hubble: POLICY_DENIED)"
        return False, (f"no POLICY_DENIED flow to {spec.ip}:{spec.port} in Hubble (saw {sorted(reasons) or 'none'}"
                       f"{'; ' + err.decode().strip()[:200] if err.strip() else ''})")

    def skip_reason(self, scenario: Scenario) -> str:
        if scenario.nodes > len(self.state.nodes):
            return f"needs {scenario.nodes} nodes, the sandbox has {len(self.state.nodes)}"
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
        docs = documents_from(scenario.name, list(scenario.policies))
        try:
            if docs:
                await cluster.apply_documents(self.state, docs)
                await cluster.wait(self.state, timeout=60)
            with UnderlayCapture(self.cfg.underlay_netns) if scenario.underlay_capture else nullcontext() as capture:
                specs = [await self._resolved_spec(c) for c in scenario.checks]
                results = await probe.probe_all(specs, timeout=self.timeout)
        finally:
            if docs:
                await cluster.delete_documents(self.state, docs)
                await cluster.wait(self.state, timeout=60)
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
                ok, detail = await self._policy_drop_seen(res.spec, started)
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


def underlay_verdict(capture: UnderlayCapture, res: probe.ProbeResult, detail: str) -> tuple[bool, str]:
    """A probe that connected passes only if neither it nor its answer crossed the underlay in cleartext,
    while WireGuard traffic (UDP 51871) did cross it."""
    clear = [text for text in (probe.PROBE_PAYLOAD.strip(), (res.answered_by or "").encode()) if text]
    seen = [t.decode() for t in clear if capture.contains(t)]
    if seen:
        return False, f"{detail}; CLEARTEXT on the underlay: {', '.join(seen)}"
    wireguard = capture.count(IPPROTO_UDP, LISTEN_PORT)
    if not wireguard:
        return False, f"{detail}; no WireGuard UDP {LISTEN_PORT} on the underlay"
    return True, f"{detail}; underlay: {wireguard} frames UDP {LISTEN_PORT}, no cleartext"


async def run_tests(state: SandboxState, selection: Selection, *, features: dict[str, str] | None = None,
                    keep: bool = False, progress: Any = None) -> list[ScenarioOutcome]:
    """Deploy, run every chosen scenario in order, clean up (unless ``keep``). ``progress(outcome)`` per scenario."""
    unknown = selection.unknown()
    if unknown:
        raise CliError(f"unknown test(s): {', '.join(unknown)}")
    runner = Runner(state, features=features)
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
