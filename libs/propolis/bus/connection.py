"""Bus: one nats-py connection per process, with back-off, typed publish/subscribe and KV access.

nats-py reconnects by itself once connected; the initial connect is retried
here with exponential back-off so a service can start before NATS does.
Handlers never see undecodable payloads: those are logged (what, from which
subject) and dropped, and the service keeps its last good state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import nats
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import DEFAULT_SUB_PENDING_MSGS_LIMIT, Subscription
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import BucketNotFoundError

from propolis.bus import codec, relay, subjects
from propolis.bus.kv import Kv
from propolis.errors import PermanentError, TemporaryError

log = logging.getLogger("propolis.bus")

Handler = Callable[[Any, Msg], Awaitable[None]]
RawHandler = Callable[[Msg], Awaitable[None]]


class Bus:
    """A NATS connection plus the project's codec. Construct, then ``await connect()``. ``url`` may list
    several servers of one NATS cluster, comma-separated (nats-py fails over between them)."""

    def __init__(self, url: str, *, name: str, user: str | None = None, password: str | None = None,
                 connect_timeout: float = 2.0, reconnect_wait: float = 0.5) -> None:
        self.url = url
        self.name = name
        self.user = user
        self.password = password
        self.connect_timeout = connect_timeout
        self.reconnect_wait = reconnect_wait
        self._nc: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self.reconnects = 0
        self.disconnected = asyncio.Event()
        self._reconnect_listeners: list[Callable[[], None]] = []
        self.errors: list[str] = []

    # --- connection ------------------------------------------------------------------
    async def connect(self, *, max_wait: float | None = None) -> None:
        """Connect, retrying with back-off (0.1 s doubling to 5 s); ``max_wait`` bounds the whole call
        (a server that accepts TCP but never answers included). Refused credentials are a PermanentError
        once ``max_wait`` is over (nats-py itself retries them)."""
        delay = 0.1
        deadline = None if max_wait is None else time.monotonic() + max_wait
        while True:
            left = None if deadline is None else max(0.05, deadline - time.monotonic())
            try:
                self._nc = await asyncio.wait_for(nats.connect(
                    servers=self.url.split(","), name=self.name, user=self.user, password=self.password,
                    connect_timeout=min(self.connect_timeout, left or self.connect_timeout), allow_reconnect=True,
                    max_reconnect_attempts=-1, reconnect_time_wait=self.reconnect_wait,
                    error_cb=self._on_error, disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                ), left)
                self._js = self._nc.jetstream()
                self.disconnected.clear()
                return
            except (TimeoutError, OSError, nats.errors.NoServersError) as exc:
                refused = next((e for e in self.errors if "authorization violation" in e.lower()), "")
                if refused:
                    who = f"user {self.user!r}" if self.user else "a connection without credentials"
                    raise PermanentError(f"NATS at {self.url} refused {who}: {refused}") from None
                if deadline is not None and time.monotonic() >= deadline:
                    raise TemporaryError(f"connect to NATS at {self.url}: {exc or type(exc).__name__} "
                                         f"(gave up after {max_wait:g}s)") from exc
                log.warning("NATS at %s not reachable (%s); retrying in %.1fs", self.url,
                            exc or type(exc).__name__, delay)
                await asyncio.sleep(delay if deadline is None else min(delay, max(0.0, deadline - time.monotonic())))
                delay = min(delay * 2, 5.0)

    async def close(self, timeout: float = 5.0) -> None:
        """Drain (deliver what is in flight, flush publishes) for up to ``timeout`` seconds, then close."""
        nc, self._nc = self._nc, None
        if nc is not None and not nc.is_closed:
            try:
                await asyncio.wait_for(nc.drain(), timeout)
            except Exception:  # noqa: BLE001 - draining a broken connection: close is what matters
                await nc.close()

    @property
    def nc(self) -> NatsClient:
        if self._nc is None:
            raise TemporaryError("bus not connected")
        return self._nc

    @property
    def js(self) -> JetStreamContext:
        if self._js is None:
            raise TemporaryError("bus not connected")
        return self._js

    @property
    def is_connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    def on_reconnect(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call ``listener`` after every reconnect; returns the function that removes it again (a watch
        removes its own when it ends, so watching many times leaves no listeners behind)."""
        self._reconnect_listeners.append(listener)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._reconnect_listeners.remove(listener)
        return remove

    @property
    def reconnect_listeners(self) -> int:
        """How many reconnect listeners are registered (bounded by the watches running now)."""
        return len(self._reconnect_listeners)

    @property
    def server_version(self) -> str:
        """The connected server's version, ``major.minor.patch``."""
        v = self.nc.connected_server_version
        return f"{v.major}.{v.minor}.{v.patch}"

    async def _on_error(self, exc: Exception) -> None:
        self.errors.append(str(exc))
        del self.errors[:-20]
        log.warning("NATS error: %s", exc)

    async def _on_disconnected(self) -> None:
        self.disconnected.set()
        if self._nc is not None:  # not our own close(): worth a warning
            log.warning("NATS disconnected from %s", self.url)

    async def _on_reconnected(self) -> None:
        self.reconnects += 1
        self.disconnected.clear()
        log.info("NATS reconnected to %s", self.url)
        for listener in list(self._reconnect_listeners):
            listener()

    # --- messages --------------------------------------------------------------------
    async def publish(self, subject: str, msg: Any) -> None:
        await self.nc.publish(subject, codec.encode(msg))

    async def publish_raw(self, subject: str, data: bytes, *, reply: str = "") -> None:
        """Publish bytes already encoded (a flow encoded once for many sinks), optionally with a reply inbox."""
        await self.nc.publish(subject, data, reply=reply)

    async def request(self, subject: str, msg: Any, timeout: float = 2.0) -> Any:
        reply = await self.nc.request(subject, codec.encode(msg), timeout=timeout)
        return codec.decode(reply.data)

    def new_inbox(self) -> str:
        """A unique reply subject, for requests answered by many (scatter-gather: hubble's historic flows)."""
        return self.nc.new_inbox()

    async def flush(self, timeout: int = 2) -> None:
        """Wait until the server has everything published so far (``timeout`` seconds at most)."""
        await self.nc.flush(timeout)

    async def subscribe_raw(self, subject: str, handler: RawHandler, *, queue: str = "",
                            pending_msgs_limit: int = DEFAULT_SUB_PENDING_MSGS_LIMIT) -> Subscription:
        """Subscribe without decoding (``subject`` may be a pattern): tools showing what the codec would
        refuse, and readers decoding only what they keep. ``pending_msgs_limit`` bounds the messages
        waiting for ``handler`` (beyond it nats-py drops them and reports a slow consumer)."""
        return await self.nc.subscribe(subject, queue=queue, cb=handler, pending_msgs_limit=pending_msgs_limit)

    async def subscribe(self, subject: str, handler: Handler, *, expected: type[Any] | None = None,
                        queue: str = "") -> Subscription:
        """Subscribe with decoding; bad payloads are logged and skipped, never passed on."""

        async def on_msg(msg: Msg) -> None:
            try:
                obj = codec.decode(msg.data, expected)
            except PermanentError as exc:
                log.warning("dropped message on %s: %s", msg.subject, exc)
                return
            try:
                await handler(obj, msg)
            except Exception:
                log.exception("handler for %s failed", msg.subject)

        return await self.nc.subscribe(subject, queue=queue, cb=on_msg)

    # --- key-value -------------------------------------------------------------------
    async def kv(self, bucket: str, *, create: bool = False, replicas: int = 1) -> Kv:
        """Open a KV bucket; ``create`` makes it (config from `subjects.BUCKETS`, ``replicas`` copies
        on a NATS cluster) if missing.

        Creating needs the admin user; a service user gets TemporaryError until the
        bucket exists (the sandbox or the chart's bootstrap job creates all buckets)."""
        try:
            store = await self.js.key_value(bucket)
        except BucketNotFoundError:
            if not create:
                raise TemporaryError(f"KV bucket {bucket} does not exist yet") from None
            await self._refuse_bucket_on_relay(bucket)
            cfg = subjects.BUCKETS[bucket]
            config = js_api.KeyValueConfig(bucket=bucket, history=cfg.history, ttl=cfg.ttl_s, replicas=replicas,
                                           direct=True)
            try:
                store = await self.js.create_key_value(config)
            except nats.js.errors.BadRequestError:
                store = await self.js.key_value(bucket)  # created concurrently by another replica
            except (nats.errors.TimeoutError, nats.js.errors.APIError) as exc:
                raise TemporaryError(f"create KV bucket {bucket}: {exc}") from exc
        return Kv(self, bucket, store)

    async def _refuse_bucket_on_relay(self, bucket: str) -> None:
        """A relay holds mirrors of the hub's buckets (`bus/relay.py`): a bucket created there would
        silently split the cluster's state, so its absence is the relay's mirror not being there yet."""
        try:
            domain = (await self.jetstream_info()).domain
        except (TimeoutError, nats.errors.Error) as exc:
            raise TemporaryError(f"create KV bucket {bucket}: no JetStream answer: {exc}") from exc
        if relay.is_relay_domain(domain):
            raise PermanentError(f"create KV bucket {bucket}: {self.url} is relay {domain!r}, which only "
                                 "mirrors the hub's buckets (create them on the hub; the relay's mirrors follow)")

    async def jetstream_info(self) -> js_api.AccountInfo:
        """This account's JetStream usage (streams, consumers, storage); raises when JetStream is away."""
        return await self.js.account_info()

    async def ensure_buckets(self, *, replicas: int = 1) -> None:
        """Create every bucket Propolis uses, with direct gets allowed (admin only; idempotent)."""
        for bucket in subjects.BUCKETS:
            await self.kv(bucket, create=True, replicas=replicas)
            info = await self.js.stream_info(f"KV_{bucket}")
            if not info.config.allow_direct:  # created by an older version: snapshots need direct gets
                info.config.allow_direct = True
                await self.js.update_stream(info.config)
