"""The L7 proxy's HTTP/2 path (`l7.http2`) on loopback: a real grpcio server behind it and real gRPC
clients (grpcio and the sandbox's h2 client) in front; the rules come from a real `ProxyPolicy`.

Streams multiplexed on one connection are judged one by one (allowed -> the server's answer,
denied -> 403 = PERMISSION_DENIED, the connection stays up); malformed frames and floods end the
connection with GOAWAY; hypothesis throws frames at it and it never crashes.
"""

from __future__ import annotations

import asyncio
import socket
import struct

import grpc
import h2.config
import h2.connection
import h2.events
import h2.exceptions
import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import GoAwayFrame, PingFrame, SettingsFrame
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from propolis.bus.kv import EventType, KvEvent
from propolis.bus.messages import EndpointRecord, IpcacheEntry, Watermark
from propolis.k8s.kinds import KINDS
from propolis.l7 import http2
from propolis.l7.policy import ProxyPolicy
from propolis.l7.proxy import HTTPProxy
from propolis.model import identity as idm
from propolis.policy.proxy_ports import PROXY_PORTS
from propolis_sandbox import grpc_echo

pytestmark = pytest.mark.root  # the proxy connects onward with IP_TRANSPARENT and SO_MARK

NODE = "n1"
INGRESS = PROXY_PORTS[("http", "ingress")]
CLIENT_IP, SERVER_IP = "127.0.0.1", "127.0.0.2"
ALLOWED = "/grpc.health.v1.Health/Check"
DENIED = "/propolis_sandbox.v1.Echo/Say"


def proxy_policy(server_port: int, paths: tuple[str, ...] = (ALLOWED,)) -> ProxyPolicy:
    """The client may only call `paths` (Health/Check) on the server (gRPC rules as Cilium writes them)."""
    policy = ProxyPolicy(NODE, cluster_name="default")
    inputs = policy.inputs
    labels = {ident: idm.pod_security_labels(pod_labels={"app": app}, namespace="prod", cluster="default").strings()
              for ident, app in ((300, "server"), (301, "client"))}
    inputs.identities = labels
    for pod, ident, ip in (("server", 300, SERVER_IP), ("client", 301, CLIENT_IP)):
        inputs.endpoints[("prod", pod)] = EndpointRecord("prod", pod, NODE, [ip], ident, labels[ident], {})
        policy.ipcache_event(KvEvent(EventType.PUT, f"{NODE}.{ip}", IpcacheEntry(ip, 32, ident, NODE), 1))
    set_rules(policy, server_port, paths)
    for gate in (inputs.k8s_gate, inputs.identities_gate):
        gate.synced, gate.watermark = True, Watermark(1, 0.0, "e")
    return policy


def set_rules(policy: ProxyPolicy, server_port: int, paths: tuple[str, ...]) -> None:
    """The CiliumNetworkPolicy as the k8s bucket would bring it (a new generation each time)."""
    policy.inputs.policies["cnp"] = KINDS["ciliumnetworkpolicies"].to_record({
        "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
        "metadata": {"name": "grpc", "namespace": "prod", "uid": "u1", "resourceVersion": "1"},
        "spec": {"endpointSelector": {"matchLabels": {"app": "server"}},
                 "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "client"}}],
                              "toPorts": [{"ports": [{"port": str(server_port), "protocol": "TCP"}],
                                           "rules": {"http": [{"method": "POST", "path": p} for p in paths]}}]}]}})
    policy.inputs.policy_generation += 1


class Harness:
    """A grpcio server, the proxy judging connections to it, a loopback listener feeding the proxy."""

    def __init__(self, paths: tuple[str, ...] = (ALLOWED,)) -> None:
        self.paths = paths
        self.connections: list[http2.Http2Connection] = []
        self.flows: list[dict] = []
        self.crashes: list[BaseException] = []  # what the proxy's connection handler would log as a failure
        self.server_port = 0
        self.proxy_port = 0

    async def __aenter__(self) -> Harness:
        probe = socket.socket()
        probe.bind((SERVER_IP, 0))
        self.server_port = probe.getsockname()[1]
        probe.close()
        self.grpc_server = await grpc_echo.serve("prod/server", [self.server_port], [SERVER_IP])
        self.proxy = HTTPProxy(proxy_policy(self.server_port, self.paths), node=NODE, on_flow=self.flows.append,
                               make_socket=lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        self.listener = await asyncio.start_server(self._serve, CLIENT_IP, 0)
        self.proxy_port = self.listener.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """What the transparent listener does, with the original destination given."""
        first = await http2.read_preface(reader, 5)
        assert first == http2.PREFACE
        conn = http2.Http2Connection(self.proxy, reader, writer, "ingress", INGRESS,
                                     writer.get_extra_info("peername")[:2], (SERVER_IP, self.server_port))
        self.connections.append(conn)
        try:
            await conn.run(first)
        except (TimeoutError, ConnectionError):
            pass
        except Exception as exc:  # noqa: BLE001 - the tests assert there is none
            self.crashes.append(exc)
        finally:
            conn.close()

    async def __aexit__(self, *exc: object) -> None:
        self.listener.close()
        await self.listener.wait_closed()
        await self.grpc_server.stop(None)

    async def raw(self, data: bytes) -> bytes:
        """Send raw bytes as a client, return all the proxy answered until it closed (a proxy closing
        with bytes unread resets the connection: what arrived before is still read)."""
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        sock.setblocking(False)
        await loop.sock_connect(sock, (CLIENT_IP, self.proxy_port))

        async def send() -> None:
            try:
                await loop.sock_sendall(sock, data)
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the proxy ended the connection first

        sending = asyncio.ensure_future(send())
        received = b""
        try:
            while True:
                try:
                    chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), 10)
                except ConnectionError:
                    break
                if not chunk:
                    break
                received += chunk
            return received
        finally:
            await sending
            sock.close()


