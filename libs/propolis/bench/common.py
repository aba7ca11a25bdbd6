"""What every benchmark shares: percentiles, version stamps, table + JSON output."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from importlib import metadata
from typing import Any, Sequence

from propolis.bus.embedded import nats_server_binary


def percentile(samples: Sequence[float], p: float) -> float:
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def versions() -> dict[str, str]:
    out = {"kernel": platform.release(), "python": platform.python_version()}
    for pkg in ("nats-py", "msgpack", "pyroute2", "aiohttp"):
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
