"""The node-local socket where the CNI plugin announces endpoints (one JSON line each way).

Requests (from `propolis.cni.plugin.endpoint_message`): ``{"op": "EndpointAdd" | "EndpointDelete",
"containerID", "podNamespace", "podName", "netns", "ifname", "hostIfname", "hostIfindex",
"ipv4", "mac", "hostMac", "node"}``. Answer: ``{"ok": true, …}`` or ``{"ok": false, "error": …}``.
The CNI ADD blocks on the answer, so the writer answers only once the endpoint is programmed
(fail closed: a pod gets no traffic through an endpoint the datapath does not know).
Malformed requests get an error answer and never take the server down.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from propolis.errors import ValidationError

log = logging.getLogger("propolis.writer.endpoint_api")

MAX_REQUEST = 64 * 1024


@dataclass(frozen=True)
class EndpointAnnouncement:
    op: str
    container_id: str
    namespace: str
    pod: str
    netns: str
    ifname: str
    host_ifname: str
    host_ifindex: int
    ipv4: str
    mac: str
    host_mac: str

    @classmethod
    def parse(cls, doc: Any) -> EndpointAnnouncement:
        if not isinstance(doc, dict):
            raise ValidationError("", "request must be a JSON object")
        op = doc.get("op")
        if op not in ("EndpointAdd", "EndpointDelete"):
            raise ValidationError("op", f"must be EndpointAdd or EndpointDelete, got {op!r}")
        required: dict[str, type] = {"containerID": str, "podNamespace": str, "podName": str, "hostIfname": str}
        if op == "EndpointAdd":
            required.update({"hostIfindex": int, "ipv4": str, "netns": str})
        for name, typ in required.items():
            if not isinstance(doc.get(name), typ) or doc.get(name) in ("", None):
                raise ValidationError(name, f"missing or not a {typ.__name__}")
        return cls(op=op, container_id=doc["containerID"], namespace=doc["podNamespace"], pod=doc["podName"],
                   netns=str(doc.get("netns", "")), ifname=str(doc.get("ifname", "eth0")),
                   host_ifname=doc["hostIfname"], host_ifindex=int(doc.get("hostIfindex") or 0),
                   ipv4=str(doc.get("ipv4", "")), mac=str(doc.get("mac", "")), host_mac=str(doc.get("hostMac", "")))


Handler = Callable[[EndpointAnnouncement], Awaitable[dict[str, Any]]]


class EndpointApiServer:
    def __init__(self, path: Path | str, handler: Handler) -> None:
        self.path = Path(path)
        self.handler = handler
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            self.path.unlink()  # a previous instance's socket: we own this path now
        self.server = await asyncio.start_unix_server(self._serve, path=str(self.path), limit=MAX_REQUEST)
        os.chmod(self.path, 0o600)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        self.path.unlink(missing_ok=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 10)
            try:
                request = EndpointAnnouncement.parse(json.loads(line))
                answer = await self.handler(request)
            except (ValueError, ValidationError) as exc:  # json errors are ValueErrors
                answer = {"ok": False, "error": f"bad request: {exc}"}
            except Exception as exc:
                log.exception("endpoint request failed")
                answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        except (TimeoutError, asyncio.LimitOverrunError, ConnectionError) as exc:
            log.warning("endpoint socket client dropped: %s", exc)
        finally:
            writer.close()
