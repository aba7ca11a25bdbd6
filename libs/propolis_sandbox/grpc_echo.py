"""The sandbox's gRPC: what pods serve on ports named `grpc*`, and the client `sandbox probe --grpc` uses.

Server (`serve`, a real grpcio server, started by `sandbox.echo --grpc PORT` in the pod):
  * `/grpc.health.v1.Health/Check` answers SERVING, as every gRPC health checker expects;
  * every method of `propolis_sandbox.v1.Echo` (e.g. `/propolis_sandbox.v1.Echo/Say`) answers the
    raw request bytes prefixed with the pod's `NS/NAME ` (which pod answered, as the TCP echo does);
  * anything else is UNIMPLEMENTED.
Messages are raw bytes (no generated code): a HealthCheckResponse{status: SERVING} is `08 01`.

Client (`GrpcClient`, `unary_calls`): unary calls multiplexed on one HTTP/2 connection over a socket the caller
connected (probes open it inside the source pod's namespace); each call's gRPC status is the
`grpc-status` the server sent, else the one gRPC clients derive from the HTTP status (403 ->
PERMISSION_DENIED), as grpc-core's http-to-grpc mapping.
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass
from typing import Any

HEALTH_CHECK = "/grpc.health.v1.Health/Check"
ECHO_SERVICE = "propolis_sandbox.v1.Echo"
SERVING = b"\x08\x01"  # grpc.health.v1.HealthCheckResponse{status: SERVING}

OK, UNKNOWN, PERMISSION_DENIED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, UNAUTHENTICATED = 0, 2, 7, 12, 13, 14, 16
#: gRPC's status for a response without grpc-status (doc/http-grpc-status-mapping.md)
HTTP_TO_GRPC = {400: INTERNAL, 401: UNAUTHENTICATED, 403: PERMISSION_DENIED, 404: UNIMPLEMENTED,
                429: UNAVAILABLE, 502: UNAVAILABLE, 503: UNAVAILABLE, 504: UNAVAILABLE}
STATUS_NAMES = {OK: "OK", UNKNOWN: "UNKNOWN", PERMISSION_DENIED: "PERMISSION_DENIED",
                UNIMPLEMENTED: "UNIMPLEMENTED", INTERNAL: "INTERNAL", UNAVAILABLE: "UNAVAILABLE",
                UNAUTHENTICATED: "UNAUTHENTICATED"}


def status_name(code: int | None) -> str:
    return "no response" if code is None else STATUS_NAMES.get(code, str(code))


# --- server ---------------------------------------------------------------------------------------
async def serve(pod: str, ports: list[int], addresses: list[str]) -> Any:
    """Start the pod's gRPC server on `ports` (a started grpc.aio server; `stop(None)` ends it)."""
    import grpc  # only pods with gRPC ports pay for it

    prefix = pod.encode() + b" "

    async def health_check(request: bytes, context: Any) -> bytes:
        return SERVING

    async def echo(request: bytes, context: Any) -> bytes:
        return prefix + request

    class Handlers(grpc.GenericRpcHandler):
        def service(self, details: Any) -> Any:
            method = details.method
            if method == HEALTH_CHECK:
                return grpc.unary_unary_rpc_method_handler(health_check)
            if method.startswith(f"/{ECHO_SERVICE}/"):
                return grpc.unary_unary_rpc_method_handler(echo)
            return None

    server = grpc.aio.server(handlers=[Handlers()], options=[("grpc.so_reuseport", 0)])
    for address in addresses:
        for port in ports:
            server.add_insecure_port(f"{address}:{port}")
    await server.start()
    return server


# --- client ---------------------------------------------------------------------------------------
@dataclass
class CallResult:
    """One unary call's outcome as a gRPC client sees it."""

    path: str
    http_status: int | None = None
    grpc_status: int | None = None
    grpc_message: str = ""
    reply: bytes = b""

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "http_status": self.http_status, "grpc_status": self.grpc_status,
                "grpc_status_name": status_name(self.grpc_status) if self.grpc_status is not None else None,
                "grpc_message": self.grpc_message}


