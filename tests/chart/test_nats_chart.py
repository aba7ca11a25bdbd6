"""The chart's NATS: users from the permission table, a configuration nats-server accepts, clustering
and bucket replicas from nats.replicas, and the rendered server run for real with the services' users."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats.errors
import pytest
from chart_render import render, tool

from propolis import suite
from propolis.bus import permissions, subjects
from propolis.bus.connection import Bus

PROPOLIS = str(Path(sys.executable).parent / "propolis")


def nats_objects(*sets: str) -> tuple[str, dict[str, str], list[dict[str, Any]]]:
    docs = render(*sets)
    conf = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "propolis-nats")
    secret = next(d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == "propolis-nats-auth")
    return conf["data"]["nats.conf"], secret["stringData"], docs


def test_nats_users_secret_is_the_permission_table() -> None:
    _, data, _ = nats_objects()
    rendered = json.loads(data["auth.conf"].removeprefix("authorization "))
    admin = permissions.Credentials("admin", data["password-admin"])
    users = {s.name: permissions.Credentials(s.name, data[f"password-{s.name}"]) for s in suite.SUITE_SERVICES}
    expected = json.loads(permissions.server_config(users, admin=admin).removeprefix("authorization "))
    assert rendered == expected


def test_servers_cluster_and_buckets_replicate_as_nats_replicas_says() -> None:
    for replicas in (1, 3):
        conf, _, docs = nats_objects(f"nats.replicas={replicas}")
        sts = next(d for d in docs if d["kind"] == "StatefulSet")
        assert sts["spec"]["replicas"] == replicas
        assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
        assert "data" not in {v["name"] for v in sts["spec"]["template"]["spec"]["volumes"]}
        assert ("cluster {" in conf) == (replicas > 1)
        assert conf.count("nats-route://") == (replicas if replicas > 1 else 0)
        job = next(d for d in docs if d["kind"] == "Job")
        command = job["spec"]["template"]["spec"]["containers"][0]["command"]
        assert command[:3] == ["propolis", "bus", "bootstrap"] and command[command.index("--replicas") + 1] == str(replicas)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_server(tmp: Path, conf: str, secret: dict[str, str], *, client: int = 4222, monitor: int = 8222) -> Path:
    """The rendered nats.conf and auth.conf as the pod mounts them, under tmp (ports and paths moved)."""
    (tmp / "auth").mkdir(parents=True)
    (tmp / "auth" / "auth.conf").write_text(secret["auth.conf"])
    text = (conf.replace("port: 4222", f"port: {client}").replace("http_port: 8222", f"http_port: {monitor}")
            .replace("/data/jetstream", str(tmp / "js")).replace("/var/run/nats", str(tmp)))
    (tmp / "nats.conf").write_text(text)
    return tmp / "nats.conf"


def test_nats_server_accepts_the_rendered_clustered_configuration(tmp_path: Path) -> None:
    conf, secret, _ = nats_objects("nats.replicas=3")
    path = write_server(tmp_path, conf, secret)
    proc = subprocess.run([tool("nats-server"), "-t", "-c", str(path)], capture_output=True, text=True, timeout=30,
                          env={"POD_NAME": "propolis-nats-0"})
    assert proc.returncode == 0, proc.stderr + proc.stdout


@pytest.fixture
def rendered_server(tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """The chart's NATS server (replicas 1) running on a loopback port."""
    conf, secret, _ = nats_objects("nats.replicas=1")
    client = free_port()
    path = write_server(tmp_path, conf, secret, client=client, monitor=free_port())
    log = open(tmp_path / "nats.log", "w")
    proc = subprocess.Popen([tool("nats-server"), "-c", str(path)], env={"POD_NAME": "propolis-nats-0"},
                            stdout=subprocess.DEVNULL, stderr=log)
    try:
        yield f"nats://127.0.0.1:{client}", secret
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


async def test_the_rendered_server_enforces_each_services_slice(rendered_server) -> None:
    url, secret = rendered_server
    env = {"PROPOLIS_NATS_USER": "admin", "PROPOLIS_NATS_PASSWORD": secret["password-admin"], "PATH": "/usr/bin:/bin"}
    proc = await asyncio.create_subprocess_exec(PROPOLIS, "--nats-url", url, "bus", "bootstrap", "--wait", "10",
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                                                env=env)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()  # what the bootstrap Job runs, as the Secret's admin

    bus = Bus(url, name="k8s-watcher-test", user="k8s-watcher", password=secret["password-k8s-watcher"])
    await bus.connect(max_wait=5)
    try:
        ack = await bus.js.publish(f"$KV.{subjects.K8S_BUCKET}.probe", b"x", timeout=5)  # its own slice
        assert ack.stream == f"KV_{subjects.K8S_BUCKET}"
        kv = await bus.kv(subjects.IDENTITIES_BUCKET)  # reading is open to every service
        assert await kv.get("anything") is None
        with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
            await bus.js.publish(f"$KV.{subjects.IDENTITIES_BUCKET}.probe", b"x", timeout=1)  # not its slice
        with pytest.raises(Exception):  # noqa: B017 - a permissions violation: whichever error nats-py raises
            await bus.js.add_stream(name="ROGUE", subjects=["rogue.>"], timeout=1)  # streams are the admin's
    finally:
        await bus.close()


def test_without_persistent_storage_the_store_is_an_empty_dir() -> None:
    _, _, docs = nats_objects("nats.storage.persistent=false")
    sts = next(d for d in docs if d["kind"] == "StatefulSet")
    assert "volumeClaimTemplates" not in sts["spec"]
    assert {"name": "data", "emptyDir": {}} in sts["spec"]["template"]["spec"]["volumes"]
