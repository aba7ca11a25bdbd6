"""The Propolis services and how to launch each: the one list `dev up`, the sandbox and the chart follow.

``scope`` says how many run: one per cluster, or one per node (``--node-name``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    module: str
    scope: str  # "cluster" | "node"
    needs_kubeconfig: bool = False
    extra_env: dict[str, str] = field(default_factory=dict)

    def command(self) -> list[str]:
        return [sys.executable, "-m", self.module]


SERVICES: list[ServiceSpec] = [
    ServiceSpec("k8s-watcher", "services.k8s_watcher.main", "cluster", needs_kubeconfig=True),
    ServiceSpec("identity-allocator", "services.identity_allocator.main", "cluster"),
]


@dataclass
class ServiceProcess:
    """One running service process with its log file (stderr+stdout)."""

    spec: ServiceSpec
    node: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def alive(self) -> bool:
        return self.proc.poll() is None


def start_service(spec: ServiceSpec, *, node: str, env: dict[str, str], log_dir: Path) -> ServiceProcess:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{spec.name}-{node}.log"
    full_env = {**os.environ, **spec.extra_env, **env, "PROPOLIS_NODE_NAME": node}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(spec.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                env=full_env, start_new_session=True)
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
