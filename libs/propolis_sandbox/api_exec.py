"""`pods/exec` of the sandbox API server, as `kubectl exec` and kubernetes-asyncio's `WsApiClient` call it.

Why: `propolis connectivity test --kubeconfig` probes a real cluster by exec into its client pods; with this
the same code runs against a sandbox, end to end. A sandbox pod has no container filesystem, so the
command runs like `ip netns exec <pod netns> COMMAND…`: the host's programs (python3) in the pod's network
namespace, with the pod's resolv.conf bind-mounted over /etc/resolv.conf (what the pod sees on the
network is the pod's). Only the websocket protocols `v4.channel.k8s.io` and `v5.channel.k8s.io` (kubectl's)
are spoken, not SPDY: each binary frame is one channel byte then data (1 stdout, 2 stderr), and the end is a
Status on channel 3 (`Success`, or `Failure` with reason NonZeroExitCode and the exit code as the cause's
message). No stdin, no tty.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from propolis_sandbox.api_store import ApiStatusError, bad_request

log = logging.getLogger("propolis_sandbox.apiserver")

#: v5 (kubectl >= 1.30) is v4 plus a channel 255 the client may use to close stdin: without stdin they are the same
PROTOCOLS = ("v5.channel.k8s.io", "v4.channel.k8s.io")
STDOUT_CHANNEL, STDERR_CHANNEL, ERROR_CHANNEL = 1, 2, 3
NETNS_DIR = Path("/run/netns")
CHUNK_BYTES = 32 * 1024


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
                     netns: str) -> web.StreamResponse:
    """Run the request's `command` parameters in the pod's network namespace over a websocket."""
    command = request.query.getall("command", [])
    if not command:
        raise bad_request("you must specify at least 1 command")
    if _true(request, "stdin") or _true(request, "tty"):
        raise bad_request("stdin and tty are not supported by the sandbox API server's exec")
    if not (pod.get("status") or {}).get("podIP") or not (NETNS_DIR / netns).exists():
        raise bad_request(f"pod {namespace}/{name} is not running (no network namespace {netns})")
    ws = web.WebSocketResponse(protocols=PROTOCOLS)
    if not ws.can_prepare(request).ok:
        raise ApiStatusError(400, "BadRequest", "Upgrade request required (pods/exec speaks websocket "
                                                f"{' or '.join(PROTOCOLS)} only)")
    await ws.prepare(request)
    proc = await asyncio.create_subprocess_exec("ip", "netns", "exec", netns, *command,
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
