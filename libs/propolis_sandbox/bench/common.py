"""What every benchmark shares: percentiles, version stamps, table + JSON output."""

from __future__ import annotations

import asyncio
import json
import platform
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

from propolis import deploy
from propolis.bus.embedded import nats_server_binary

RSS_TARGET_MB = 60  # issue 2: every service's idle RSS


def percentile(samples: Sequence[float], p: float) -> float:
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def rss_mb(pid: int) -> float:
    """Resident set size of a process, in MB (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def idle_rss(env: dict[str, str], settle: float) -> list[dict[str, Any]]:
    """Start every cluster-scoped service as its own process with ``env``, let it settle, read its RSS."""
    with tempfile.TemporaryDirectory(prefix="propolis-bench-") as tmp:
        procs = [deploy.start_service(s, node="bench-node", env=env, log_dir=Path(tmp)) for s in deploy.without_node()]
        try:
            await asyncio.sleep(settle)
            return [{"service": p.spec.name, "idle_rss_mb": rss_mb(p.proc.pid) if p.alive() else float("nan"),
                     "target_mb": RSS_TARGET_MB} for p in procs]
        finally:
            deploy.stop_services(procs)


def versions() -> dict[str, str]:
    out = {"kernel": platform.release(), "python": platform.python_version()}
    for pkg in ("nats-py", "msgpack", "pyroute2", "aiohttp", "kubernetes_asyncio"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    try:
        out["nats-server"] = subprocess.run([nats_server_binary(), "--version"], capture_output=True,
                                            text=True, timeout=5).stdout.strip()
    except Exception:
        pass
    try:
        out["bcc"] = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "python3-bpfcc"], capture_output=True,
                                    text=True, timeout=5).stdout.strip()
    except Exception:
        pass
    return out


def report(name: str, rows: list[dict[str, Any]], columns: Sequence[str], extra: dict[str, Any] | None = None) -> None:
    """Print a table for people, then one JSON document for machines."""
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))
    doc = {"bench": name, "versions": versions(), "results": rows, **(extra or {})}
    print(json.dumps(doc))
    sys.stdout.flush()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.3f}" if v < 100 else f"{v:,.0f}"
    return "" if v is None else str(v)
