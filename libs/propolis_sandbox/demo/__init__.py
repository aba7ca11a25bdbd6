"""`propolis demo` (what `make demo` runs): the whole story on one machine, told by its output.

Steps: bring up a 2-node sandbox running the suite; deploy a small application
(`production`: frontend, api, db; `default/outsider`); show that everything
connects; apply the NetworkPolicy and CiliumNetworkPolicy from the Cilium deep dive;
show which connections are now allowed and which are dropped (expected beside
actual); print `propolis status`, the connectivity-test summary and the last flows;
say how to look further and how to stop. The sandbox stays up for exploring.

Each step reuses the command a person would type next (sandbox, status,
connectivity, observe), so the demo shows the real interface, not a special path.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from propolis_sandbox import cluster, pod_dns, probe
from propolis_sandbox.config import SandboxState
from propolis_sandbox.resources import KINDS

MANIFESTS = Path(str(resources.files("propolis_sandbox.demo") / "manifests"))
APP = MANIFESTS / "10-app.yaml"
POLICIES = [MANIFESTS / "20-allow-frontend.yaml", MANIFESTS / "30-api-l7-policy.yaml",
            MANIFESTS / "40-allow-aws-egress.yaml"]


@dataclass(frozen=True)
class Flow:
    """One connection the demo tries, and whether the policies allow it (and why)."""

    source: str
    target: str  # "ns/pod" or "svc:ns/name"
    port: int
    allowed_by_policy: bool
    why: str


FLOWS = (
    Flow("production/frontend", "production/api", 8080, True, "frontend -> api:8080 is what both policies allow"),
    Flow("production/frontend", "svc:production/api-svc", 80, True, "through the Service (eBPF load-balancing)"),
    Flow("production/frontend", "production/api", 9090, False, "only port 8080 is allowed"),
    Flow("production/db", "production/api", 8080, False, "db is not the frontend"),
    Flow("default/outsider", "production/api", 8080, False, "another namespace, not the frontend"),
    Flow("default/outsider", "svc:production/api-svc", 80, False, "policy applies behind the Service too"),
    Flow("production/frontend", "production/db", 5432, True, "no policy selects db: default allow"),
)


def say(text: str = "") -> None:
    print(text, flush=True)


def step(n: int, title: str) -> None:
    say()
    say(f"== {n}. {title}")


def cli(state: SandboxState, *args: str) -> int:
    """Run a `propolis …` command as a person would, its output inline (pointed at this sandbox)."""
    say(f"$ propolis {' '.join(args)}")
    env = dict(os.environ, PROPOLIS_SANDBOX_NAME=state.config["name"])
    return subprocess.run([sys.executable, "-m", "propolis.cli.main", *args], check=False, env=env).returncode


async def relay_url(state: SandboxState) -> str:
    """The hubble-relay's URL (its heartbeat announces it), or "" when none runs."""
    from propolis.hubble.client import announced_relay

    bus = state.admin_bus("propolis-demo")
    await bus.connect(max_wait=5)
    try:
        return await announced_relay(bus)
    finally:
        await bus.close()


async def _targets(state: SandboxState) -> dict[str, str]:
    """Every demo target -> IP (pod IPs and Service ClusterIPs)."""
    ips = await cluster.wait_running(state, 4)
    async with cluster.Api(state.apiserver_url) as api:
        svc = await api.get(KINDS["Service"], "production", "api-svc")
    ips["svc:production/api-svc"] = svc["spec"]["clusterIP"]
    return ips


async def _try_flows(state: SandboxState, with_policy: bool) -> bool:
    """Probe every demo flow with real packets; print expected beside actual. True if all as expected."""
    cfg = state.sandbox()
    ips = await _targets(state)
    specs = [probe.ProbeSpec(cfg.pod_netns(*f.source.split("/")), ips[f.target], f.port, "TCP", f.source, f.target)
             for f in FLOWS]
    results = await probe.probe_all(specs, timeout=1.5)
    as_expected = True
    say(f"   {'FROM':<22}{'TO':<28}{'PORT':<6}{'EXPECTED':<10}{'RESULT':<10}WHY")
    for flow, res in zip(FLOWS, results):
        expected = flow.allowed_by_policy or not with_policy
        ok = res.connected == expected
        as_expected &= ok
        result = "allowed" if res.connected else "dropped"
        why = flow.why if with_policy else "no policy yet: everything is allowed"
        say(f"   {flow.source:<22}{flow.target:<28}{flow.port:<6}{'allowed' if expected else 'dropped':<10}"
            f"{result + ('' if ok else ' (!)'):<10}{why}")
    return as_expected


#: (method, path, status): the seed's HTTP rules allow GET/POST /api/v1/users and GET /api/v1/health
L7_REQUESTS = (("GET", "/api/v1/users", 200), ("DELETE", "/api/v1/users", 403), ("POST", "/api/v1/products", 403))


async def _try_l7(state: SandboxState) -> bool:
    """HTTP requests frontend -> api:8080 with api-l7-policy alone: each judged on its own by the L7 proxy."""
    say("   HTTP rules: allow-frontend allows port 8080 without HTTP rules, which (as in Cilium) lets every")
    say("   request through; with api-l7-policy alone the L7 proxy judges each request:")
    await cluster.delete(state, [str(POLICIES[0])])
    await cluster.wait(state, timeout=60)
    netns = state.sandbox().pod_netns("production", "frontend")
    ip = (await _targets(state))["production/api"]
    as_expected = True
    for method, path, expected in L7_REQUESTS:
        res = await probe.probe(probe.ProbeSpec(netns, ip, 8080, http=(method, path)), timeout=2.0)
        ok = res.http_status == expected
        as_expected &= ok
        say(f"   production/frontend -> production/api:8080  {method:<7}{path:<20} HTTP {res.http_status}"
            f"{'' if ok else f' (!) expected {expected}'}")
    cli(state, "observe", "--protocol", "http", "--http-status", "403", "--last", "2")
    return as_expected


