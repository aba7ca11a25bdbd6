"""The sandbox API server process killed (SIGKILL) and started again on the same port: the same objects, the
same uids, resourceVersions that continue upward, and clients (kubernetes-asyncio) that keep working — a
watch from before the kill gets 410 Expired and a relist sees everything."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
from kubernetes_asyncio import client, config

from propolis_sandbox.apiserver import DATA_DIR, URL_FILE


def start(run_dir: Path, port: int = 0) -> tuple[subprocess.Popen[bytes], str]:
    (run_dir / URL_FILE).unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "propolis_sandbox.apiserver", "--run-dir", str(run_dir),
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    for _ in range(200):
        if (run_dir / URL_FILE).exists() and (url := (run_dir / URL_FILE).read_text().strip()):
            return proc, url
        if proc.poll() is not None:
            raise AssertionError(f"apiserver exited: {proc.stderr.read().decode()[-500:]}")  # type: ignore[union-attr]
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("apiserver did not start")


async def call(session: aiohttp.ClientSession, method: str, url: str, body: Any = None) -> tuple[int, Any]:
    async with session.request(method, url, json=body) as resp:
        return resp.status, await resp.json(content_type=None)


async def test_killed_apiserver_restarts_on_its_port_with_its_store(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    proc, url = start(run_dir)
    try:
        async with aiohttp.ClientSession() as s:
            await call(s, "POST", f"{url}/api/v1/namespaces", {"metadata": {"name": "team"}})
            for i in range(20):
                status, _ = await call(s, "POST", f"{url}/api/v1/namespaces/team/pods",
                                       {"metadata": {"name": f"p{i}"},
                                        "spec": {"containers": [{"name": "c", "image": "echo"}]}})
                assert status == 201
            status, policy = await call(s, "POST", f"{url}/apis/networking.k8s.io/v1/namespaces/team/networkpolicies",
                                        {"metadata": {"name": "lockdown"}, "spec": {"podSelector": {}}})
            assert status == 201
            await call(s, "DELETE", f"{url}/api/v1/namespaces/team/pods/p0?gracePeriodSeconds=0")
            _, before = await call(s, "GET", f"{url}/api/v1/pods")
        rv_before = int(before["metadata"]["resourceVersion"])

        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        port = int(url.rsplit(":", 1)[1])
        proc, url2 = start(run_dir, port)
        assert url2 == url and (run_dir / DATA_DIR).is_dir()

        configuration = client.Configuration()
        await config.load_kube_config(config_file=str(run_dir / "kubeconfig"), client_configuration=configuration)
        async with client.ApiClient(configuration) as api_client:
            core = client.CoreV1Api(api_client)
            pods = await core.list_namespaced_pod("team")
            assert sorted(p.metadata.name for p in pods.items) == sorted(f"p{i}" for i in range(1, 20))
            assert int(pods.metadata.resource_version) == rv_before  # nothing lost, nothing invented
            assert {p.metadata.uid for p in pods.items} == {p["metadata"]["uid"] for p in before["items"]}
            ns = await core.create_namespace({"metadata": {"name": "after"}})
            assert int(ns.metadata.resource_version) == rv_before + 1  # upward, never back
            netpol = await client.NetworkingV1Api(api_client).read_namespaced_network_policy("lockdown", "team")
            assert netpol.metadata.uid == policy["metadata"]["uid"]

        async with aiohttp.ClientSession() as s:
            # a watch resumed from before the kill: the history is gone, so 410 Expired (the client relists)
            async with s.get(f"{url}/api/v1/pods?watch=1&resourceVersion={rv_before - 5}&timeoutSeconds=2") as resp:
                first = await resp.content.readline()
            event = json.loads(first)
            assert event["type"] == "ERROR" and event["object"]["code"] == 410
    finally:
        proc.kill()
        proc.wait()
