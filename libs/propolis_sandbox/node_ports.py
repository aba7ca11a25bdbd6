"""Each node's own listeners: a kubelet-like TCP 10250 and an ssh-like TCP 22 in the node's namespace.

Why: the host firewall protects the node itself, so the sandbox needs something on the node to protect
and to probe (`propolis sandbox probe FROM node:NAME --port 22`). They are the pods' echo server
(`sandbox/echo.py`) answering `node/<name>`, supervised by the supervisor like the world's servers.
"""

from __future__ import annotations

import sys

from propolis_sandbox import netns as netns_mod
from propolis_sandbox.config import SandboxConfig

NODE_TCP_PORTS = (10250, 22)  # kubelet, ssh


def node_processes(cfg: SandboxConfig) -> list[tuple[str, str, list[str]]]:
    """(node, name, argv) of every node's listeners, each run inside its node's namespace (and cgroup)."""
    out = []
    for n, node in enumerate(cfg.node_names(), start=1):
        echo = [sys.executable, "-m", "propolis_sandbox.echo", "--pod", f"node/{node}"]
        echo += [a for p in NODE_TCP_PORTS for a in ("--tcp", str(p))]
        out.append((node, f"node-ports-{node}", netns_mod.netns_exec_argv(cfg.node_netns(n), echo)))
    return out