#: (name, allowed): what allow-aws-egress lets the api reach in the sandbox's world, by DNS name
FQDN_TARGETS = (("s3.amazonaws.com.", True), ("api.stripe.com.", True), ("example.org.", False))


async def _try_fqdns(state: SandboxState) -> bool:
    """The api resolves world names through its node's dns-proxy, then connects (TCP 443)."""
    say("   allow-aws-egress: the api resolves names through its DNS proxy, which lets toFQDNs allow what")
    say("   *.amazonaws.com and api.stripe.com resolved to before the answer reaches the pod:")
    netns = state.sandbox().pod_netns("production", "api")
    as_expected = True
    for name, allowed in FQDN_TARGETS:
        ips = await pod_dns.resolve(netns, name)
        res = await probe.probe(probe.ProbeSpec(netns, ips[0], 443), timeout=1.5)
        ok = res.connected == allowed
        as_expected &= ok
        expected = "allowed" if allowed else "dropped"
        say(f"   production/api -> {name:<20} {','.join(ips):<28} {'allowed' if res.connected else 'dropped'}"
            f"{'' if ok else f' (!) expected {expected}'}")
    cli(state, "fqdn", "cache", "list", "--name", state.config["name"])
    return as_expected


async def run(name: str = "propolis", *, nodes: int = 2, connectivity: bool = True) -> int:
    started = time.monotonic()
    say("Propolis demo: eBPF networking, policy and observability for Kubernetes, on this one machine.")
    step(1, f"Sandbox '{name}': {nodes} nodes as network namespaces, a Kubernetes API, NATS and the Propolis services")
    state = await asyncio.to_thread(cluster.up, name, nodes=nodes, services="all")
    for node in state.nodes:
        say(f"   node {node['name']:<22} {node['internal_ip']:<14} pods {node['pod_cidr']}")
    say(f"   kubeconfig {state.kubeconfig}   NATS {state.nats_url}")

    step(2, "Deploy the application: production/{frontend,api,db}, default/outsider, Service production/api-svc")
    await cluster.delete(state, [str(p) for p in POLICIES])  # a re-run starts from "no policy" again
    for line in await cluster.apply(state, [str(APP)]):
        say(f"   {line}")
    for pod, ip in sorted((await cluster.wait_running(state, 4)).items()):
        say(f"   {pod:<24} running at {ip}")
    await cluster.wait(state, timeout=60)

    step(3, "Before any policy: every connection goes through (real TCP handshakes between pod namespaces)")
    open_ok = await _try_flows(state, with_policy=False)

    step(4, "Apply the policies from the Cilium deep dive, unchanged")
    say("   NetworkPolicy allow-frontend:      pods app=api accept TCP 8080 from app=frontend only")
    say("   CiliumNetworkPolicy api-l7-policy: the same at L3/L4, plus HTTP rules (GET/POST on /api/v1/...)")
    say("   (each HTTP request is judged by the l7-proxy of the api's node, see step 5)")
    say("   CiliumNetworkPolicy allow-aws-egress: the api may reach only *.amazonaws.com and api.stripe.com")
    for line in await cluster.apply(state, [str(p) for p in POLICIES]):
        say(f"   {line}")
    caught_up = await cluster.wait(state, timeout=60)
    say(f"   every node enforces resourceVersion {caught_up['resourceVersion']} (propolis sandbox wait)")

    step(5, "The same connections again: the eBPF programs on the pod veths now drop what policy denies")
    policy_ok = await _try_flows(state, with_policy=True)
    l7_ok = await _try_l7(state)
    fqdn_ok = await _try_fqdns(state)

    step(6, "Cluster health")
    cli(state, "status", "--name", name)

    connectivity_rc = 0
    if connectivity:
        step(7, "Connectivity test: Cilium's scenarios in their own namespace (cleaned up afterwards)")
        connectivity_rc = cli(state, "connectivity", "test", "--name", name)

    step(8, "The last flows (Hubble): what the datapath saw, with identities and verdicts")
    say("   Dropped flows towards the api, then the last forwarded ones in production:")
    cli(state, "observe", "--to-pod", "production/api", "--verdict", "DROPPED", "--last", "8")
    cli(state, "observe", "--namespace", "production", "--verdict", "FORWARDED", "--last", "6")
    ui = await relay_url(state)

    say()
    say(f"Done in {time.monotonic() - started:.0f} s. The sandbox '{name}' keeps running; explore it:")
    if name != "propolis":
        say(f"   export PROPOLIS_SANDBOX_NAME={name}   # or --name {name}; bus commands read 'propolis' by default")
    say(f"   propolis sandbox probe --name {name} default/outsider production/api   # try a connection")
    say("   propolis observe --follow                                              # watch flows live")
    if ui:
        say(f"   {ui:<70} # the service map (Hubble UI), in a browser")
    say("   propolis bus tail 'propolis.v1.flows.*.DROPPED.>'                      # dropped flows on NATS")
    say(f"   propolis bpf endpoint list --node {state.nodes[0]['name']}               # endpoints in the kernel's maps")
    say(f"   propolis status --name {name}")
    say(f"Stop it and remove everything it created: propolis sandbox down --name {name}")
    healthy = open_ok and policy_ok and l7_ok and fqdn_ok and connectivity_rc == 0
    if not healthy:
        say("Something did not behave as expected (marked (!) above).")
    return 0 if healthy else 1
