"""The supervisor's service list: per-node services get their environment, the CNI config names the
datapath socket of a service that serves it, and pods are wired only once it answers (fail closed).

The per-node service here is a small socket answerer standing in for the datapath-writer, so this test
checks the sandbox's plumbing (env, placeholders, state.json, kubelet waiting, announcements) on its own.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

from propolis import suite
from propolis_sandbox import cluster, daemon
from propolis_sandbox.config import SandboxState, allocate, allocation_lock
from propolis_sandbox.fixture import leftovers, unique_name

pytestmark = pytest.mark.root

ANSWERER = textwrap.dedent('''
    import asyncio, os, sys
    path = os.environ["PROPOLIS_DATAPATH_SOCKET"]
    log = open(sys.argv[1], "a")
    async def serve(reader, writer):
        line = await reader.readline()
        log.write(os.environ["PROPOLIS_NODE_NAME"] + " " + os.environ["PROPOLIS_NODE_NETNS"] + " " + line.decode())
        log.flush()
        writer.write(b'{"ok": true}\\n')
        await writer.drain()
        writer.close()
    async def main():
        await asyncio.sleep(1.0)  # the kubelet must wait for the socket
        os.makedirs(os.path.dirname(path), exist_ok=True)
        await asyncio.start_unix_server(serve, path=path)
        await asyncio.Event().wait()
    asyncio.run(main())
''')


async def test_node_service_serves_datapath_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = tmp_path / "answerer.py"
    script.write_text(ANSWERER)
    entry = suite.SuiteService("test-datapath", "node", (sys.executable, str(script), str(tmp_path / "log-{node}")),
                                    serves_datapath_socket=True, reports_progress=False)
    monkeypatch.setattr(suite, "SUITE_SERVICES", [entry])
    name = unique_name()
    with allocation_lock():
        cfg = allocate(name, 1, None, None)
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        SandboxState(config=cluster._config_dict(cfg)).save(cfg.state_path)
    supervisor = daemon.Supervisor(name, "all")
    try:
        await supervisor.start()
        state = cluster.load_state_or_fail(name)
        assert [(s["name"], s["node"]) for s in state.services] == [("test-datapath", f"{name}-worker")]
        conf = json.loads((cfg.cni_conf_dir / f"10-propolis-{name}-worker.conf").read_text())
        assert conf["datapathSocket"] == str(cfg.datapath_socket(f"{name}-worker"))
        manifest = tmp_path / "pod.yaml"
        manifest.write_text("apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: dp}\n"
                            "spec:\n  containers: [{name: c, image: x, ports: [{containerPort: 80}]}]\n")
        await cluster.apply(state, [str(manifest)])
        await cluster.wait(state, timeout=30)
        await cluster.delete(state, [str(manifest)])
        await cluster.wait(state, timeout=30)
    finally:
        await supervisor.stop()
        cluster.down(name)
    assert not any(leftovers(name).values()), leftovers(name)
    lines = (tmp_path / f"log-{name}-worker").read_text().splitlines()
    node, netns = lines[0].split(" ", 2)[:2]
    assert (node, netns) == (f"{name}-worker", f"pp-{name}-1")
    ops = [json.loads(line.split(" ", 2)[2]) for line in lines]
    ops = [o for o in ops if o["podNamespace"] == "dp"]  # the sandbox's kube-dns pod lands on this node too
    assert [o["op"] for o in ops] == ["EndpointAdd", "EndpointDelete"]
    assert ops[0]["podNamespace"] == "dp" and ops[0]["podName"] == "p" and ops[0]["ipv4"].startswith(
        cfg.pod_cidr(1).rsplit(".", 1)[0])
