"""Operations found along the way in issue 11, against a live sandbox:

* every `status`, `sandbox wait` and `policy get` used a KV watch as a snapshot and left an ordered
  JetStream consumer behind for 5 minutes (a 5 s wait created 93; the heartbeat stream hit its consumer
  cap and `sandbox wait --timeout 10` hung for 40 s): snapshots are direct gets now, so reads leave the
  consumer count of every stream unchanged;
* `sandbox wait --timeout T` (and `status --timeout T`) is a hard limit even when NATS hangs;
* the bus-reading verbs take `--name` like the sandbox verbs.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest

from propolis.bus import subjects
from propolis.errors import CliError
from propolis.status import collect
from propolis.writer.inputs import ClusterInputs
from propolis_sandbox import cluster
from propolis_sandbox.fixture import running_sandbox

pytestmark = pytest.mark.root

CLI = [sys.executable, "-m", "propolis.cli.main"]


@pytest.fixture(scope="module")
def sandbox():
    # the kubelets' heartbeats (published by the supervisor) are what `status` and `wait` read
    with running_sandbox(nodes=1, services="none") as state:
        asyncio.run(cluster.wait(state, timeout=60))
        yield state


async def consumer_counts(bus) -> dict[str, int]:
    return {bucket: (await bus.js.stream_info(f"KV_{bucket}")).state.consumer_count for bucket in subjects.BUCKETS}


async def test_snapshot_reads_leave_no_consumers(sandbox):
    bus = sandbox.admin_bus("ops-test")
    await bus.connect(max_wait=5)
    try:
        before = await consumer_counts(bus)
        for _ in range(50):  # what `propolis status` does
            rep = await collect(bus, probe_kernel=False)
            assert any(s["service"] == "kubelet" for s in rep.services)
        for _ in range(5):  # what `propolis policy get` does
            await ClusterInputs.snapshot(await bus.kv(subjects.K8S_BUCKET), await bus.kv(subjects.IDENTITIES_BUCKET))
        for _ in range(5):
            await cluster.wait(sandbox, timeout=10)
        after = await consumer_counts(bus)
    finally:
        await bus.close()
    assert after == before, f"consumers left behind: before {before}, after {after}"


def test_status_cli_leaves_no_consumers_and_takes_name(sandbox):
    async def counts() -> dict[str, int]:
        bus = sandbox.admin_bus("ops-test")
        await bus.connect(max_wait=5)
        try:
            return await consumer_counts(bus)
        finally:
            await bus.close()

    before = asyncio.run(counts())
    for verb in (["status", "-o", "json"], ["bus", "kv", subjects.HEARTBEATS_BUCKET], ["policy", "get", "-o", "json"]):
        proc = subprocess.run([*CLI, *verb, "--name", sandbox.config["name"]], capture_output=True, text=True,
                              timeout=60)
        assert "kubelet" in proc.stdout or verb[0] == "policy", (verb, proc.stdout[-500:], proc.stderr[-500:])
        assert "Traceback" not in proc.stderr, proc.stderr
    assert asyncio.run(counts()) == before


@pytest.mark.parametrize("verb", [["sandbox", "wait"], ["status"]])
def test_timeout_is_a_hard_limit_while_nats_hangs(sandbox, verb):
    """nats-server frozen (SIGSTOP): the TCP connection is accepted, nothing answers."""
    limit = 3.0
    os.kill(sandbox.nats_pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        proc = subprocess.run([*CLI, *verb, "--name", sandbox.config["name"], "--timeout", str(limit)],
                              capture_output=True, text=True, timeout=60)
        cli = time.monotonic() - started
        in_process = None
        if verb[0] == "sandbox":
            started = time.monotonic()
            with pytest.raises(CliError, match=f"within {limit:.0f}s"):
                asyncio.run(cluster.wait(sandbox, timeout=limit))
            in_process = time.monotonic() - started
    finally:
        os.kill(sandbox.nats_pid, signal.SIGCONT)
    assert proc.returncode != 0 and "within" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert cli < limit + 4.0, (cli, proc.stderr)  # + interpreter start-up and imports
    assert in_process is None or in_process < limit + 1.0, in_process
    print(f"{' '.join(verb)} --timeout {limit:g} with NATS frozen: CLI {cli:.2f}s, in process {in_process}")
