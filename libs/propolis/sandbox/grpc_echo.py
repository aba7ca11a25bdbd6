"""The sandbox's gRPC: what pods serve on ports named `grpc*`, and the client `sandbox probe --grpc` uses.

Server (`serve`, a real grpcio server, started by `sandbox.echo --grpc PORT` in the pod):
  * `/grpc.health.v1.Health/Check` answers SERVING, as every gRPC health checker expects;
  * every method of `propolis.sandbox.v1.Echo` (e.g. `/propolis.sandbox.v1.Echo/Say`) answers the
    raw request bytes prefixed with the pod's `NS/NAME ` (which pod answered, as the TCP echo does);
  * anything else is UNIMPLEMENTED.
Messages are raw bytes (no generated code): a HealthCheckResponse{status: SERVING} is `08 01`.

Client (`unary_calls`): unary calls multiplexed on one HTTP/2 connection over a socket the caller
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
ECHO_SERVICE = "propolis.sandbox.v1.Echo"
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


async def unary_calls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, authority: str,
                      calls: list[tuple[str, bytes]]) -> list[CallResult]:
    """Send every call at once, each on its own stream of one HTTP/2 connection; the results in order.
    Streams the connection ends (or breaks the protocol) before they end keep what they got."""
    import h2.config
    import h2.connection
    import h2.events
    import h2.exceptions

    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    results: dict[int, CallResult] = {}
    replies: dict[int, bytearray] = {}
    for path, payload in calls:
        stream_id = conn.get_next_available_stream_id()
        results[stream_id] = CallResult(path)
        replies[stream_id] = bytearray()
        conn.send_headers(stream_id, [(b":method", b"POST"), (b":scheme", b"http"), (b":path", path.encode()),
                                      (b":authority", authority.encode()), (b"content-type", b"application/grpc"),
                                      (b"te", b"trailers"), (b"user-agent", b"propolis-probe")])
        conn.send_data(stream_id, frame_message(payload), end_stream=True)
    writer.write(conn.data_to_send())
    open_streams = set(results)
    while open_streams:
        data = await reader.read(65536)
        if not data:
            break
        try:
            events = conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            break
        for event in events:
            stream_id = getattr(event, "stream_id", 0)
            if isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                _headers_into(results[stream_id], event.headers)
            elif isinstance(event, h2.events.DataReceived):
                replies[stream_id] += event.data
                conn.acknowledge_received_data(event.flow_controlled_length, stream_id)
            elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                open_streams.discard(stream_id)
            elif isinstance(event, h2.events.ConnectionTerminated):
                open_streams.clear()
        writer.write(conn.data_to_send())
    for stream_id, result in results.items():
        body = bytes(replies[stream_id])
        result.reply = body[5:] if len(body) >= 5 else b""
        if result.grpc_status is None and result.http_status is not None and result.http_status != 200:
            result.grpc_status = HTTP_TO_GRPC.get(result.http_status, UNKNOWN)
    return list(results.values())
