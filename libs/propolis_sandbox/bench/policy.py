"""`propolis bench policy`: the four figures of issue 5's benchmark, each part selectable.

1. compiler: full compute for P policies x I identities, p50/p99 of one-policy changes, one new
   identity; then the resulting entries reconciled into real per-endpoint policy maps (map
   creation, row writes, incremental diffs) on a throw-away node. Maps are written for
   ``map_endpoints`` endpoints (default 110 = kubelet's default maxPods: one node never holds
   more pods than that, and the compiler's 1,000 local endpoints would cost 1,000 map
   creations at one RCU grace period each, ~12 s, none of which a policy change pays).
2. sandbox (2 nodes, whole suite): N policy updates flipping client -> echo:8080 between
   allowed and denied. Per update, from the API write: the map entry visible in the pinned
   policy map (polled from this process: event -> map), the first probe that sees the new
   verdict (probe flip), and `sandbox wait` returning (every service caught up).
3. per-packet cost of bpf_lxc through BPF_PROG_TEST_RUN, empty vs 10k-row maps, one run.
4. per-pod attach (sandbox): pods created one at a time per node; the datapath-writer's own
   CNI ADD -> enforced time (`last_attach_ms` in its heartbeat), first pod vs later ones, and
   pod create -> Running seen from the API.
Parts 2 and 4 share one sandbox, brought down in a `finally` (also on failure or Ctrl-C).
Figures are printed, never asserted.
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from propolis_sandbox.bench.common import percentile, report
from propolis_sandbox.resources import KINDS

PARTS = (1, 2, 3, 4)
NAMESPACE = "bench-policy"
ECHO_PORT = 8080
OTHER_PORT = 8081
TARGETS = {  # issue 5
    "compile_full": "< 2 s", "compile_change": "< 50 ms", "apply_enforced": "p99 < 500 ms",
    "event_map": "p50 <= 15 ms, p99 <= 150 ms (Cilium scale test: p50 9 / p99 317 ms)",
    "packet": "flat (10k rows ~ empty)", "attach_first": "< 500 ms", "attach_later": "< 20 ms",
}


@dataclass
class Options:
    parts: tuple[int, ...] = PARTS
    policies: int = 1000
    identities: int = 1000
    changes: int = 20
    rounds: int = 3               # part 1: full compute and full map write, each
    map_endpoints: int = 110
    updates: int = 100
    attach_pods: int = 6          # per node
    packet_repeat: int = 100_000
    packet_rounds: int = 5
    nodes: int = 2


def _log(msg: str) -> None:
    print(f"[bench policy] {msg}", file=sys.stderr, flush=True)


def _ms(samples: Sequence[float]) -> dict[str, Any]:
    """seconds -> {n, p50, p99} in ms."""
    return {"n": len(samples), "p50": round(percentile(samples, 50) * 1000, 3) if samples else None,
            "p99": round(percentile(samples, 99) * 1000, 3) if samples else None}


def _row(part: int, measure: str, n: int | None, p50: Any, p99: Any, unit: str, target: str = "",
         note: str = "") -> dict[str, Any]:
    return {"part": part, "measure": measure, "n": n, "p50": p50, "p99": p99, "unit": unit, "target": target,
            "note": note}


# --- part 1 ---------------------------------------------------------------------------------

async def part_compiler(opt: Options) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from propolis_sandbox.bench.datapath import measure_map_reconcile
    from propolis_sandbox.bench.policy_workload import compile_workload

    subset_n = min(opt.map_endpoints, opt.identities)
    work = await asyncio.to_thread(compile_workload, policies=opt.policies, identities=opt.identities,
                                   local_endpoints=opt.identities, changes=opt.changes, changed_among=subset_n,
                                   full_rounds=opt.rounds)
    subset = list(work.full)[:subset_n]
    maps = await measure_map_reconcile({i: work.full[i].entries for i in subset},
                                       [{i: c[i].entries for i in subset} for c in work.changes], rounds=opt.rounds)
    f = work.figures
    size = f"{opt.policies} policies x {opt.identities} identities"
    rows = [
        _row(1, f"compile full ({size}, {f['entries']} entries)", f["full_rounds"],
             round(f["full_seconds"] * 1000, 1), round(f["full_p99_seconds"] * 1000, 1), "ms", TARGETS["compile_full"]),
        _row(1, "compile one policy change", f["policy_changes"], f["policy_change_p50_ms"],
             f["policy_change_p99_ms"], "ms", TARGETS["compile_change"]),
        _row(1, "compile one new identity", 1, round(f["identity_change_seconds"] * 1000, 1), None, "ms"),
        _row(1, f"maps: create {maps['endpoints']} policy maps", 1, round(maps["create_maps_seconds"] * 1000, 1),
             None, "ms", note="paid per pod at attach, not per policy change"),
        _row(1, f"maps: write {maps['rows']} rows ({maps['endpoints']} endpoints)", maps["write_rounds"],
             round(maps["write_rows_seconds"] * 1000, 1), round(maps["write_rows_p99_seconds"] * 1000, 1), "ms",
             note=f"{maps['us_per_row']} us/row"),
        _row(1, "maps: one policy change (diff)", maps["changes"], maps["change_p50_ms"], maps["change_p99_ms"],
             "ms", note=f"{maps['endpoints_touched_per_change']} endpoint(s) touched"),
        _row(1, "full: compile + write rows (p50s added)", min(f["full_rounds"], maps["write_rounds"]),
             round((f["full_seconds"] + maps["write_rows_seconds"]) * 1000, 1), None, "ms", TARGETS["compile_full"],
             note=f"rows of {maps['endpoints']} endpoints; all {f['entries']} entries at {maps['us_per_row']} "
                  f"us/row would add ~{round(maps['us_per_row'] * f['entries'] / 1000) if maps['us_per_row'] else '?'} ms"),
    ]
    return rows, {"compiler": f, "maps": maps}


# --- part 3 ---------------------------------------------------------------------------------

async def part_packet(opt: Options) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from propolis_sandbox.bench.datapath import measure_packet_cost

    results = await measure_packet_cost(repeat=opt.packet_repeat, rounds=opt.packet_rounds)
    rows = []
    for r in results:
        for path, key in (("established (CT hit)", "established"), ("new, denied (ipcache + policy)", "new_denied")):
            rows.append(_row(3, f"{path}, {r['policy_rows']} policy/ipcache rows", r["rounds"],
                             r[f"{key}_ns_per_packet"], r[f"{key}_ns_p99"], "ns/pkt", TARGETS["packet"],
                             note=f"repeat {r['repeat']}"))
    return rows, {"packet": results}


# --- parts 2 and 4: the sandbox -------------------------------------------------------------

class SandboxBench:
    """One sandbox, one API session, one NATS connection for parts 2 and 4."""

    def __init__(self, state: Any) -> None:
        from propolis_sandbox import cluster
        self.cluster = cluster
        self.state = state
        self.cfg = state.sandbox()
        self.api: Any = None
        self.bus: Any = None
        self.created = 0  # pods in NAMESPACE

    async def __aenter__(self) -> SandboxBench:
        self.api = await self.cluster.Api(self.state.apiserver_url).__aenter__()
        self.bus = self.state.admin_bus("propolis-bench-policy")
        await self.bus.connect(max_wait=5)
        await self.api.request("POST", KINDS["Namespace"].path(None), body={"apiVersion": "v1", "kind": "Namespace",
                                                                   "metadata": {"name": NAMESPACE}})
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.bus is not None:
            await self.bus.close()
        if self.api is not None:
            await self.api.__aexit__(*exc)

    async def writer_progress(self, node: str) -> dict[str, Any]:
        from propolis.runtime.heartbeats import newest, read_heartbeats
        best = newest(await read_heartbeats(self.bus), "datapath-writer", node)
        return dict(best.progress) if best else {}

    async def create_pod(self, name: str, node: str, labels: dict[str, str], port: int | None = None) -> str:
        """POST a pod bound to ``node``; returns its IP once Running. Seconds in self.last_running_s."""
        ports = [{"name": "http", "containerPort": port, "protocol": "TCP"}] if port else []
        body = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NAMESPACE, "labels": labels},
                "spec": {"nodeName": node, "containers": [{"name": name, "image": "echo", "ports": ports}]}}
        started = time.perf_counter()
        await self.api.request("POST", KINDS["Pod"].path(NAMESPACE), body=body)
        self.created += 1
        running = await self.cluster.wait_running(self.state, self.created, namespace=NAMESPACE, timeout=60)
        self.last_running_s = time.perf_counter() - started
        return running[f"{NAMESPACE}/{name}"]

    def endpoint(self, node_index: int, ip: str) -> Any:
        from propolis.maps import endpoints
        with endpoints.SPEC.open(self.state.nodes[node_index]["pin_dir"]) as lxc:
            for entry in endpoints.dump(lxc):
                if entry.ip == ip:
                    return entry
        raise RuntimeError(f"no endpoint for {ip} on {self.state.nodes[node_index]['name']}")


async def part_attach(sb: SandboxBench, opt: Options) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    first: list[float] = []
    later: list[float] = []
    running_first: list[float] = []
    running_later: list[float] = []
    for node in sb.state.nodes:
        for i in range(opt.attach_pods):
            await sb.create_pod(f"attach-{node['name'].rsplit('-', 1)[-1]}-{i}", node["name"], {"app": "attach"})
            await sb.cluster.wait(sb.state, timeout=60)  # the writer's heartbeat now covers this pod's ADD
            ms = (await sb.writer_progress(node["name"])).get("last_attach_ms")
            if ms is not None:
                (first if i == 0 else later).append(float(ms) / 1000)
            (running_first if i == 0 else running_later).append(sb.last_running_s)
        _log(f"attach: {opt.attach_pods} pods on {node['name']}")
    rows = [
        _row(4, "attach first pod per node (CNI ADD -> enforced, writer)", len(first), _ms(first)["p50"],
             _ms(first)["p99"], "ms", TARGETS["attach_first"]),
        _row(4, "attach later pods (CNI ADD -> enforced, writer)", len(later), _ms(later)["p50"], _ms(later)["p99"],
             "ms", TARGETS["attach_later"]),
        _row(4, "pod create -> Running (API, first per node)", len(running_first), _ms(running_first)["p50"],
             _ms(running_first)["p99"], "ms", note="kubelet + netns + CNI + echo start; 50 ms polling"),
        _row(4, "pod create -> Running (API, later)", len(running_later), _ms(running_later)["p50"],
             _ms(running_later)["p99"], "ms", note="kubelet + netns + CNI + echo start; 50 ms polling"),
    ]
    return rows, {"attach": {"first_ms": _ms(first), "later_ms": _ms(later), "running_first_ms": _ms(running_first),
                             "running_later_ms": _ms(running_later), "pods_per_node": opt.attach_pods}}


def _flip_policy(port: int) -> dict[str, Any]:
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": "bench-flip", "namespace": NAMESPACE},
            "spec": {"endpointSelector": {"matchLabels": {"app": "bench-echo"}},
                     "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "bench-client"}}],
                                  "toPorts": [{"ports": [{"port": str(port), "protocol": "TCP"}]}]}]}}


async def _until_map(policy_map: Any, key: Any, allowed: bool, deadline: float) -> float | None:
    """Poll the pinned policy map (LPM lookup, one syscall) until the row's presence is ``allowed``."""
    from propolis.maps.policy import POLICY_PREFIX_DPORT, POLICY_PREFIX_PROTO
    full = POLICY_PREFIX_PROTO + POLICY_PREFIX_DPORT
    while time.perf_counter() < deadline:
        value = policy_map.lookup(key)
        present = value is not None and value.prefix_len == full and not value.flags & 1
        if present == allowed:
            return time.perf_counter()
        await asyncio.sleep(0.0005)
    return None


