"""The chart's nats-server limits (nats.limits: GOMEMLIMIT, max_pending, JetStream max memory), which keep a
resync storm (watchers × bucket size of server memory) from growing the server into the OOM killer, and the
consumers a stream may have (nats-server's default of 1,000 stops a cluster at 200 nodes): rendered from the
values and in force in the server that runs the rendered configuration."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from chart_render import tool
from test_nats_chart import free_port, nats_objects, write_server


def nats_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    sts = next(d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "propolis-nats")
    return next(c for c in sts["spec"]["template"]["spec"]["containers"] if c["name"] == "nats")


def varz(monitor: int, timeout: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{monitor}/varz", timeout=1) as resp:
                return json.loads(resp.read())  # type: ignore[no-any-return]
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_limits_come_from_the_values_and_the_server_enforces_them(tmp_path: Path) -> None:
    conf, secret, docs = nats_objects("nats.replicas=1", "nats.limits.maxPending=16MB",
                                      "nats.limits.maxMemoryStore=128MB", "nats.limits.goMemLimit=700MiB",
                                      "nats.limits.maxConsumersPerStream=4321")
    env = {e["name"]: e.get("value") for e in nats_container(docs)["env"]}
    assert env["GOMEMLIMIT"] == "700MiB"
    monitor = free_port()
    path = write_server(tmp_path, conf, secret, client=free_port(), monitor=monitor)
    with open(tmp_path / "nats.log", "w") as log:
        proc = subprocess.Popen([tool("nats-server"), "-c", str(path)], stdout=subprocess.DEVNULL, stderr=log,
                                env={"POD_NAME": "propolis-nats-0", "GOMEMLIMIT": env["GOMEMLIMIT"]})
        try:
            info = varz(monitor)
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    assert info["max_pending"] == 16 * 1024 * 1024
    assert info["jetstream"]["config"]["max_memory"] == 128 * 1024 * 1024
    assert info["jetstream"]["limits"]["default_max_consumers"] == 4321


def test_default_limits_are_set() -> None:
    conf, _, docs = nats_objects()
    assert "max_pending: 32MB" in conf and "max_memory_store: 1GB" in conf
    assert "limits { default_max_consumers: 25000 }" in conf
    assert any(e["name"] == "GOMEMLIMIT" and e["value"] == "3GiB" for e in nats_container(docs)["env"])