def frame_message(payload: bytes) -> bytes:
    """gRPC's length-prefixed message: uncompressed flag, big-endian length, bytes."""
    return struct.pack(">BI", 0, len(payload)) + payload


def _headers_into(result: CallResult, headers: list[tuple[bytes, bytes]]) -> None:
    for name, value in headers:
        if name == b":status":
            result.http_status = int(value)
        elif name == b"grpc-status":
            result.grpc_status = int(value)
        elif name == b"grpc-message":
            result.grpc_message = value.decode("utf-8", "replace")


class GrpcClient:
    """Unary calls on one HTTP/2 connection over a connected socket's streams; calls may overlap
    (each on its own stream). A connection that ends or breaks the protocol ends the calls still
    open with what they got (grpc_status None)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, authority: str) -> None:
        import h2.config
        import h2.connection

        self.reader, self.writer, self.authority = reader, writer, authority.encode()
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.conn.initiate_connection()
        self.writer.write(self.conn.data_to_send())
        self.calls: dict[int, tuple[CallResult, bytearray, asyncio.Future[None]]] = {}
        self.task = asyncio.ensure_future(self._read())

    async def call(self, path: str, payload: bytes = b"") -> CallResult:
        if self.task.done():
            return CallResult(path)
        stream_id = self.conn.get_next_available_stream_id()
        result, done = CallResult(path), asyncio.get_running_loop().create_future()
        self.calls[stream_id] = (result, bytearray(), done)
        self.conn.send_headers(stream_id, [(b":method", b"POST"), (b":scheme", b"http"), (b":path", path.encode()),
                                           (b":authority", self.authority), (b"content-type", b"application/grpc"),
                                           (b"te", b"trailers"), (b"user-agent", b"propolis-probe")])
        self.conn.send_data(stream_id, frame_message(payload), end_stream=True)
        self.writer.write(self.conn.data_to_send())
        await done
        return result

    async def _read(self) -> None:
        import h2.events
        import h2.exceptions

        try:
            while data := await self.reader.read(65536):
                for event in self.conn.receive_data(data):
                    self._event(event, h2.events)
                self.writer.write(self.conn.data_to_send())
        except (h2.exceptions.ProtocolError, ConnectionError):
            pass
        finally:
            for stream_id in list(self.calls):
                self._done(stream_id)

    def _event(self, event: Any, events: Any) -> None:
        found = self.calls.get(getattr(event, "stream_id", 0))
        if isinstance(event, events.ConnectionTerminated):
            for stream_id in [s for s in self.calls if s > (event.last_stream_id or 0)]:
                self._done(stream_id)
        elif found is None:
            return
        elif isinstance(event, (events.ResponseReceived, events.TrailersReceived)):
            _headers_into(found[0], event.headers)
        elif isinstance(event, events.DataReceived):
            found[1].extend(event.data)
            self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, (events.StreamEnded, events.StreamReset)):
            self._done(event.stream_id)

    def _done(self, stream_id: int) -> None:
        result, body, done = self.calls.pop(stream_id)
        result.reply = bytes(body[5:]) if len(body) >= 5 else b""
        if result.grpc_status is None and result.http_status is not None and result.http_status != 200:
            result.grpc_status = HTTP_TO_GRPC.get(result.http_status, UNKNOWN)
        if not done.done():
            done.set_result(None)

    def close(self) -> None:
        self.task.cancel()
        self.writer.close()


async def unary_calls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, authority: str,
                      calls: list[tuple[str, bytes]]) -> list[CallResult]:
    """Every call at once, each on its own stream of one HTTP/2 connection; the results in order."""
    client = GrpcClient(reader, writer, authority)
    try:
        return list(await asyncio.gather(*(client.call(path, payload) for path, payload in calls)))
    finally:
        client.close()
