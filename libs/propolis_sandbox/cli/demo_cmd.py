"""`propolis demo`: the sandbox, an application, policies, traffic, status and flows — what `make demo` runs."""

from __future__ import annotations

import argparse

from propolis_sandbox.cli.sandbox_cmd import DEFAULT_NAME


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = sub.add_parser("demo", help="bring up a sandbox, deploy an app with policies, show traffic and flows")
    demo.add_argument("--name", default=DEFAULT_NAME, help="sandbox name (default %(default)s)")
    demo.add_argument("--nodes", type=int, default=2)
    demo.add_argument("--skip-connectivity", action="store_true", help="leave out the connectivity test")
    demo.set_defaults(func=cmd_demo)


async def cmd_demo(args: argparse.Namespace) -> int:
    from propolis_sandbox import demo

    return await demo.run(args.name, nodes=args.nodes, connectivity=not args.skip_connectivity)
