"""Launching the suite's processes outside the sandbox (`propolis dev up`, the bus benchmark).

The suite itself is one list, `propolis.suite.SUITE_SERVICES`:
the sandbox, `dev up` and `propolis status` all follow it, so a
new service is one line there. Per-node services act on a node's network
namespace, which only the sandbox (or a real node) provides, so outside it
only the cluster-scoped part runs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from propolis.suite import SUITE_SERVICES, SuiteService


def without_node() -> list[SuiteService]:
    """The services that can run without a node network namespace: the cluster-scoped ones."""
    return [s for s in SUITE_SERVICES if s.scope == "cluster"]


@dataclass
class ServiceProcess:
    """One running service process with its log file (stderr+stdout)."""

    spec: SuiteService
    node: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def alive(self) -> bool:
        return self.proc.poll() is None


def start_service(spec: SuiteService, *, node: str, env: dict[str, str], log_dir: Path) -> ServiceProcess:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{spec.name}-{node}.log"
    full_env = {**os.environ, **env, "PROPOLIS_NODE_NAME": node}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(spec.command({"node": node}), stdin=subprocess.DEVNULL,
                                stdout=log, stderr=log, env=full_env, start_new_session=True)
    return ServiceProcess(spec, node, proc, log_path)


def stop_services(procs: list[ServiceProcess], timeout: float = 10.0) -> None:
    """SIGTERM all, wait up to ``timeout`` in total, then SIGKILL what is left."""
    for p in procs:
        if p.alive():
            p.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.proc.kill()
            p.proc.wait()
