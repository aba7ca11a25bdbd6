"""`propolis connectivity test`: deploy test pods, run named scenarios with real packets, clean up.

`--kubeconfig PATH` tests any cluster through the Kubernetes API (`connectivity/kube.py`); without it the
sandbox named by `--name` is tested, through the cluster the harness registers (entry point group
`propolis.clusters`, name ``sandbox``): the product never imports the sandbox.
"""

from __future__ import annotations

import argparse
import json

from propolis.cli.common import DEFAULT_SANDBOX, resolve_nats
from propolis.connectivity.cluster import Cluster
from propolis.errors import CliError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    connectivity = sub.add_parser("connectivity", help="end-to-end connectivity checks (like cilium connectivity)")
    verbs = connectivity.add_subparsers(dest="connectivity_command", metavar="VERB", required=True)
    test = verbs.add_parser("test", help="deploy client/echo pods, run the scenarios, print pass/fail, clean up")
    test.add_argument("--name", default=DEFAULT_SANDBOX, help="sandbox to test (default %(default)s)")
    test.add_argument("--kubeconfig", metavar="PATH",
                      help="test the cluster of this kubeconfig through the Kubernetes API instead of a sandbox "
                           "(the suite's NATS: --nats-url, $PROPOLIS_NATS_URL, or the sandbox --name)")
    test.add_argument("--context", help="with --kubeconfig: the context to use (default: its current one)")
    test.add_argument("--test", action="append", metavar="NAME",
                      help="run only NAME (repeatable, comma lists); '!NAME' excludes it")
    test.add_argument("--list", action="store_true", help="list the scenarios and exit")
    test.add_argument("--keep", action="store_true", help="leave the propolis-test namespace afterwards")
    test.add_argument("-v", "--verbose", action="store_true", help="show every check, not only failures")
    test.add_argument("-o", "--output", choices=("text", "json"), default="text")
    test.set_defaults(func=cmd_test)


async def open_cluster(args: argparse.Namespace) -> Cluster:
    """The cluster under test: the kubeconfig's, else the sandbox ``--name`` (through its entry point)."""
    if args.kubeconfig:
        from propolis.connectivity.kube import KubeCluster
        return await KubeCluster.open(args.kubeconfig, resolve_nats(argparse.Namespace(
            nats_url=args.nats_url, sandbox=args.name if args.name != DEFAULT_SANDBOX else None)),
            context=args.context)
    from propolis.connectivity.cluster import installed_cluster
    return await installed_cluster("sandbox")(args.name)


async def cmd_test(args: argparse.Namespace) -> int:
    from propolis.connectivity import runner
    from propolis.connectivity.scenarios import NAMESPACE, SCENARIOS, Selection

    if args.list:
        for s in SCENARIOS:
            print(f"{s.name:<32} {s.description}")
        return 0
    selection = Selection.parse(args.test)
    if selection.unknown():
        raise CliError(f"unknown test(s): {', '.join(selection.unknown())}; see --list")
    cluster = await open_cluster(args)
    try:
        features = await cluster.feature_states()

        def show(outcome: runner.ScenarioOutcome) -> None:
            if args.output == "text":
                print(runner.render(outcome, args.verbose), flush=True)

        if args.output == "text":
            print(f"Connectivity test on {cluster.description}: {len(cluster.nodes)} nodes, namespace {NAMESPACE}")
        outcomes = await runner.run_tests(cluster, selection, features=features, keep=args.keep, progress=show)
    finally:
        await cluster.close()
    if args.output == "json":
        print(json.dumps({"summary": runner.summary(outcomes), "tests": [o.to_json() for o in outcomes]}, indent=2))
    else:
        print(runner.summary(outcomes))
    return 0 if runner.run_passed(outcomes) else 1
