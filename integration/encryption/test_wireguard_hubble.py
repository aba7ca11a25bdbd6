"""Hubble with WireGuard on (`sandbox up --encryption wireguard`): a cross-node pod flow carries
`IP.encrypted: true`, a same-node one does not, and `propolis observe --encrypted / --unencrypted` pick them."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import orjson
import pytest
from test_wireguard_sandbox import NS, pod, write
from wg_helpers import connect_with_retry, pod_ip

from propolis_sandbox import cluster
from propolis_sandbox.fixture import running_sandbox

pytestmark = pytest.mark.root

SERVICES = "k8s-watcher,identity-allocator,datapath-writer,wireguard-keymgr,hubble,hubble-relay"


def observe(state, *args: str) -> list[dict]:
    proc = subprocess.run([sys.executable, "-m", "propolis.cli.main", "observe", "-o", "json", "--last", "2000",
                           *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PROPOLIS_SANDBOX_NAME": state.config["name"]})
    assert proc.returncode == 0, proc.stderr
    return [orjson.loads(line) for line in proc.stdout.splitlines()]


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    with running_sandbox(nodes=2, services=SERVICES, encryption="wireguard") as state:
        n1, n2 = state.sandbox().node_names()
        docs = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}},
                pod("a", n1, "a"), pod("c", n1, "c"), pod("b", n2, "b")]
        asyncio.run(cluster.apply(state, [write(tmp_path_factory.mktemp("wgh"), docs)]))
        asyncio.run(cluster.wait_running(state, 3, namespace=NS))
        asyncio.run(cluster.wait(state, timeout=60))
        yield state


async def test_cross_node_flow_is_encrypted_and_same_node_flow_is_not(sandbox):
    ips = {p: await pod_ip(sandbox, f"{NS}/{p}") for p in ("b", "c")}
    for target in ("b", "c"):
        stream = await connect_with_retry(sandbox, f"{NS}/a", ips[target])
        try:
            assert await stream.echo(b"observe me") == f"{NS}/{target} observe me".encode()
        finally:
            stream.close()

    def to(flows: list[dict], target: str) -> list[dict]:
        return [f for f in flows if f["destination"].get("pod_name") == target and f["verdict"] == "FORWARDED"]

    deadline = time.monotonic() + 20
    while True:  # flows reach the observers' rings within a moment
        encrypted = await asyncio.to_thread(observe, sandbox, "--from-pod", f"{NS}/a", "--encrypted")
        unencrypted = await asyncio.to_thread(observe, sandbox, "--from-pod", f"{NS}/a", "--unencrypted")
        if (to(encrypted, "b") and to(unencrypted, "c")) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    assert to(encrypted, "b"), f"no encrypted flow a -> b: {encrypted[-3:]}"
    assert all(f["IP"]["encrypted"] is True for f in encrypted)
    assert {f["node_name"] for f in to(encrypted, "b")} == set(sandbox.sandbox().node_names())  # both ends saw it
    assert not to(encrypted, "c"), "a same-node flow marked encrypted"
    assert to(unencrypted, "c"), f"no same-node flow a -> c: {unencrypted[-3:]}"
    assert not to(unencrypted, "b"), "a cross-node flow not marked encrypted"
    assert all("encrypted" not in f["IP"] for f in unencrypted)
