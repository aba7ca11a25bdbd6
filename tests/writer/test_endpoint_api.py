"""The CNI plugin's announce() talking to the writer's endpoint socket (both real, unix socket)."""

from __future__ import annotations

import asyncio
import socket

import pytest

from propolis.cni.plugin import announce
from propolis.writer.endpoint_api import EndpointApiServer

ADD = {"op": "EndpointAdd", "containerID": "c1", "podNamespace": "default", "podName": "web",
       "netns": "/run/netns/x", "ifname": "eth0", "hostIfname": "lxc0123456789a", "hostIfindex": 7,
       "ipv4": "10.244.1.5", "mac": "aa:bb:cc:dd:ee:ff", "hostMac": "11:22:33:44:55:66", "node": "n1"}


@pytest.fixture
async def server(tmp_path):
    seen = []

    async def handler(req):
        seen.append(req)
        if req.pod == "refuse-me":
            return {"ok": False, "error": "no identity"}
        return {"ok": True, "endpointID": 42}

    srv = EndpointApiServer(tmp_path / "datapath.sock", handler)
    await srv.start()
    yield srv, seen
    await srv.stop()


async def test_add_round_trip(server):
    srv, seen = server
    answer = await asyncio.to_thread(announce, str(srv.path), ADD)
    assert answer == {"ok": True, "endpointID": 42}
    assert seen[0].host_ifindex == 7 and seen[0].ipv4 == "10.244.1.5" and seen[0].namespace == "default"


async def test_refusal_becomes_a_cni_error(server):
    srv, _ = server
    from propolis.cni.plugin import CniError

    with pytest.raises(CniError, match="no identity"):
        await asyncio.to_thread(announce, str(srv.path), {**ADD, "podName": "refuse-me"})


@pytest.mark.parametrize("payload, field", [
    (b"not json\n", "bad request"),
    (b"[1,2]\n", "JSON object"),
    (b'{"op": "Explode"}\n', "op"),
    (b'{"op": "EndpointAdd", "containerID": "c", "podNamespace": "d", "podName": "p", "hostIfname": "l"}\n',
     "hostIfindex"),
])
async def test_bad_requests_get_an_error_and_the_server_stays_up(server, payload, field):
    srv, seen = server

    def raw() -> bytes:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(srv.path))
            s.sendall(payload)
            return s.makefile("rb").readline()

    answer = await asyncio.to_thread(raw)
    assert b'"ok": false' in answer and field.encode() in answer
    assert (await asyncio.to_thread(announce, str(srv.path), ADD))["ok"]  # still serving
