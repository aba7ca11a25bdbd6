"""What CLI verbs share: finding and connecting the bus, printing rows and JSON."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from propolis.bus.codec import to_json
from propolis.bus.connection import Bus
from propolis.errors import CliError, PermanentError, TemporaryError

RUN_ROOT = Path(os.environ.get("PROPOLIS_RUN_ROOT", "/run/propolis"))
DEFAULT_SANDBOX = "propolis"
DEV_RUN_NAME = "dev"  # `propolis dev up` writes its state.json here


def sandbox_state(name: str = DEFAULT_SANDBOX) -> dict[str, Any] | None:
    path = RUN_ROOT / name / "state.json"
    try:
        return json.loads(path.read_text())  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return None


def local_cluster_states() -> dict[str, dict[str, Any]]:
    """Every local cluster (a sandbox or `dev up`) with a readable state file under the run root, by name:
    the CLI's equivalent of kubeconfig contexts, read as data so the product needs no sandbox code."""
    if not RUN_ROOT.is_dir():
        return {}
    found = {entry.name: sandbox_state(entry.name) for entry in sorted(RUN_ROOT.iterdir()) if entry.is_dir()}
    return {name: state for name, state in found.items() if state is not None}


def add_sandbox_flag(parser: argparse.ArgumentParser) -> None:
    """``--name S``: the sandbox a verb reads, as the `sandbox` verbs take it (default $PROPOLIS_SANDBOX_NAME)."""
    parser.add_argument("--name", dest="sandbox", default=os.environ.get("PROPOLIS_SANDBOX_NAME") or None,
                        metavar="NAME", help=f"sandbox to read (default: {DEFAULT_SANDBOX}, else a running "
                                             "`propolis dev up`; refused when neither runs but other sandboxes do)")


def _running_sandboxes() -> list[str]:
    if not RUN_ROOT.is_dir():
        return []
    return sorted(p.name for p in RUN_ROOT.iterdir()
                  if p.name != DEV_RUN_NAME and (p / "state.json").is_file())


def _admin_of(state: dict[str, Any], where: str) -> tuple[str | None, str | None]:
    """The admin credentials a state file points to (root-only file), if the server has users."""
    creds = state.get("nats_credentials")
    if not creds:
        return None, None
    from propolis.bus.permissions import load_credentials
    try:
        admin, _ = load_credentials(creds)
    except (OSError, ValueError, KeyError) as exc:
        raise CliError(f"NATS credentials of {where} unreadable ({creds}): {exc} (run as root)") from exc
    return admin.user, admin.password


def resolve_nats(args: argparse.Namespace) -> tuple[str, str | None, str | None]:
    """URL and admin credentials: --nats-url, then the sandbox named by ``args.sandbox`` (``--name``; a flag
    beats the environment), then $PROPOLIS_NATS_URL, then the default sandbox, then a running `propolis dev up`.
    Without a name, another sandbox is never picked silently: that is refused, naming them."""
    named = getattr(args, "sandbox", None)
    url = getattr(args, "nats_url", None) or (None if named else os.environ.get("PROPOLIS_NATS_URL"))
    if url:
        return url, os.environ.get("PROPOLIS_NATS_USER") or None, os.environ.get("PROPOLIS_NATS_PASSWORD") or None
    if named:
        state, where = sandbox_state(named), f"sandbox {named!r}"
        if not state:
            raise CliError(f"no sandbox {named!r} (no {RUN_ROOT / named / 'state.json'}): "
                           f"`propolis sandbox up --name {named}`")
    else:
        state, where = sandbox_state(DEFAULT_SANDBOX), f"sandbox {DEFAULT_SANDBOX!r}"
        if not state:
            state, where = sandbox_state(DEV_RUN_NAME), "`propolis dev up`"
        others = _running_sandboxes()
        if not state and others:
            raise CliError(f"no sandbox {DEFAULT_SANDBOX!r} is running; running: {', '.join(others)}: "
                           "pick one with --name NAME")
    if state and state.get("nats_url"):
        return (state["nats_url"], *_admin_of(state, where))
    raise CliError("no NATS server: pass --nats-url, set PROPOLIS_NATS_URL, or start one "
                   "(`propolis sandbox up` or `propolis dev up`)")


async def connect_bus(args: argparse.Namespace, name: str = "propolis-cli") -> Bus:
    url, user, password = resolve_nats(args)
    bus = Bus(url, name=name, user=user, password=password)
    try:
        await bus.connect(max_wait=3)
    except (TemporaryError, PermanentError) as exc:
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