async def _until_probe(spec: Any, allowed: bool, deadline: float, interval: float = 0.005) -> float | None:
    """Start a probe every ``interval``; the flip is the start time of the first probe whose verdict
    is the new one (a SYN's verdict is decided when it is sent)."""
    from propolis_sandbox import probe
    seen: list[float] = []
    tasks: list[asyncio.Task[None]] = []

    async def one() -> None:
        started = time.perf_counter()
        result = await probe.probe(spec, timeout=0.3)
        if result.connected == allowed:
            seen.append(started)

    try:
        while not seen and time.perf_counter() < deadline:
            tasks.append(asyncio.create_task(one()))
            await asyncio.sleep(interval)
        await asyncio.sleep(0.02)  # let probes started just before the winner report
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return min(seen) if seen else None


async def part_apply(sb: SandboxBench, opt: Options) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from propolis.maps import bpf
    from propolis.maps.policy import POLICY_PREFIX_FULL, PolicyKey, PolicyRowKey, PolicyValue, inner_pin_name
    from propolis_sandbox import probe

    nodes = sb.state.nodes
    echo_node = len(nodes) - 1
    client_ip = await sb.create_pod("bench-client", nodes[0]["name"], {"app": "bench-client"})
    echo_ip = await sb.create_pod("bench-echo", nodes[echo_node]["name"], {"app": "bench-echo"}, ECHO_PORT)
    path = KINDS["CiliumNetworkPolicy"].path(NAMESPACE)
    await sb.api.request("POST", path, body=_flip_policy(OTHER_PORT))
    await sb.cluster.wait(sb.state, timeout=60)
    client = sb.endpoint(0, client_ip)
    echo = sb.endpoint(echo_node, echo_ip)
    key = PolicyRowKey(client.identity, 0, POLICY_PREFIX_FULL, 6, ECHO_PORT).to_c()
    spec = probe.ProbeSpec(sb.cfg.pod_netns(NAMESPACE, "bench-client"), echo_ip, ECHO_PORT, "TCP")
    event_map: list[float] = []
    flips: list[float] = []
    waits: list[float] = []
    missed = 0
    policy_map: bpf.BpfMap[PolicyKey, PolicyValue]
    with bpf.BpfMap.open_pinned(f"{nodes[echo_node]['pin_dir']}/{inner_pin_name(echo.endpoint_id)}",
                                PolicyKey, PolicyValue) as policy_map:
        for i in range(opt.updates):
            allowed = i % 2 == 0
            current = await sb.api.request("GET", f"{path}/bench-flip")
            body = _flip_policy(ECHO_PORT if allowed else OTHER_PORT)
            body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
            written = time.perf_counter()
            await sb.api.request("PUT", f"{path}/bench-flip", body=body)
            deadline = written + 10.0

            async def waited() -> float:
                await sb.cluster.wait(sb.state, timeout=10)
                return time.perf_counter()

            t_map, t_probe, t_wait = await asyncio.gather(_until_map(policy_map, key, allowed, deadline),
                                                          _until_probe(spec, allowed, deadline), waited())
            if t_map is None or t_probe is None:
                missed += 1
            else:
                event_map.append(t_map - written)
                flips.append(t_probe - written)
            waits.append(t_wait - written)
            if (i + 1) % 20 == 0:
                _log(f"apply: {i + 1}/{opt.updates} updates")
    em, fl, wt = _ms(event_map), _ms(flips), _ms(waits)
    note = f"{missed} update(s) not seen within 10 s" if missed else ""
    rows = [
        _row(2, "event -> map (API write -> entry in pinned policy map)", em["n"], em["p50"], em["p99"], "ms",
             TARGETS["event_map"], note or "map polled every ~1 ms"),
        _row(2, "apply -> enforced (probe flip allowed<->denied)", fl["n"], fl["p50"], fl["p99"], "ms",
             TARGETS["apply_enforced"], "probe started every 5 ms"),
        _row(2, "apply -> enforced (sandbox wait)", wt["n"], wt["p50"], wt["p99"], "ms", TARGETS["apply_enforced"],
             "wait polls heartbeats every 50 ms, new NATS connection each"),
    ]
    return rows, {"apply": {"updates": opt.updates, "missed": missed, "event_map_ms": em, "probe_flip_ms": fl,
                            "sandbox_wait_ms": wt, "client_identity": client.identity,
                            "echo_endpoint": echo.endpoint_id}}


