"""`propolis bench …`: benchmarks print figures beside a baseline measured in the same run."""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmarks (figures, not pass/fail)")
    verbs = bench.add_subparsers(dest="bench_command", metavar="BENCH", required=True)
    bus = verbs.add_parser("bus", help="codec vs raw nats-py throughput/latency, KV latencies, idle RSS")
    bus.add_argument("--messages", type=int, default=100_000)
    bus.add_argument("--samples", type=int, default=2000)
    bus.set_defaults(func=lambda a: importlib.import_module("propolis.bench.bus").run(
        a.messages, a.samples, a.nats_url))
    services = verbs.add_parser("services", help="service LB: eBPF maps vs kube-proxy iptables, side by side")
    services.add_argument("--counts", default="10,100,1000,10000", help="numbers of services, comma-separated")
    services.add_argument("--connections", type=int, default=2000, help="new connections per measurement")
    services.set_defaults(func=lambda a: importlib.import_module("propolis.bench.services").run(
        [int(c) for c in a.counts.split(",") if c.strip()], connections=a.connections))
    sandbox = verbs.add_parser("sandbox", help="sandbox up + pods ready, probe matrix throughput, down")
    sandbox.add_argument("--nodes", type=int, default=2)
    sandbox.add_argument("--pods", type=int, default=20)
    sandbox.set_defaults(func=lambda a: _print(importlib.import_module("propolis.sandbox.bench").bench_sandbox(
        nodes=a.nodes, pods=a.pods)))
    policy = verbs.add_parser("policy", help="policy compiler: full compute, one policy change, one new identity")
    policy.add_argument("--policies", type=int, default=1000)
    policy.add_argument("--identities", type=int, default=1000)
    policy.set_defaults(func=lambda a: _print(importlib.import_module("propolis.policy.bench").measure(
        policies=a.policies, identities=a.identities, local_endpoints=a.identities)))


async def _print(figures: Any) -> int:
    """Benchmarks that return figures print them as JSON (awaits them when they are coroutines)."""
    if inspect.isawaitable(figures):
        figures = await figures
    print(json.dumps(figures, indent=2))
    return 0
