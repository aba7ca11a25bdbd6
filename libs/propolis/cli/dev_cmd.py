"""`propolis dev up`: embedded NATS (with per-service users) and every service, locally, showing heartbeats.

The quickest way to see the suite run without a sandbox: no namespaces, no
Kubernetes API (the k8s-watcher reports itself degraded and says why), so only
the cluster-scoped services of the suite list run (`deploy.without_node`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import time
from pathlib import Path

from propolis import deploy
from propolis.bus import permissions, subjects
from propolis.bus.connection import Bus
from propolis.bus.embedded import EmbeddedNats
from propolis.bus.messages import Heartbeat
from propolis.cli.common import DEV_RUN_NAME, RUN_ROOT


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    dev = sub.add_parser("dev", help="run NATS and every service locally (no sandbox)")
    verbs = dev.add_subparsers(dest="dev_command", metavar="VERB", required=True)
    up = verbs.add_parser("up", help="start embedded NATS and all services; print heartbeats until Ctrl-C")
    up.add_argument("--run-dir", type=Path, default=RUN_ROOT / DEV_RUN_NAME)
    up.add_argument("--duration", type=float, default=0, help="stop after S seconds (0 = until Ctrl-C)")
    up.add_argument("--node-name", default="dev-node")
    up.set_defaults(func=dev_up)


async def dev_up(args: argparse.Namespace) -> int:
    run_dir: Path = args.run_dir
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    specs = deploy.without_node()
    names = [s.name for s in specs]
    admin, users = permissions.generate_credentials(names)
    nats = EmbeddedNats(run_dir / "nats", config_text=permissions.server_config(users, admin=admin))
    procs: list[deploy.ServiceProcess] = []
    bus = None
    try:
        url = await nats.start()
        print(f"NATS {url} (JetStream in {run_dir / 'nats'}); in another shell try: propolis bus tail 'propolis.>'"
              " or propolis status")
        credentials = run_dir / "nats" / "credentials.json"
        permissions.save_credentials(credentials, admin, users)
        (run_dir / "state.json").write_text(json.dumps({"nats_url": url, "nats_credentials": str(credentials)}))
        bus = Bus(url, name="dev-up", user=admin.user, password=admin.password)
        await bus.connect(max_wait=5)
        await bus.ensure_buckets()
        for spec in specs:
            env = {"PROPOLIS_NATS_URL": url, "PROPOLIS_NATS_USER": users[spec.name].user,
                   "PROPOLIS_NATS_PASSWORD": users[spec.name].password}
            procs.append(deploy.start_service(spec, node=args.node_name, env=env, log_dir=run_dir / "logs"))
            print(f"started {spec.name} (pid {procs[-1].proc.pid}, log {procs[-1].log_path})")

        async def show(hb: Heartbeat, _msg: object) -> None:
            bad = {k: v["reason"] for k, v in hb.components.items() if v.get("state") != "ok"}
            note = f"  ({'; '.join(f'{k}: {r}' for k, r in bad.items())})" if bad else ""
            print(f"heartbeat {hb.service:<20} node={hb.node} pid={hb.pid} health={hb.health:<8} "
                  f"uptime={time.time() - hb.started_at:5.1f}s{note}")
            sys.stdout.flush()

        await bus.subscribe(subjects.HEARTBEAT_ALL, show, expected=Heartbeat)
        deadline = time.monotonic() + args.duration if args.duration else None
        while deadline is None or time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            for p in procs:
                if not p.alive():
                    print(f"{p.spec.name} exited with {p.proc.returncode}; see {p.log_path}", file=sys.stderr)
                    return 1
    finally:
        deploy.stop_services(procs)
        if bus is not None:
            await bus.close()
        await nats.stop()
        shutil.rmtree(run_dir, ignore_errors=True)
        print("stopped every service and NATS")
    return 0
