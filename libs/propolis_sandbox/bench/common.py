"""What every benchmark shares: percentiles, version stamps, table + JSON output.

Every `propolis bench …` prints the same shape (`report`): a table for people, then one JSON document with
`bench`, `versions` (propolis, kernel, python, …), `machine` (cores, load average at start and at end),
`command` (the exact command line) and `results` (the table's rows), plus what the bench adds.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from propolis import deploy
from propolis.bus.embedded import nats_server_binary

RSS_TARGET_MB = 60  # issue 2: every service's idle RSS
#: fewer samples than this: a p99 would be the maximum in disguise, so `spread` says `max` instead
P99_MIN_SAMPLES = 100
_load_at_start: tuple[float, float, float] | None = None


def begin() -> None:
    """The bench starts now: its load average at start is this one (the CLI calls it before every verb)."""
    global _load_at_start
    _load_at_start = os.getloadavg()


def machine() -> dict[str, Any]:
    """Cores and the 1/5/15-minute load averages when the bench started and now (2 shared cores: say so)."""
    end = os.getloadavg()
    return {"cores": os.cpu_count(), "load_avg_start": list(_load_at_start or end), "load_avg_end": list(end)}


def command_line(bench: str) -> str:
    """The command as typed (`propolis bench …`), or the bench's own name when called as a library."""
    argv = sys.argv[1:]
    return "propolis " + " ".join(argv) if argv[:1] == ["bench"] else f"propolis bench {bench}"


def spread(samples: Sequence[float]) -> dict[str, Any]:
    """{n, p50, p99} — or {n, p50, max} when there are too few samples for a p99 to mean anything."""
    tail = "p99" if len(samples) >= P99_MIN_SAMPLES else "max"
    return {"n": len(samples), "p50": percentile(samples, 50),
            tail: percentile(samples, 99) if tail == "p99" else (max(samples) if samples else float("nan"))}


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
    for pkg in ("propolis", "nats-py", "msgpack", "pyroute2", "aiohttp", "kubernetes_asyncio"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    try:
        out["nats-server"] = subprocess.run([nats_server_binary(), "--version"], capture_output=True,
                                            text=True, timeout=5).stdout.strip()
    except Exception:  # noqa: BLE001 - a version we cannot read is left out
        pass
    try:
        out["bcc"] = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "python3-bpfcc"], capture_output=True,
                                    text=True, timeout=5).stdout.strip()
    except Exception:  # noqa: BLE001 - a version we cannot read is left out
        pass
    return out


def print_table(rows: list[dict[str, Any]], columns: Sequence[str]) -> None:
    """Rows as aligned columns (a bench with a second table prints it with this before `report`)."""
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def report(name: str, rows: list[dict[str, Any]], columns: Sequence[str] | None = None,
           extra: dict[str, Any] | None = None) -> None:
    """Print a table for people, then one JSON document for machines (the shape every bench prints).
    `columns`: the table's (default: every key of the rows, in first-seen order)."""
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r if not isinstance(r[k], (dict, list))))
    print_table(rows, columns)
    doc = {"bench": name, "versions": versions(), "machine": machine(), "command": command_line(name),
           "results": rows, **(extra or {})}
    print(json.dumps(doc, default=str))
    sys.stdout.flush()


def report_figures(name: str, figures: Any) -> None:
    """`report` for a bench that returns its figures: a list of rows, a dict with `rows`/`results`, or a dict
    of figures (its scalar ones become the table's rows, everything stays in the JSON document)."""
    if isinstance(figures, list) and all(isinstance(r, dict) for r in figures):
        report(name, figures)
    elif isinstance(figures, dict) and isinstance(figures.get("rows", figures.get("results")), list):
        rows: list[dict[str, Any]] = figures.get("rows", figures.get("results")) or []
        report(name, rows, extra={k: v for k, v in figures.items() if k not in ("rows", "results")})
    elif isinstance(figures, dict):
        rows = [{"figure": k, "value": v} for k, v in _scalars(figures)]
        report(name, rows, ["figure", "value"], extra={"figures": figures})
    else:
        report(name, [{"figure": name, "value": figures}], ["figure", "value"])


def _scalars(doc: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in doc.items():
        if isinstance(v, dict):
            out.extend(_scalars(v, f"{prefix}{k}."))
        elif not isinstance(v, list):
            out.append((prefix + k, v))
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.3f}" if v < 100 else f"{v:,.0f}"
    return "" if v is None else str(v)
