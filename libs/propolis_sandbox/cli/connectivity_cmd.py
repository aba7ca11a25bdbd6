"""`propolis connectivity test`: deploy test pods, run named scenarios with real packets, clean up."""

from __future__ import annotations

import argparse
import json
from typing import Any

from propolis.errors import CliError
from propolis_sandbox.cli.sandbox_cmd import DEFAULT_NAME


def register(sub: argparse._SubParsersAction) -> None:
    connectivity = sub.add_parser("connectivity", help="end-to-end connectivity checks (like cilium connectivity)")
    verbs = connectivity.add_subparsers(dest="connectivity_command", metavar="VERB", required=True)
    test = verbs.add_parser("test", help="deploy client/echo pods, run the scenarios, print pass/fail, clean up")
    test.add_argument("--name", default=DEFAULT_NAME, help="sandbox name (default %(default)s)")
    test.add_argument("--test", action="append", metavar="NAME",
                      help="run only NAME (repeatable, comma lists); '!NAME' excludes it")
    test.add_argument("--list", action="store_true", help="list the scenarios and exit")
    test.add_argument("--keep", action="store_true", help="leave the propolis-test namespace afterwards")
    test.add_argument("-v", "--verbose", action="store_true", help="show every check, not only failures")
    test.add_argument("-o", "--output", choices=("text", "json"), default="text")
    test.set_defaults(func=cmd_test)


async def cmd_test(args: argparse.Namespace) -> int:
    from propolis.connectivity.scenarios import SCENARIOS, Selection
    from propolis_sandbox import cluster
    from propolis_sandbox import connectivity as runner

    if args.list:
        for s in SCENARIOS:
            print(f"{s.name:<32} {s.description}")
        return 0
    selection = Selection.parse(args.test)
    if selection.unknown():
        raise CliError(f"unknown test(s): {', '.join(selection.unknown())}; see --list")
    state = cluster.require_state(args.name)
    features = await _feature_states(state)

    def show(outcome: Any) -> None:
        if args.output == "text":
            print(runner.render(outcome, args.verbose), flush=True)

    if args.output == "text":
        print(f"Connectivity test on sandbox {args.name}: {len(state.nodes)} nodes, namespace propolis-test")
    outcomes = await runner.run_tests(state, selection, features=features, keep=args.keep,
                                      progress=show)
    failed = not runner.run_passed(outcomes)
    if args.output == "json":
        print(json.dumps({"summary": runner.summary(outcomes), "tests": [o.to_json() for o in outcomes]}, indent=2))
    else:
        print(runner.summary(outcomes))
    return 1 if failed else 0


async def _feature_states(state: Any) -> dict[str, str]:
    """Feature name -> state as the running services report them in their heartbeats."""
    from propolis.status import collect

    bus = state.admin_bus("propolis-connectivity")
    await bus.connect(max_wait=5)
    try:
        report = await collect(bus, probe_kernel=False)
    finally:
        await bus.close()
    return {name: str(f.get("state", "")) for name, f in report.features.items()}
