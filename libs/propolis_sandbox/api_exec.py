"""`pods/exec` of the sandbox API server, as `kubectl exec` and kubernetes-asyncio's `WsApiClient` call it.

Why: `propolis connectivity test --kubeconfig` probes a real cluster by exec into its client pods; with this
the same code runs against a sandbox, end to end. A sandbox pod has no container filesystem, so the
command runs like `ip netns exec <pod netns> COMMAND…`: the host's programs (python3) in the pod's network
namespace, with the pod's resolv.conf bind-mounted over /etc/resolv.conf (what the pod sees on the
network is the pod's), and in the node's cgroup, where a runtime puts a container's processes (kubepods sit
under the node's root): a hostNetwork pod's command runs in the node's namespace and cgroup, so socket LB
serves it as it serves the node's own processes. Only the websocket protocols `v4.channel.k8s.io` and
`v5.channel.k8s.io` (kubectl's) are spoken, not SPDY: each binary frame is one channel byte then data
(1 stdout, 2 stderr), and the end is a Status on channel 3 (`Success`, or `Failure` with reason
NonZeroExitCode and the exit code as the cause's message). No stdin, no tty.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from propolis_sandbox import cgroups
from propolis_sandbox.api_store import ApiStatusError, bad_request
from propolis_sandbox.config import POD_UID_ENV, SandboxConfig

log = logging.getLogger("propolis_sandbox.apiserver")

#: v5 (kubectl >= 1.30) is v4 plus a channel 255 the client may use to close stdin: without stdin they are the same
PROTOCOLS = ("v5.channel.k8s.io", "v4.channel.k8s.io")
STDOUT_CHANNEL, STDERR_CHANNEL, ERROR_CHANNEL = 1, 2, 3
NETNS_DIR = Path("/run/netns")
CHUNK_BYTES = 32 * 1024


@dataclass(frozen=True)
class ExecTarget:
    """Where a pod's command runs: the network namespace and cgroup its containers' processes are in."""

    netns: str
    cgroup: Path | None = None  # None: the API server's own (an API server without nodes)

    def argv(self, command: list[str]) -> list[str]:
        # the cgroup first: `ip netns exec` mounts the namespace's own /sys, hiding the cgroup2 mount
        argv = ["ip", "netns", "exec", self.netns, *command]
        return cgroups.in_cgroup_argv(self.cgroup, argv) if self.cgroup is not None else argv


def sandbox_target(cfg: SandboxConfig, pod: dict[str, Any]) -> ExecTarget:
    """Where the sandbox's kubelet runs the pod's processes: `SandboxConfig.pod_netns_of`, its node's cgroup."""
    return ExecTarget(cfg.pod_netns_of(pod), cgroups.node_cgroup(cfg.name, (pod.get("spec") or {}).get("nodeName", "")))


def exit_status(code: int, command: list[str]) -> dict[str, object]:
    """The Status the error channel carries when the command ended (as the kubelet words it)."""
    if code == 0:
        return {"metadata": {}, "status": "Success"}
    return {"metadata": {}, "status": "Failure", "reason": "NonZeroExitCode",
            "message": f"command terminated with non-zero exit code: error executing command {command}, "
                       f"exit code {code}",
            "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]}}


def _true(request: web.Request, name: str) -> bool:
    return request.query.get(name, "").lower() in ("true", "1")


async def serve_exec(request: web.Request, namespace: str, name: str, pod: dict[str, Any],
                     target: ExecTarget) -> web.StreamResponse:
    """Run the request's `command` parameters in the pod's network namespace and cgroup over a websocket."""
    command = request.query.getall("command", [])
    if not command:
        raise bad_request("you must specify at least 1 command")
    if _true(request, "stdin") or _true(request, "tty"):
        raise bad_request("stdin and tty are not supported by the sandbox API server's exec")
    if not (pod.get("status") or {}).get("podIP") or not (NETNS_DIR / target.netns).exists():
        raise bad_request(f"pod {namespace}/{name} is not running (no network namespace {target.netns})")
    ws = web.WebSocketResponse(protocols=PROTOCOLS)
    if not ws.can_prepare(request).ok:
        raise ApiStatusError(400, "BadRequest", "Upgrade request required (pods/exec speaks websocket "
                                                f"{' or '.join(PROTOCOLS)} only)")
    await ws.prepare(request)
    uid = str((pod.get("metadata") or {}).get("uid", ""))
    proc = await asyncio.create_subprocess_exec(*target.argv(command), env=dict(os.environ, **{POD_UID_ENV: uid}),
                                                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)

    async def pump(stream: asyncio.StreamReader | None, channel: int) -> None:
        assert stream is not None
        while chunk := await stream.read(CHUNK_BYTES):
            await ws.send_bytes(bytes([channel]) + chunk)

    try:
        await asyncio.gather(pump(proc.stdout, STDOUT_CHANNEL), pump(proc.stderr, STDERR_CHANNEL))
        code = await proc.wait()
        await ws.send_bytes(bytes([ERROR_CHANNEL]) + orjson.dumps(exit_status(code, command)))
    except (ConnectionResetError, asyncio.CancelledError):
        log.info("exec in %s/%s: the client went away", namespace, name)
        raise
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        await ws.close()
    return ws
