"""What CLI verbs share: finding and connecting the bus, printing rows and JSON."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

from propolis.bus.codec import to_json
from propolis.bus.connection import Bus
from propolis.errors import CliError, TemporaryError

RUN_ROOT = Path(os.environ.get("PROPOLIS_RUN_ROOT", "/run/propolis"))
DEFAULT_SANDBOX = "propolis"
DEV_RUN_NAME = "dev"  # `propolis dev up` writes its state.json here


def sandbox_state(name: str = DEFAULT_SANDBOX) -> dict[str, Any] | None:
    path = RUN_ROOT / name / "state.json"
    try:
        return json.loads(path.read_text())  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return None


def resolve_nats(args: argparse.Namespace) -> tuple[str, str | None, str | None]:
    """URL and admin credentials: --nats-url, then the sandbox named by ``args.sandbox`` (``--name``; a flag
    beats the environment), then $PROPOLIS_NATS_URL, then the default sandbox, then a running `propolis dev up`."""
    named = getattr(args, "sandbox", None)
    url = getattr(args, "nats_url", None) or (None if named else os.environ.get("PROPOLIS_NATS_URL"))
    if url:
        return url, os.environ.get("PROPOLIS_NATS_USER") or None, os.environ.get("PROPOLIS_NATS_PASSWORD") or None
    state = sandbox_state(named) if named else sandbox_state(DEFAULT_SANDBOX) or sandbox_state(DEV_RUN_NAME)
    if named and not state:
        raise CliError(f"no sandbox {named!r} (no {RUN_ROOT / named / 'state.json'}): "
                       f"`propolis sandbox up --name {named}`")
    if state and state.get("nats_url"):
        return state["nats_url"], state.get("nats_user"), state.get("nats_password")
    raise CliError("no NATS server: pass --nats-url, set PROPOLIS_NATS_URL, or start one "
                   "(`propolis sandbox up` or `propolis dev up`)")


async def connect_bus(args: argparse.Namespace, name: str = "propolis-cli") -> Bus:
    url, user, password = resolve_nats(args)
    bus = Bus(url, name=name, user=user, password=password)
    try:
        await bus.connect(max_wait=3)
    except TemporaryError as exc:
        raise CliError(str(exc)) from exc
    return bus


def print_json(obj: Any) -> None:
    sys.stdout.write(to_json(obj).decode() + "\n")


def print_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Left-aligned columns like `cilium … list`."""
    rows = [[str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    fmt = "   ".join(f"{{:<{w}}}" for w in widths)
    print(fmt.format(*headers).rstrip())
    for r in rows:
        print(fmt.format(*r).rstrip())


def add_output_flag(parser: argparse.ArgumentParser, choices: Sequence[str] = ("table", "json")) -> None:
    parser.add_argument("-o", "--output", choices=list(choices), default=choices[0])
