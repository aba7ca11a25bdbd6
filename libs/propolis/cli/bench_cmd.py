"""`propolis bench …`: benchmarks print figures beside a baseline measured in the same run."""

from __future__ import annotations

import argparse
import importlib


def register(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmarks (figures, not pass/fail)")
    verbs = bench.add_subparsers(dest="bench_command", metavar="BENCH", required=True)
    bus = verbs.add_parser("bus", help="codec vs raw nats-py throughput/latency, KV latencies, idle RSS")
    bus.add_argument("--messages", type=int, default=100_000)
    bus.add_argument("--samples", type=int, default=2000)
    bus.set_defaults(func=lambda a: importlib.import_module("propolis.bench.bus").run(
        a.messages, a.samples, a.nats_url))