def frames(data: bytes) -> list:
    """The frames in what the proxy sent (hyperframe parses them)."""
    from hyperframe.frame import Frame
    out = []
    while len(data) >= 9:
        frame, length = Frame.parse_frame_header(memoryview(data[:9]))
        frame.parse_body(memoryview(data[9:9 + length]))
        out.append(frame)
        data = data[9 + length:]
    return out


def goaway_code(data: bytes) -> int | None:
    found = [f.error_code for f in frames(data) if isinstance(f, GoAwayFrame)]
    return found[-1] if found else None


async def test_multiplexed_calls_are_judged_one_by_one_with_a_real_grpc_client():
    async with Harness() as h:
        async with grpc.aio.insecure_channel(f"{CLIENT_IP}:{h.proxy_port}") as channel:
            check = channel.unary_unary(ALLOWED)
            say = channel.unary_unary(DENIED)
            allowed, denied = await asyncio.gather(check(b""), say(b"hi"), return_exceptions=True)
            assert allowed == grpc_echo.SERVING
            assert isinstance(denied, grpc.aio.AioRpcError) and denied.code() == grpc.StatusCode.PERMISSION_DENIED
            assert await check(b"") == grpc_echo.SERVING  # the same connection still serves
        assert h.proxy.stats.requests_forwarded == 2 and not h.crashes
        assert h.proxy.stats.requests_denied == 1
        by_verdict = {(f["l7"]["type"], f["verdict"], f["l7"]["http"]["url"].rsplit("/", 2)[-1]) for f in h.flows}
        assert ("REQUEST", "DROPPED", "Say") in by_verdict and ("RESPONSE", "FORWARDED", "Check") in by_verdict
        response = next(f for f in h.flows if f["l7"]["type"] == "RESPONSE")
        assert response["l7"]["http"]["protocol"] == "HTTP/2" and response["l7"]["http"]["code"] == 200
        assert response["l7"]["http"]["method"] == "POST"
        assert (response["source"]["identity"], response["destination"]["identity"]) == (300, 301)


async def test_the_sandbox_client_sees_permission_denied_and_the_servers_own_statuses():
    async with Harness() as h:
        reader, writer = await asyncio.open_connection(CLIENT_IP, h.proxy_port)
        try:
            results = await grpc_echo.unary_calls(reader, writer, "server:50051",
                                                  [(ALLOWED, b""), (DENIED, b"x"), (ALLOWED, b"")])
        finally:
            writer.close()
    assert [(r.http_status, r.grpc_status) for r in results] == [
        (200, grpc_echo.OK), (403, grpc_echo.PERMISSION_DENIED), (200, grpc_echo.OK)]
    assert results[0].reply == grpc_echo.SERVING


def raw_frame(kind: int, flags: int, stream_id: int, payload: bytes, length: int | None = None) -> bytes:
    """A frame as bytes, however wrong (hyperframe refuses to build invalid ones)."""
    size = len(payload) if length is None else length
    return struct.pack(">I", size)[1:] + bytes([kind, flags]) + struct.pack(">I", stream_id) + payload


def client_preface(*extra: bytes) -> bytes:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    return conn.data_to_send() + b"".join(extra)


def ping(n: int) -> bytes:
    frame = PingFrame(0)
    frame.opaque_data = struct.pack(">Q", n)
    return frame.serialize()