async def part_sandbox(opt: Options) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from propolis_sandbox import cluster, fixture

    name = "bp" + uuid.uuid4().hex[:7]
    rows: list[dict[str, Any]] = []
    extra: dict[str, Any] = {}
    _log(f"sandbox {name}: up ({opt.nodes} nodes, all services)")
    try:
        state = await asyncio.to_thread(cluster.up, name, nodes=opt.nodes, services="all")
        await cluster.wait(state, timeout=60)
        async with SandboxBench(state) as sb:
            if 4 in opt.parts:  # first: its first pods must be the nodes' first endpoints
                r, e = await part_attach(sb, opt)
                rows += r
                extra.update(e)
            if 2 in opt.parts:
                r, e = await part_apply(sb, opt)
                rows += r
                extra.update(e)
    finally:
        await asyncio.to_thread(cluster.down, name)
        left = fixture.leftovers(name)
        extra["sandbox_leftovers"] = {k: v for k, v in left.items() if v}
        _log(f"sandbox {name}: down" + (f", LEFTOVERS {left}" if any(left.values()) else ""))
    return rows, extra


# --- the command ------------------------------------------------------------------------------

async def collect(opt: Options) -> dict[str, Any]:
    """Run the chosen parts; {"rows": table rows, "details": per-part figures}."""
    rows: list[dict[str, Any]] = []
    details: dict[str, Any] = {}
    if 1 in opt.parts:
        _log("part 1: compiler + map reconcile")
        r, d = await part_compiler(opt)
        rows += r
        details.update(d)
    if 2 in opt.parts or 4 in opt.parts:
        _log("parts 2/4: sandbox")
        r, d = await part_sandbox(opt)
        rows += r
        details.update(d)
    if 3 in opt.parts:
        _log("part 3: per-packet cost")
        r, d = await part_packet(opt)
        rows += r
        details.update(d)
    rows.sort(key=lambda r: r["part"])
    return {"rows": rows, "details": details}


def parse_parts(text: str) -> tuple[int, ...]:
    from propolis.errors import CliError
    try:
        parts = tuple(sorted({int(p) for p in text.split(",") if p.strip()}))
    except ValueError:
        raise CliError(f"--parts {text!r} is not a comma-separated list of 1..4") from None
    if not parts or any(p not in PARTS for p in parts):
        raise CliError(f"--parts {text!r}: choose among 1,2,3,4")
    return parts


async def run(opt: Options, command: str = "propolis bench policy") -> int:
    result = await collect(opt)
    report("policy", result["rows"], ["part", "measure", "n", "p50", "p99", "unit", "target", "note"],
           {"details": result["details"], "options": vars(opt), "command": command,
            "note": "shared 2-core machine: figures are noisy"})
    return 0
