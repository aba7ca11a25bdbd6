"""The echo program of the test's echo pods on a real cluster (`python3 -c <this file> TCP_PORT UDP_PORT`).

Why: the probes judge a connection by who answered, so the echo pod names itself (`NS/NAME` from the
POD_NAMESPACE/POD_NAME environment the downward API sets) exactly as the sandbox's echo workload does:
a TCP line is answered `NS/NAME <line>`, an HTTP request `200 OK` with body `NS/NAME`, a UDP datagram
`NS/NAME <datagram>`. Stdlib only: any image with python3 runs it.
"""

from __future__ import annotations

import asyncio
import os
import sys

HTTP_METHODS = (b"GET ", b"HEAD ", b"POST ", b"PUT ", b"DELETE ", b"PATCH ", b"OPTIONS ")


def pod_name() -> bytes:
    return f"{os.environ.get('POD_NAMESPACE', 'default')}/{os.environ.get('POD_NAME', 'echo')}".encode()


async def handle_tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    pod = pod_name()
    try:
        first = await reader.readline()
        if first.startswith(HTTP_METHODS):
            while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                pass
            body = pod + b"\n"
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: " + str(len(body)).encode()
                         + b"\r\nConnection: close\r\n\r\n" + body)
        elif first:
            writer.write(pod + b" " + first)
        await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


class UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.DatagramTransport = transport  # type: ignore[assignment]  # a datagram endpoint's

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(pod_name() + b" " + data, addr)


async def serve(tcp_port: int, udp_port: int) -> None:
    server = await asyncio.start_server(handle_tcp, "0.0.0.0", tcp_port)
    await asyncio.get_running_loop().create_datagram_endpoint(UdpEcho, local_addr=("0.0.0.0", udp_port))
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1]), int(sys.argv[2])))
