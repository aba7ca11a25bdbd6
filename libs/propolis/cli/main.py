"""The `propolis` command: one argparse tree, one module per verb group.

Each module in COMMAND_MODULES (and in the plugins' lists, see PLUGIN_GROUP) exposes `register(subparsers)`, which adds its
verbs and sets `func` (sync or async, taking the parsed args, returning an
exit code). Adding a verb group means adding a module and one line here.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import inspect
import sys
from collections.abc import Awaitable
from typing import Any

from propolis.errors import CliError

#: In the order `propolis --help` lists them: first what a newcomer runs, then what operators use.
COMMAND_MODULES = [
    "propolis.cli.status_cmd",
    "propolis.cli.connectivity_cmd",
    "propolis.cli.observe_cmd",
    "propolis.cli.hubble_cmd",
    "propolis.cli.encrypt_cmd",
    "propolis.cli.policy_cmd",
    "propolis.cli.fqdn_cmd",
    "propolis.cli.identity_cmd",
    "propolis.cli.service_cmd",
    "propolis.cli.bpf_cmd",
    "propolis.cli.bus_cmd",
    "propolis.cli.dev_cmd",
]

#: Verb groups other distributions add (the sandbox's `demo`, `sandbox`, `clustermesh`,
#: `bench`): each entry point names a list of module names; the product imports none of them itself.
PLUGIN_GROUP = "propolis.cli"


def plugin_command_modules() -> list[str]:
    from importlib.metadata import entry_points
    modules: list[str] = []
    for entry in sorted(entry_points(group=PLUGIN_GROUP), key=lambda e: e.name):
        modules.extend(entry.load())
    return modules


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="propolis", description="Propolis: eBPF networking, security and observability for Kubernetes. "
                                     "New here? Run `propolis demo`.")
    parser.add_argument("--nats-url", default=None,
                        help="NATS server URL (default: $PROPOLIS_NATS_URL, else the sandbox's, else an embedded server)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in plugin_command_modules() + COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue  # verb group not built yet
            raise
        module.register(sub)
    return parser


async def _awaited(result: Awaitable[Any]) -> Any:
    """A verb's awaitable as the coroutine asyncio.run wants."""
    return await result


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Any = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        result = func(args)
        if inspect.isawaitable(result):
            result = asyncio.run(_awaited(result))
    except KeyboardInterrupt:
        return 130
    except CliError as exc:
        print(f"propolis: {exc}", file=sys.stderr)
        return exc.exit_code
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