async def test_a_client_that_stops_reading_holds_the_proxy_to_one_window_and_stalls_the_server():
    """1 MiB echoed back; the client reads its first window and acknowledges nothing: the proxy buffers at
    most one flow-control window for it (not the rest of the response) and the server waits."""
    body = grpc_echo.frame_message(b"x" * (1 << 20))
    async with Harness(paths=(ALLOWED, DENIED)) as h:
        reader, writer = await asyncio.open_connection(CLIENT_IP, h.proxy_port)
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        conn.send_headers(1, [(":method", "POST"), (":scheme", "http"), (":path", DENIED), (":authority", "s"),
                              ("content-type", "application/grpc"), ("te", "trailers")])
        sent = received = 0
        ended = False
        while sent < len(body) or received < 65535:
            window = conn.local_flow_control_window(1) if sent < len(body) else 0
            if window:
                chunk = body[sent:sent + min(window, conn.max_outbound_frame_size)]
                sent += len(chunk)
                conn.send_data(1, chunk, end_stream=sent == len(body))
            else:  # wait for a window update (request) or response data, which is never acknowledged
                for event in conn.receive_data(await asyncio.wait_for(reader.read(65536), 10)):
                    received += len(getattr(event, "data", b"") or b"")
                    ended = ended or isinstance(event, h2.events.StreamEnded)
            writer.write(conn.data_to_send())
        (proxied,) = h.connections

        def buffered() -> int:
            return sum(len(out.data) for out in proxied.down.outbound.values())

        for _ in range(100):  # until the server's next window sits in the proxy
            if buffered() >= 32768:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # an unbounded proxy would take in the rest of the MiB meanwhile
        assert received == 65535 and not ended
        assert 32768 <= buffered() <= 65535
        writer.close()


async def test_a_rule_change_judges_the_next_stream_of_an_established_connection():
    async with Harness() as h:
        reader, writer = await asyncio.open_connection(CLIENT_IP, h.proxy_port)
        client = grpc_echo.GrpcClient(reader, writer, "s")
        try:
            before = [(await client.call(p)).grpc_status for p in (ALLOWED, DENIED)]
            set_rules(h.proxy.policy, h.server_port, (DENIED,))
            after = [(await client.call(p)).grpc_status for p in (ALLOWED, DENIED)]
        finally:
            client.close()
        assert before == [grpc_echo.OK, grpc_echo.PERMISSION_DENIED]
        assert after == [grpc_echo.PERMISSION_DENIED, grpc_echo.OK]
        assert len(h.connections) == 1  # one connection all along


async def test_malformed_frames_and_floods_end_the_connection_with_goaway():
    async with Harness() as h:
        # a frame on stream 0 that must have a stream: PROTOCOL_ERROR
        assert goaway_code(await h.raw(client_preface(raw_frame(1, 4, 0, b"")))) == ErrorCodes.PROTOCOL_ERROR
        # a frame larger than the 16 KiB we allow: FRAME_SIZE_ERROR
        oversized = raw_frame(0, 0, 1, b"\x00" * 100_000)
        assert goaway_code(await h.raw(client_preface(oversized))) == ErrorCodes.FRAME_SIZE_ERROR
        # a PING flood: answered until the allowance, then ENHANCE_YOUR_CALM
        # (judged after each read: at most one read's worth of frames past the allowance is answered)
        sent = 20 * http2.CONTROL_FRAME_ALLOWANCE
        answer = await h.raw(client_preface(b"".join(ping(i) for i in range(sent))))
        assert goaway_code(answer) == ErrorCodes.ENHANCE_YOUR_CALM
        answered = sum(isinstance(f, PingFrame) for f in frames(answer))
        assert http2.CONTROL_FRAME_ALLOWANCE <= answered <= http2.CONTROL_FRAME_ALLOWANCE + http2.READ_SIZE // 17
        # a SETTINGS flood: the same
        settings_flood = SettingsFrame(0).serialize() * sent
        assert goaway_code(await h.raw(client_preface(settings_flood))) == ErrorCodes.ENHANCE_YOUR_CALM
        # a header list over 60 KiB: the connection ends (hpack refuses to decode it)
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        conn.send_headers(1, [(":method", "POST"), (":scheme", "http"), (":path", ALLOWED), (":authority", "s"),
                              ("x-big", "a" * (61 * 1024))], end_stream=True)
        assert goaway_code(await h.raw(conn.data_to_send())) == ErrorCodes.ENHANCE_YOUR_CALM  # an HPACK bomb
        # the proxy still serves the next client
        reader, writer = await asyncio.open_connection(CLIENT_IP, h.proxy_port)
        try:
            (result,) = await grpc_echo.unary_calls(reader, writer, "s", [(ALLOWED, b"")])
        finally:
            writer.close()
        assert result.grpc_status == grpc_echo.OK


