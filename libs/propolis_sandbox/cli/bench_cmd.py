"""`propolis bench …`: benchmarks print figures beside a baseline measured in the same run."""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
from collections.abc import Callable
from typing import Any


def _ints(csv: str) -> list[int]:
    return [int(c) for c in csv.split(",") if c.strip()]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bench = sub.add_parser("bench", help="benchmarks (figures, not pass/fail)")
    verbs = bench.add_subparsers(dest="bench_command", metavar="BENCH", required=True)
    bus = verbs.add_parser("bus", help="codec vs raw nats-py throughput/latency, KV latencies, idle RSS")
    bus.add_argument("--messages", type=int, default=100_000)
    bus.add_argument("--samples", type=int, default=2000)
    bus.set_defaults(func=lambda a: importlib.import_module("propolis_sandbox.bench.bus").run(
        a.messages, a.samples, a.nats_url))
    watch = verbs.add_parser("kv-watch", help="KV watch initial sync: events/s of Kv.watch vs plain nats-py")
    watch.add_argument("--keys", type=int, default=10_000)
    watch.add_argument("--updates", type=int, default=10_000, help="puts followed after the initial sync")
    watch.add_argument("--rounds", type=int, default=3)
    watch.set_defaults(func=lambda a: importlib.import_module("propolis_sandbox.bench.bus").watch_sync(
        a.keys, a.rounds, a.nats_url, a.updates))
    fanout = verbs.add_parser("fanout", help="one nats-server telling N nodes about changes: whole-bucket "
                                             "watches vs per-node keys, side by side; initial sync")
    fanout.add_argument("--nodes", default="10,100,500,1000", help="simulated node counts, comma-separated")
    fanout.add_argument("--rates", default="50,500", help="updates/s, comma-separated")
    fanout.add_argument("--seconds", type=float, default=5.0, help="steady-state window per point")
    fanout.add_argument("--sync-keys", default="10000", help="bucket sizes for the initial-sync part, comma-separated")
    fanout.add_argument("--sync-consumers", default="1,100", help="consumers syncing at once, comma-separated")
    fanout.add_argument("--sync-layouts", default="full,per-node", help="initial-sync layouts (full, per-node)")
    fanout.set_defaults(func=lambda a: importlib.import_module("propolis_sandbox.bench.fanout").run(
        _ints(a.nodes), _ints(a.rates), a.seconds, _ints(a.sync_keys), _ints(a.sync_consumers),
        tuple(x for x in a.sync_layouts.split(",") if x)))
    services = verbs.add_parser("services", help="service LB: eBPF maps vs kube-proxy iptables, side by side")
    services.add_argument("--counts", default="10,1000,10000", help="numbers of services, comma-separated")
    services.add_argument("--connections", type=int, default=2000, help="new connections per probe point and side")
    services.add_argument("--rounds", type=int, default=2, help="alternating eBPF/iptables batches per size")
    services.add_argument("--update-samples", type=int, default=100, help="writer map writes timed per size, "
                                                                          "each an add and a remove")
    services.add_argument("--product-samples", type=int, default=100,
                          help="API write -> pinned LB map adds and deletes at the largest count (0 = skip)")
    services.add_argument("--product-count", type=int, default=0,
                          help="existing Services for the product path (0 = the largest of --counts)")
    services.set_defaults(func=lambda a: importlib.import_module("propolis_sandbox.bench.services").run(
        [int(c) for c in a.counts.split(",") if c.strip()], connections=a.connections, rounds=a.rounds,
        update_samples=a.update_samples, product_samples=a.product_samples, product_count=a.product_count or None))
    mesh = verbs.add_parser("clustermesh", help="Cluster Mesh: KVStoreMesh sync and propagation over real NATS, "
                                                "import cost of many synthetic remote clusters")
    mesh.add_argument("--clusters", default="1,8,32", help="remote cluster counts, comma-separated")
    mesh.add_argument("--nodes", type=int, default=200, help="nodes per synthetic cluster")
    mesh.add_argument("--endpoints", type=int, default=5000, help="endpoints per synthetic cluster")
    mesh.add_argument("--sync-endpoints", type=int, default=5000, help="endpoints of the mirrored remote export")
    mesh.add_argument("--changes", type=int, default=200, help="single changes timed remote -> local cache")
    mesh.set_defaults(func=lambda a: importlib.import_module("propolis_sandbox.bench.clustermesh").run(
        [int(c) for c in a.clusters.split(",") if c.strip()], a.nodes, a.endpoints, a.sync_endpoints, a.changes))
    dns_bench = verbs.add_parser("dns", help="DNS proxy: added latency and queries/s against the same upstream "
                                             "queried directly (loopback, separate processes)")
    dns_bench.add_argument("--rate", type=int, default=1000, help="paced queries/s for the latency figures")
    dns_bench.add_argument("--seconds", type=float, default=3.0)
    dns_bench.set_defaults(func=lambda a: importlib.import_module("propolis_sandbox.bench.dns").run(a.rate, a.seconds))
    l7 = verbs.add_parser("l7", help="HTTP and gRPC, same pods, direct (L4 policy) vs through the l7-proxy: "
                                     "requests/s (1, 50 connections), latency at a paced rate, proxy CPU and RSS")
    l7.add_argument("--seconds", type=float, default=5.0, help="how long each measurement runs")
    l7.add_argument("--rate", type=int, default=1000, help="paced requests/s for the latency figures")
    l7.add_argument("--kafka", action="store_true",
                    help="Kafka Produce requests to a real broker pod (bench/l7_kafka.py) instead")
    l7.set_defaults(func=lambda a: importlib.import_module(
        "propolis_sandbox.bench.l7_kafka" if a.kafka else "propolis_sandbox.bench.l7").run(a.seconds, a.rate))
    sandbox = verbs.add_parser("sandbox", help="sandbox up + pods ready, probe matrix throughput, down")
    sandbox.add_argument("--nodes", type=int, default=2)
    sandbox.add_argument("--pods", type=int, default=20)
    sandbox.set_defaults(func=lambda a: importlib.import_module("propolis_sandbox.bench.sandbox").bench_sandbox(
        nodes=a.nodes, pods=a.pods))
    encryption = verbs.add_parser("encryption", help="pod to pod across nodes with and without WireGuard: TCP "
                                                     "throughput (1 and 4 streams), request/response latency, "
                                                     "wireguard-go CPU")
    encryption.add_argument("--seconds", type=float, default=5.0, help="how long each throughput run streams")
    encryption.add_argument("--samples", type=int, default=2000, help="request/response round trips")
    encryption.set_defaults(func=lambda a: importlib.import_module("propolis_sandbox.bench.encryption").run(
        a.seconds, a.samples))
    flows = verbs.add_parser("flows", help="Hubble: flows/s from the BPF ring through the propolis-hubble process "
                                           "to a NATS subscriber (many 5-tuples, endpoints, identities, ipcache "
                                           "churn), lost events counted where lost")
    flows.add_argument("--rates", default="5000,30000", help="target events/s, comma-separated")
    flows.add_argument("--seconds", type=float, default=10.0, help="how long each rate is sustained")
    flows.add_argument("--follow-rate", type=int, default=2000,
                       help="one more run at this rate through hubble-relay to an `observe --follow` client "
                            "(0 = skip)")
    flows.add_argument("--identities", type=int, default=1000, help="identities on the bus")
    flows.add_argument("--endpoints", type=int, default=200, help="local pods (endpoints) receiving the flows")
    flows.add_argument("--peers", type=int, default=4000, help="remote addresses (ipcache rows) sending them")
    flows.add_argument("--five-tuples", type=int, default=8000, help="distinct established connections replayed")
    flows.add_argument("--churn", type=float, default=20.0, help="ipcache changes per second during each run")
    flows.set_defaults(func=lambda a: importlib.import_module("propolis_sandbox.bench.flows").run(
        [int(r) for r in a.rates.split(",") if r.strip()], a.seconds, a.nats_url, a.follow_rate,
        identities=a.identities, endpoints=a.endpoints, peers=a.peers, flows=a.five_tuples, churn=a.churn))
    node = verbs.add_parser("node", help="the node itself: Bandwidth Manager shaping accuracy (target rate, "
                                         "measured, error), host firewall per-packet cost, connect latency to a "
                                         "ClusterIP with socket LB (node) vs per-packet LB (pod)")
    node.add_argument("--targets", default="10M,100M", help="annotation values, comma-separated")
    node.add_argument("--seconds", type=float, default=3.0, help="measurement window of each transfer")
    node.add_argument("--connects", type=int, default=500, help="socket LB part: connects per path and round "
                                                                "(0 = skip)")
    node.set_defaults(func=lambda a: importlib.import_module("propolis_sandbox.bench.node").run(
        [t for t in a.targets.split(",") if t.strip()], a.seconds, a.connects))
    policy = verbs.add_parser("policy", help="policy: compiler + map reconcile, apply->enforced on a sandbox, "
                                             "per-packet cost, per-pod attach")
    policy.add_argument("--parts", default="1,2,3,4",
                        help="1 compiler+maps, 2 apply->enforced (sandbox), 3 per-packet, 4 pod attach (sandbox)")
    policy.add_argument("--policies", type=int, default=1000)
    policy.add_argument("--identities", type=int, default=1000)
    policy.add_argument("--changes", type=int, default=20, help="part 1: incremental policy changes timed")
    policy.add_argument("--rounds", type=int, default=3, help="part 1: full computes and full map writes timed")
    policy.add_argument("--map-endpoints", type=int, default=110,
                        help="part 1: endpoints whose policy maps are written (110 = kubelet's default maxPods)")
    policy.add_argument("--updates", type=int, default=100, help="part 2: policy updates (allowed<->denied)")
    policy.add_argument("--attach-pods", type=int, default=6, help="part 4: pods created per node")
    policy.add_argument("--packet-repeat", type=int, default=100_000, help="part 3: BPF_PROG_TEST_RUN repeat")
    policy.add_argument("--packet-rounds", type=int, default=5, help="part 3: runs per figure (p50/p99 over them)")
    policy.set_defaults(func=_bench_policy)
    watcher = verbs.add_parser("watcher", help="k8s-watcher initial sync + event->KV latency, racing identity "
                                               "allocators, service RSS")
    watcher.add_argument("--pods", type=int, default=10_000)
    watcher.add_argument("--services", type=int, default=1_000)
    watcher.add_argument("--namespaces", type=int, default=10)
    watcher.add_argument("--updates", type=int, default=1_000, help="pod label patches for the latency figure")
    watcher.add_argument("--rate", type=float, default=100.0, help="label patches per second (fixed rate)")
    watcher.add_argument("--allocations", type=int, default=2_000, help="label sets raced by two allocators")
    watcher.add_argument("--concurrency", type=int, default=16, help="allocations in flight per allocator")
    watcher.add_argument("--rss-settle", type=float, default=5.0, help="seconds idle services run before RSS")
    watcher.set_defaults(func=_bench_watcher)
    for verb, parser in verbs.choices.items():
        parser.set_defaults(func=_measured(verb, parser.get_default("func")))


