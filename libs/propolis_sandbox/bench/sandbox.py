"""Measurements for `propolis bench sandbox`: time to `up` a 2-node/20-pod sandbox, probe rate.

A benchmark, not a test: it reports figures (targets: up + 20 pods < 15 s,
> 200 probes/s for connected pairs) and never asserts on them. Run
`python -m propolis_sandbox.bench.sandbox` (or `propolis bench sandbox` once wired).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import yaml

from propolis_sandbox import cluster, probe


def pod_manifests(count: int, namespace: str = "bench") -> list[dict[str, Any]]:
    return [{"apiVersion": "v1", "kind": "Pod",
             "metadata": {"name": f"p{i}", "namespace": namespace, "labels": {"app": "bench"}},
             "spec": {"containers": [{"name": "echo", "image": "propolis/echo",
                                      "ports": [{"containerPort": 80, "name": "http"},
                                                {"containerPort": 53, "protocol": "UDP", "name": "dns"}]}]}}
            for i in range(count)]


async def bench_sandbox(*, nodes: int = 2, pods: int = 20, rounds: int = 3) -> dict[str, Any]:
    """Returns {up_s, pods_ready_s, up_with_pods_s, probes, probe_s, probes_per_s, down_s}."""
    name = "bench" + uuid.uuid4().hex[:6]
    figures: dict[str, Any] = {"nodes": nodes, "pods": pods}
    started = time.monotonic()
    try:
        state = await asyncio.to_thread(cluster.up, name, nodes=nodes, services="none")
        figures["up_s"] = round(time.monotonic() - started, 3)
        with tempfile.TemporaryDirectory() as tmp:
            manifest = Path(tmp) / "pods.yaml"
            manifest.write_text(yaml.safe_dump_all(pod_manifests(pods)))
            applied = time.monotonic()
            await cluster.apply(state, [str(manifest)])
            await cluster.wait_running(state, pods, timeout=60)
        figures["pods_ready_s"] = round(time.monotonic() - applied, 3)
        figures["up_with_pods_s"] = round(time.monotonic() - started, 3)
        cfg = state.sandbox()
        async with cluster.Api(state.apiserver_url) as api:
            running = await cluster.running_pods(api, state)
        specs = [probe.ProbeSpec(cfg.pod_netns("bench", s["metadata"]["name"]), d["status"]["podIP"], port, proto)
                 for s in running for d in running for port, proto in ((80, "TCP"), (53, "UDP"))]
        best = 0.0
        connected = 0
        for _ in range(rounds):
            t0 = time.monotonic()
            results = await probe.probe_all(specs, timeout=1.0)
            elapsed = time.monotonic() - t0
            connected = sum(r.connected for r in results)
            best = max(best, connected / elapsed if elapsed else 0.0)
        figures.update(probes=len(specs), connected=connected, probes_per_s=round(best, 1))
    finally:
        t0 = time.monotonic()
        await asyncio.to_thread(cluster.down, name)
        figures["down_s"] = round(time.monotonic() - t0, 3)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--pods", type=int, default=20)
    args = parser.parse_args(argv)
    print(json.dumps(asyncio.run(bench_sandbox(nodes=args.nodes, pods=args.pods)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