async def test_streams_reset_as_fast_as_opened_end_the_connection():
    """HTTP/2 rapid reset (CVE-2023-44487): open a stream the rules allow, reset it, again and again."""
    async with Harness() as h:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        for _ in range(http2.PREMATURE_RESET_ALLOWANCE + 20):
            stream_id = conn.get_next_available_stream_id()
            conn.send_headers(stream_id, [(":method", "POST"), (":scheme", "http"), (":path", ALLOWED),
                                          (":authority", "s"), ("content-type", "application/grpc")])
            conn.reset_stream(stream_id, ErrorCodes.CANCEL)
        answer = await h.raw(conn.data_to_send())
        assert goaway_code(answer) == ErrorCodes.ENHANCE_YOUR_CALM
        assert h.proxy.stats.errors.get("h2_flood") == 1


async def test_more_concurrent_streams_than_allowed_end_the_connection():
    async with Harness() as h:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        conn.remote_settings.max_concurrent_streams = 1000  # a client ignoring the proxy's SETTINGS
        for _ in range(http2.MAX_CONCURRENT_STREAMS + 1):
            conn.send_headers(conn.get_next_available_stream_id(),
                              [(":method", "POST"), (":scheme", "http"), (":path", DENIED), (":authority", "s")])
        assert goaway_code(await h.raw(conn.data_to_send())) == ErrorCodes.PROTOCOL_ERROR
        assert not h.crashes


FRAME_TYPES = st.sampled_from(range(0, 12))
EXPECTED_ERRORS = {"h2_protocol_error", "h2_flood"}  # anything else is an exception counted by its name


@st.composite
def raw_frames(draw: st.DrawFn) -> bytes:
    """Frames with any type, flags, stream id and payload (lengths sometimes lying)."""
    out = b""
    for _ in range(draw(st.integers(1, 6))):
        payload = draw(st.binary(max_size=64))
        out += raw_frame(draw(FRAME_TYPES), draw(st.integers(0, 255)), draw(st.sampled_from([0, 1, 3, 2, 2**31 - 1])),
                         payload, draw(st.one_of(st.none(), st.integers(0, 70))))
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw_frames())
def test_fuzzed_frames_never_crash_the_proxy(data):
    async def run() -> None:
        async with Harness() as h:
            await h.raw(client_preface(data))
            assert not h.crashes, h.crashes
            assert set(h.proxy.stats.errors) <= EXPECTED_ERRORS, h.proxy.stats.errors
            reader, writer = await asyncio.open_connection(CLIENT_IP, h.proxy_port)
            try:
                (result,) = await grpc_echo.unary_calls(reader, writer, "s", [(ALLOWED, b"")])
            finally:
                writer.close()
            assert result.grpc_status == grpc_echo.OK
    asyncio.run(run())


@st.composite
def client_sessions(draw: st.DrawFn) -> bytes:
    """A client that mostly speaks HTTP/2 (allowed and denied calls, bodies, resets, window updates,
    pings) with random frames mixed in: the relay's states, not only the frame parser."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    out = conn.data_to_send()
    opened: list[int] = []
    for _ in range(draw(st.integers(1, 12))):
        action = draw(st.sampled_from(["call", "data", "end", "reset", "window", "ping", "raw"]))
        try:
            if action == "call":
                stream_id = conn.get_next_available_stream_id()
                conn.send_headers(stream_id, [(":method", "POST"), (":scheme", "http"),
                                              (":path", draw(st.sampled_from([ALLOWED, DENIED, "/x"]))),
                                              (":authority", "s"), ("content-type", "application/grpc")])
                opened.append(stream_id)
            elif action == "ping":
                conn.ping(b"12345678")
            elif action == "raw":
                out += conn.data_to_send() + draw(raw_frames())
                continue
            elif opened:
                stream_id = draw(st.sampled_from(opened))
                if action == "data":
                    conn.send_data(stream_id, grpc_echo.frame_message(draw(st.binary(max_size=40))))
                elif action == "end":
                    conn.end_stream(stream_id)
                elif action == "reset":
                    conn.reset_stream(stream_id, ErrorCodes.CANCEL)
                else:
                    conn.increment_flow_control_window(draw(st.integers(1, 2**20)), stream_id)
        except (h2.exceptions.ProtocolError, KeyError, ValueError):
            pass  # the client's own h2 refused (a closed stream, a window too large): not sent
        out += conn.data_to_send()
    return out


@settings(max_examples=100, deadline=None)
@given(client_sessions())
def test_fuzzed_client_sessions_never_crash_the_proxy(data):
    async def run() -> None:
        async with Harness() as h:
            await h.raw(data)
            assert not h.crashes, h.crashes
            assert set(h.proxy.stats.errors) <= EXPECTED_ERRORS, h.proxy.stats.errors
            reader, writer = await asyncio.open_connection(CLIENT_IP, h.proxy_port)
            try:
                (result,) = await grpc_echo.unary_calls(reader, writer, "s", [(ALLOWED, b"")])
            finally:
                writer.close()
            assert result.grpc_status == grpc_echo.OK
    asyncio.run(run())
