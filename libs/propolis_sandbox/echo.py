"""The pod's workload: a tiny server answering on every declared containerPort, TCP and UDP.

Started by the kubelet inside the pod namespace (`python -m propolis_sandbox.echo
--pod NS/NAME --tcp 80 --udp 53`), it makes reachability observable with real
packets: every answer starts with the pod's `NS/NAME`, so a probe through a
Service knows which backend answered.

  * TCP: a line is answered with `NS/NAME <line>`; an HTTP request
    (`GET / HTTP/1.1`…) gets `200 OK` with body `NS/NAME\\n` (for L7 tests);
  * UDP: each datagram is answered with `NS/NAME <datagram>`;
  * gRPC (`--grpc PORT`, the kubelet's choice for ports named `grpc*`): a real grpcio server,
    see `grpc_echo`.

Prints `ready` on stdout once every port is bound, then only logs to stderr.
Imports stay minimal: one of these starts per pod.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import sys
from typing import cast

HTTP_METHODS = (b"GET ", b"HEAD ", b"POST ", b"PUT ", b"DELETE ", b"PATCH ", b"OPTIONS ")


def http_response(pod: bytes, request: bytes) -> bytes:
    line = request.split(b"\r\n", 1)[0]
    body = pod + b"\n"
    headers = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Pod: " + pod +
               b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n")
    return headers + (b"" if line.startswith(b"HEAD ") else body)


class EchoServer:
    """One listener per (port, protocol); answers tagged with the pod name."""

    def __init__(self, pod: str, tcp_ports: list[int], udp_ports: list[int], addresses: list[str] | None = None) -> None:
        self.pod = pod.encode()
        self.addresses = addresses or ["0.0.0.0"]
        self.tcp_ports = tcp_ports
        self.udp_ports = udp_ports
        self.servers: list[asyncio.AbstractServer] = []
        self.transports: list[asyncio.BaseTransport] = []

    async def handle_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            first = await reader.readline()
            if not first:
                return
            if first.startswith(HTTP_METHODS):
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass  # headers
                writer.write(http_response(self.pod, first))
                await writer.drain()
                return
            line = first
            while line:
                writer.write(self.pod + b" " + line)
                await writer.drain()
                line = await reader.readline()
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writer.close()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for address, port in ((a, p) for a in self.addresses for p in self.tcp_ports):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((address, port))
            self.servers.append(await asyncio.start_server(self.handle_tcp, sock=sock, backlog=512))
        pod = self.pod

        class Udp(asyncio.DatagramProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                # a datagram endpoint's (asyncio's selector transport implements, not subclasses, DatagramTransport)
                self.transport = cast(asyncio.DatagramTransport, transport)

            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                self.transport.sendto(pod + b" " + data, addr)

        for address, port in ((a, p) for a in self.addresses for p in self.udp_ports):
            transport, _ = await loop.create_datagram_endpoint(Udp, local_addr=(address, port))
            self.transports.append(transport)

    def close(self) -> None:
        for server in self.servers:
            server.close()
        for transport in self.transports:
            transport.close()


async def serve(args: argparse.Namespace) -> None:
    server = EchoServer(args.pod, args.tcp, args.udp, args.address)
    await server.start()
    grpc_server = None
    if args.grpc:
        from propolis_sandbox import grpc_echo
        grpc_server = await grpc_echo.serve(args.pod, args.grpc, args.address or ["0.0.0.0"])
    print("ready", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()
    if grpc_server is not None:
        await grpc_server.stop(None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pod", required=True, help="NS/NAME put at the start of every answer")
    parser.add_argument("--tcp", type=int, action="append", default=[], help="TCP port (repeatable)")
    parser.add_argument("--udp", type=int, action="append", default=[], help="UDP port (repeatable)")
    parser.add_argument("--grpc", type=int, action="append", default=[], help="gRPC port (repeatable)")
    parser.add_argument("--address", action="append", default=[],
                        help="bind to this address only (repeatable; default all): a host with several addresses "
                             "answers UDP from the address asked, as the world's hosts must")
    args = parser.parse_args(argv)
    try:
        asyncio.run(serve(args))
    except OSError as exc:
        print(f"echo: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