def _bench_policy(a: argparse.Namespace) -> Any:
    mod = importlib.import_module("propolis_sandbox.bench.policy")
    opt = mod.Options(parts=mod.parse_parts(a.parts), policies=a.policies, identities=a.identities,
                      changes=a.changes, rounds=a.rounds, map_endpoints=a.map_endpoints, updates=a.updates,
                      attach_pods=a.attach_pods, packet_repeat=a.packet_repeat, packet_rounds=a.packet_rounds)
    command = "propolis " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else "propolis bench policy"
    return mod.run(opt, command)


def _bench_watcher(a: argparse.Namespace) -> Any:
    mod = importlib.import_module("propolis_sandbox.bench.watcher")
    opt = mod.Options(pods=a.pods, services=a.services, namespaces=a.namespaces, updates=a.updates, rate=a.rate,
                      allocations=a.allocations, concurrency=a.concurrency, rss_settle=a.rss_settle)
    command = "propolis " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else "propolis bench watcher"
    return mod.run(opt, command)


def _measured(verb: str, func: Callable[[argparse.Namespace], Any]) -> Callable[[argparse.Namespace], Any]:
    """Every verb: the load average noted at start; figures a bench returns printed in the one shape
    (`common.report_figures`: a table, then one JSON document), an exit code passed through. Synchronous
    benches (their own event loops) stay synchronous, coroutines are handed back for the CLI to run."""
    def run(a: argparse.Namespace) -> Any:
        common = importlib.import_module("propolis_sandbox.bench.common")
        common.begin()

        def shown(result: Any) -> int:
            if isinstance(result, int):
                return result
            common.report_figures(verb, result)
            return 0

        result = func(a)
        if inspect.isawaitable(result):
            async def awaited() -> int:
                return shown(await result)
            return awaited()
        return shown(result)
    return run
