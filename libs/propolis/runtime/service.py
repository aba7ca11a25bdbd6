"""The runtime every Propolis service runs in.

``run_service(name, SettingsClass, build)`` parses settings (flags, env),
sets up JSON logs, serves ``/healthz`` ``/readyz`` ``/metrics`` ``/status``,
connects the bus (retrying with back-off: a service may start before NATS),
starts the components in order, publishes a heartbeat every
``heartbeat_interval`` on ``propolis.v1.heartbeat.<service>.<node>`` and in the
heartbeats KV bucket, and on SIGTERM/SIGINT stops components in reverse order
within ``shutdown_timeout``. ``--describe`` prints components, resolved
settings and start order without starting anything.

Supervision: a guarded task (`Runtime.spawn`) that dies fails ``/healthz``,
marks its component Failed, publishes a last heartbeat saying why, and the
process exits 1 — its supervisor (the sandbox, Kubernetes) restarts it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import io
import logging
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

import prometheus_client
from aiohttp import web

import propolis
from propolis.bus import kv, subjects
from propolis.bus.connection import Bus
from propolis.bus.messages import Heartbeat
from propolis.errors import PropolisError, TemporaryError, ValidationError
from propolis.runtime import logs
from propolis.runtime import settings as settings_mod
from propolis.runtime.component import Component, check_wiring
from propolis.runtime.health import Health, State, worst

S = TypeVar("S", bound=settings_mod.CommonSettings)
log = logging.getLogger("propolis.runtime")

#: Fault injection for the supervision tests (integration/faults): with this set to a directory, a guarded
#: task raises once the file ``<service>@<node>:<task>`` appears there. Only the first step is staged:
#: the death, /healthz, exit code and the supervisor's restart that follow are the real ones.
FAULT_DIR_ENV = "PROPOLIS_FAULT_DIR"

#: progress keys others wait on (`propolis sandbox wait`): a change sends a heartbeat at once
PROMPT_PROGRESS_KEYS = frozenset({"k8s_resource_version", "fqdn_generation"})


class Progress(dict[str, Any]):
    """The heartbeat's progress dict; setting a prompt key wakes the heartbeat loop, so waiters
    learn of progress in milliseconds instead of one heartbeat interval per service hop."""

    def __init__(self) -> None:
        super().__init__()
        self.changed = asyncio.Event()

    def __setitem__(self, key: str, value: Any) -> None:
        if key in PROMPT_PROGRESS_KEYS and self.get(key) != value:
            self.changed.set()
        super().__setitem__(key, value)

    def update(self, *args: Any, **kwargs: Any) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value


class Runtime:
    """What a component gets at start: settings, bus, metrics registry, guarded tasks, progress."""

    def __init__(self, service: str, settings: settings_mod.CommonSettings, components: Sequence[Component]) -> None:
        self.service = service
        self.settings = settings
        self.components = list(components)
        self.instance = uuid.uuid4().hex[:8]
        self.started_at = time.time()
        self.bus = Bus(settings.nats_url, name=f"{service}@{settings.node_name}",
                       user=settings.nats_user or None, password=settings.nats_password or None)
        self.registry = prometheus_client.CollectorRegistry()
        self.registry.register(kv.UNDECODABLE)
        self.progress = Progress()
        self.features: dict[str, Any] = {}
        self.ready = False
        self.http_url = ""
        self._tasks: dict[asyncio.Task[Any], tuple[Component | None, bool]] = {}  # -> (component, one_shot)
        self.failed = ""  # why the service is going down (a guarded task died); empty while healthy
        self._stopping = asyncio.Event()
        self._heartbeat_kv: Any = None

    # --- tasks -----------------------------------------------------------------------
    def spawn(self, name: str, coro: Coroutine[Any, Any, Any], component: Component | None = None, *,
              one_shot: bool = False) -> asyncio.Task[Any]:
        """A named, guarded task. Long-running unless ``one_shot`` (work meant to finish, e.g. taking
        over leadership). If it raises, or a long-running one returns, the service has lost a part it
        cannot run without: `fail` ends the process non-zero so its supervisor restarts it."""
        fault_dir = os.environ.get(FAULT_DIR_ENV)
        if fault_dir:
            coro = _fault_injectable(coro, Path(fault_dir) / f"{self.service}@{self.settings.node_name}:{name}")
        task = asyncio.create_task(coro, name=f"{self.service}:{name}")
        self._tasks[task] = (component, one_shot)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        component, one_shot = self._tasks.pop(task, (None, False))
        if task.cancelled() or self._stopping.is_set():
            return
        exc = task.exception()
        if exc is None and one_shot:
            return
        self.fail(f"task {task.get_name()} {'died: ' + repr(exc) if exc else 'exited'}", exc, component)

    def fail(self, reason: str, exc: BaseException | None = None, component: Component | None = None) -> None:
        """A part of the service is dead: report it everywhere (log, /healthz, the last heartbeat) and
        stop with exit code 1. Sticky: no health update can turn a dead task back into OK."""
        if self.failed:
            return
        self.failed = reason
        log.critical("%s; exiting with code 1 so the supervisor restarts %s", reason, self.service,
                     exc_info=exc, extra={"task_failure": reason})
        if component is not None:
            component.failure = reason
        self.request_stop()

    async def cancel_tasks(self) -> None:
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def request_stop(self) -> None:
        self._stopping.set()

    # --- health ----------------------------------------------------------------------
    def bus_health(self) -> Health:
        if not self.bus.is_connected:
            return Health.degraded(f"NATS at {self.settings.nats_url} unreachable")
        poisoned = kv.UNDECODABLE.summary()
        return Health.degraded(poisoned) if poisoned else Health.ok()

    def health(self) -> dict[str, Health]:
        out = {"bus": self.bus_health()}
        out.update({c.name: c.health for c in self.components})
        if self.failed and not any(h.state is State.FAILED for h in out.values()):
            out["runtime"] = Health.failed(self.failed)  # a task no component owns (e.g. the heartbeat)
        return out

    def overall(self) -> State:
        return worst(list(self.health().values()))

    def heartbeat(self) -> Heartbeat:
        return Heartbeat(
            service=self.service, node=self.settings.node_name, instance=self.instance,
            version=propolis.__version__, pid=os.getpid(), started_at=self.started_at,
            sent_at=time.time(), health=self.overall().label,
            components={k: v.as_dict() for k, v in self.health().items()},
            http=self.http_url, progress=dict(self.progress), features=dict(self.features),
            interval=self.settings.heartbeat_interval)

    async def publish_heartbeat(self) -> None:
        hb = self.heartbeat()
        await self.bus.publish(subjects.heartbeat_subject(self.service, self.settings.node_name), hb)
        if self._heartbeat_kv is None:
            try:
                self._heartbeat_kv = await self.bus.kv(subjects.HEARTBEATS_BUCKET)
            except TemporaryError:
                return  # bucket not bootstrapped yet: the subject still carries it
        await self._heartbeat_kv.put(
            subjects.heartbeat_key(self.service, self.settings.node_name, self.instance), hb)

    async def _heartbeat_loop(self) -> None:
        while True:
            try:
                if self.bus.is_connected:
                    await self.publish_heartbeat()
            except Exception as exc:  # noqa: BLE001 - a missed beat is not fatal; the next one retries
                log.debug("heartbeat failed: %s", exc)
            self.progress.changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.progress.changed.wait(), self.settings.heartbeat_interval)
            await asyncio.sleep(0.02)  # coalesce a burst of progress into one beat

    # --- HTTP ------------------------------------------------------------------------
    async def _start_http(self) -> web.AppRunner | None:
        if self.settings.http_port < 0:
            return None
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/status", self._status)
        app.router.add_get("/debug/tasks", self._debug_tasks)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.settings.http_host, self.settings.http_port)
        await site.start()
        port = runner.addresses[0][1]
        self.http_url = f"http://{self.settings.http_host}:{port}"
        return runner

    async def _healthz(self, _: web.Request) -> web.Response:
        """Liveness: fails once a guarded task died (the process is exiting; a kubelet would restart it)."""
        if self.failed:
            return web.json_response({"status": "failed", "service": self.service, "reason": self.failed},
                                     status=503)
        return web.json_response({"status": "alive", "service": self.service})

    async def _readyz(self, _: web.Request) -> web.Response:
        state = self.overall()
        ok = self.ready and state is State.OK
        body = {"ready": ok, "health": state.label,
                "components": {k: v.as_dict() for k, v in self.health().items()}}
        return web.json_response(body, status=200 if ok else 503)

    async def _metrics(self, _: web.Request) -> web.Response:
        data = prometheus_client.generate_latest(self.registry)
        return web.Response(body=data, headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST})

    async def _status(self, _: web.Request) -> web.Response:
        hb = self.heartbeat()
        return web.json_response({f.name: getattr(hb, f.name) for f in dataclasses.fields(hb)})

    async def _debug_tasks(self, _: web.Request) -> web.Response:
        """Every asyncio task and where it waits (Go's goroutine dump): what a stalled loop is stuck on."""
        out = io.StringIO()
        for task in sorted(asyncio.all_tasks(), key=lambda t: t.get_name()):
            out.write(f"--- {task.get_name()}\n")
            task.print_stack(limit=12, file=out)
        return web.Response(text=out.getvalue())

    # --- lifecycle -------------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        runner = await self._start_http()
        started: list[Component] = []
        code = 0
        try:
            connect = asyncio.ensure_future(self.bus.connect())
            stop_wait = asyncio.ensure_future(self._stopping.wait())
            await asyncio.wait({connect, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
            if not connect.done():
                connect.cancel()
                return 0
            stop_wait.cancel()
            for c in self.components:
                if self._stopping.is_set():
                    break
                log.info("starting %s: %s", c.name, c.title)
                c.health = Health.ok("starting")
                await c.start(self)
                started.append(c)
                if c.health.reason == "starting":
                    c.set_ok()
            if self._stopping.is_set():
                log.info("%s stopping before it was ready (stop requested during start)", self.service)
            else:
                self.ready = True
                self.spawn("heartbeat", self._heartbeat_loop())
                log.info("%s ready", self.service, extra={"http": self.http_url})
                await self._stopping.wait()
        except PropolisError as exc:
            log.error("%s failed: %s", self.service, exc)
            code = 1
        finally:
            self.ready = False
            self._stopping.set()
            if self.failed:
                code = 1
                with contextlib.suppress(Exception):  # status shows why until the restarted instance beats
                    await asyncio.wait_for(self.publish_heartbeat(), 1.0)
            try:
                await asyncio.wait_for(self._shutdown(started), self.settings.shutdown_timeout)
            except TimeoutError:
                log.error("graceful stop exceeded %.1fs", self.settings.shutdown_timeout)
                code = code or 1
            if runner is not None:
                await runner.cleanup()
        return code

    async def _shutdown(self, started: list[Component]) -> None:
        await self.cancel_tasks()
        for c in reversed(started):
            try:
                await c.stop()
            except Exception:
                log.exception("stopping %s failed", c.name)
            c.health = Health.stopped()
        with contextlib.suppress(Exception):
            await self.bus.close()


async def _fault_injectable(coro: Coroutine[Any, Any, Any], trigger: Path) -> Any:
    """Run ``coro``; raise instead once ``trigger`` exists (consumed, so a restarted instance runs clean)."""
    inner = asyncio.ensure_future(coro)
    try:
        while True:
            done, _ = await asyncio.wait({inner}, timeout=0.1)
            if done:
                return inner.result()
            if trigger.exists():
                trigger.unlink(missing_ok=True)
                raise RuntimeError(f"fault injected through {trigger}")
    finally:
        inner.cancel()


def run_service(name: str, settings_cls: type[S], build: Callable[[S], Sequence[Component]],
                argv: Sequence[str] | None = None) -> int:
    """Entry point body of every service's console script."""
    parser = argparse.ArgumentParser(prog=f"propolis-{name}", description=f"Propolis {name}")
    parser.add_argument("--describe", action="store_true",
                        help="print components, resolved settings and start order, then exit")
    settings_mod.add_arguments(parser, settings_cls)
    args = parser.parse_args(argv)
    try:
        cfg = settings_mod.load(settings_cls, args)
    except ValidationError as exc:
        print(f"propolis-{name}: invalid setting {exc}", file=sys.stderr)
        return 2
    components = build(cfg)
    check_wiring(components)
    if args.describe:
        print(f"service {name}")
        print("components (start order):")
        for i, c in enumerate(components, 1):
            requires = f" (requires {', '.join(d.name for d in c.requires)})" if c.requires else ""
            print(f"  {i}. {c.name:<20} {c.title}{requires}")
        print("settings:")
        for flag, value, help_text in settings_mod.describe(cfg):
            print(f"  {flag:<24} {value!r:<32} {help_text}")
        return 0
    logs.setup(cfg.log_level, service=name, node=cfg.node_name)
    return asyncio.run(Runtime(name, cfg, components).run())

