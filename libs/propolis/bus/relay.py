"""Relays: nats-server leafnodes holding mirrors of the cluster's KV buckets, for large clusters.

Why: every node service watching the central server costs it one consumer and one delivery per
watcher and change (issue #21: a 1,000-node cluster runs one server out of CPU). A relay (one per
zone or per N nodes) holds one mirror of each bucket; the node services connected to it watch and
read there, and the hub serves one mirror per relay instead — as Cilium's kvstoremesh spares etcd.

How (each step checked on nats-server 2.15, tests/bus/test_relay.py):
- The hub (the central server or cluster) runs JetStream in the domain `HUB_DOMAIN` and takes
  leafnode connections from the `LEAFNODE_USER` (`hub_leafnode_config`); a relay runs JetStream in
  its own domain (`relay_domain`) with a leafnode remote to the hub and the hub's users (`relay_config`).
- For every bucket of `subjects.BUCKETS` the relay holds a stream ``KV_<bucket>`` mirroring the
  hub's through the hub's API prefix, with direct gets (`ensure_mirrors`). A watch there is an
  ordered consumer on the local mirror (mirrored messages keep their ``$KV.<bucket>.<key>``
  subjects, so key filters work), a get or snapshot a local direct get.
- Writes reach the hub: a leafnode between JetStream domains does not carry ``$KV.>``, so the
  relay maps ``$KV.>`` to `KV_WRITE_PREFIX` + ``$KV.>``, which the hub's JetStream stores in the
  bucket's stream and acknowledges to the writer. The server checks permissions on the mapped
  subject: the relay's users are the hub's with that prefix on their KV write subjects.
- A relay never holds a bucket of its own: `ensure_mirrors` fails loudly on a ``KV_`` stream that
  is not a mirror of the hub's, and `Bus.kv(create=True)` refuses to create one on a relay.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import nats
from nats.js import api as js_api

from propolis.bus import permissions, subjects
from propolis.bus.permissions import Credentials
from propolis.errors import PermanentError, TemporaryError

if TYPE_CHECKING:
    from propolis.bus.connection import Bus

log = logging.getLogger("propolis.bus.relay")

#: JetStream domain of the hub; a relay's is `relay_domain(n)`.
HUB_DOMAIN = "hub"
RELAY_DOMAIN_PREFIX = "relay-"
#: The hub's JetStream API as seen from a relay (through the leafnode).
HUB_API = f"$JS.{HUB_DOMAIN}.API"
#: What a relay puts in front of ``$KV.<bucket>.<key>`` so a write reaches the hub's bucket.
KV_WRITE_PREFIX = f"{HUB_API}."
#: The user relays connect to the hub's leafnode port with (full rights: it carries every
#: relay client's writes, which the relay has checked against that client's own permissions).
LEAFNODE_USER = "relay"
#: Default leafnode port (nats-server's).
LEAFNODE_PORT = 7422
#: How often `run_mirrors` re-checks the mirrors (a bucket the hub created later, a relay restarted
#: on an empty store).
MIRROR_CHECK_INTERVAL_S = 5.0


def relay_domain(index: int) -> str:
    return f"{RELAY_DOMAIN_PREFIX}{index}"


def is_relay_domain(domain: str | None) -> bool:
    return bool(domain) and str(domain).startswith(RELAY_DOMAIN_PREFIX)


def jetstream_config(domain: str, **settings: str) -> str:
    """A config's ``jetstream`` block in ``domain``, with ``settings`` written as given (nats-server
    syntax: ``max_memory_store="256MB"`` is a size): one block for all, since a second ``jetstream``
    block in a config replaces the first."""
    lines = [f"  domain: {json.dumps(domain)}"] + [f"  {name}: {value}" for name, value in settings.items()]
    return "jetstream {\n" + "\n".join(lines) + "\n}\n"


def hub_leafnode_config(listen: str, leaf: Credentials) -> str:
    """The hub's ``leafnodes`` block: listen on ``listen`` (host:port) for relays with ``leaf``'s credentials."""
    block = {"listen": listen, "authorization": {"user": leaf.user, "password": leaf.password}}
    return "leafnodes " + json.dumps(block, indent=2) + "\n"


def relay_config(users: dict[str, Credentials], *, admin: Credentials, hub_leafnodes: list[str],
                 leaf: Credentials) -> str:
    """A relay's config without its ``jetstream`` block (domain `relay_domain`, with the server's limits):
    the hub's users with the mapped KV write subjects, the ``$KV.>`` mapping, and a leafnode remote to
    every hub server in ``hub_leafnodes`` (host:port of their leafnode listeners)."""
    if not hub_leafnodes:
        raise PermanentError("relay config: hub_leafnodes is empty (the hub's leafnode host:port)")
    remote = {"urls": [f"nats-leaf://{leaf.user}:{leaf.password}@{hostport}" for hostport in hub_leafnodes]}
    return (permissions.server_config(users, admin=admin, kv_prefix=KV_WRITE_PREFIX)
            + "mappings " + json.dumps({"$KV.>": f"{KV_WRITE_PREFIX}$KV.>"}) + "\n"
            + "leafnodes " + json.dumps({"remotes": [remote]}, indent=2) + "\n")


def mirror_config(bucket: str) -> js_api.StreamConfig:
    """The relay's stream for ``bucket``: a mirror of the hub's, keeping what the bucket keeps
    (history, per-entry max age) and serving direct gets."""
    cfg = subjects.BUCKETS[bucket]
    stream = f"KV_{bucket}"
    return js_api.StreamConfig(
        name=stream, mirror=js_api.StreamSource(name=stream, external=js_api.ExternalStream(api=HUB_API)),
        max_msgs_per_subject=cfg.history, max_age=cfg.ttl_s, storage=js_api.StorageType.FILE,
        allow_direct=True, mirror_direct=True, deny_delete=True)


async def ensure_mirrors(bus: Bus) -> list[str]:
    """Make every bucket's mirror on the relay ``bus`` is connected to (as the admin); idempotent.
    Returns the buckets whose mirror was created or updated. Raises PermanentError when ``bus`` is not
    on a relay or a stream is in the way, TemporaryError when the hub lacks a bucket or does not answer
    (after trying every bucket: one slow answer does not hold the others back)."""
    try:
        domain = (await bus.jetstream_info()).domain
    except (TimeoutError, nats.errors.Error) as exc:
        raise TemporaryError(f"relay at {bus.url}: no JetStream answer: {exc or type(exc).__name__}") from exc
    if not is_relay_domain(domain):
        raise PermanentError(f"relay mirrors: {bus.url} is in JetStream domain {domain!r}, not a relay's "
                             f"({RELAY_DOMAIN_PREFIX}<n>)")
    changed, failed = [], []
    for bucket in subjects.BUCKETS:
        try:
            if await ensure_mirror(bus, bucket):
                changed.append(bucket)
        except TemporaryError as exc:
            failed.append(str(exc))
    if failed:
        raise TemporaryError(f"relay at {bus.url}: " + "; ".join(failed))
    return changed


async def ensure_mirror(bus: Bus, bucket: str) -> bool:
    """One bucket's mirror (see `ensure_mirrors`); True when it was created or updated."""
    want = mirror_config(bucket)
    stream = want.name
    assert stream is not None
    try:
        try:
            await bus.nc.jetstream(domain=HUB_DOMAIN).stream_info(stream)
        except nats.js.errors.NotFoundError:
            raise TemporaryError(f"relay mirror {stream}: the hub has no bucket {bucket} yet") from None
        try:
            info = await bus.js.stream_info(stream)
        except nats.js.errors.NotFoundError:
            await bus.js.add_stream(want)
            log.info("relay: mirror %s created", stream)
            return True
        have = info.config
        mirror = have.mirror
        if mirror is None or mirror.name != stream or mirror.external is None or mirror.external.api != HUB_API:
            raise PermanentError(f"relay mirror {stream}: a stream of that name exists and is not a mirror of "
                                 f"the hub's (mirror={mirror}); delete it so the relay can mirror the bucket")
        drift = {f: getattr(want, f) for f in ("max_msgs_per_subject", "max_age", "allow_direct", "mirror_direct")
                 if (getattr(have, f) or None) != (getattr(want, f) or None)}
        if not drift:
            return False
        for field, value in drift.items():
            setattr(have, field, value)
        await bus.js.update_stream(have)
        log.info("relay: mirror %s updated (%s)", stream, ", ".join(drift))
        return True
    except (TimeoutError, nats.errors.TimeoutError, nats.errors.NoRespondersError,
            nats.js.errors.ServiceUnavailableError) as exc:
        raise TemporaryError(f"relay mirror {stream}: {exc or type(exc).__name__}") from exc
    except nats.js.errors.APIError as exc:
        raise PermanentError(f"relay mirror {stream}: refused: {exc}") from exc


async def mirrors_behind(bus: Bus) -> list[str]:
    """The buckets whose mirror on this relay is behind the hub's stream (missing, or its last sequence
    below the hub's as asked now; a mirror keeps the hub's sequence numbers): empty when every mirror
    has caught up.

    Why it matters: a watch started on a mirror still filling sees part of the bucket, and its SYNCED
    would let a writer prune kernel state the rest of the bucket still wants (a relay whose store was
    lost, the chart's emptyDir). Clients may use a relay only once this is empty (the sandbox waits for
    it, the chart's readiness probe asks `propolis bus relay-mirrors` for it)."""
    behind = []
    hub = bus.nc.jetstream(domain=HUB_DOMAIN)
    for bucket in subjects.BUCKETS:
        stream = f"KV_{bucket}"
        try:
            want = (await hub.stream_info(stream)).state.last_seq
            have = (await bus.js.stream_info(stream)).state.last_seq
        except nats.js.errors.NotFoundError:
            behind.append(bucket)
            continue
        except (TimeoutError, nats.errors.Error) as exc:
            raise TemporaryError(f"relay at {bus.url}: mirror {stream}: {exc or type(exc).__name__}") from exc
        if have < want:
            behind.append(bucket)
    return behind


async def run_mirrors(bus: Bus, interval: float = MIRROR_CHECK_INTERVAL_S, *, ready_file: Path | None = None) -> None:
    """Keep the relay's mirrors in place for as long as it runs (reconciler-style: ensure, wait, again);
    a missing hub bucket or an unreachable hub is retried, a stream in the way is logged every round.
    ``ready_file`` exists while the relay may take clients: from the round its mirrors caught up with the
    hub (`mirrors_behind`) until one had to be made anew."""
    ready = False
    while True:
        try:
            changed = await ensure_mirrors(bus)
            if changed:
                log.info("relay: mirrors ensured (%s)", ", ".join(changed))
                ready = False
            if not ready:
                behind = await mirrors_behind(bus)
                ready = not behind
                log.info("relay: mirrors caught up with the hub" if ready else "relay: mirrors behind the hub: %s",
                         ", ".join(behind))
            if ready_file is not None:
                if ready:
                    ready_file.touch()
                else:
                    ready_file.unlink(missing_ok=True)
        except TemporaryError as exc:
            log.warning("%s; retrying in %.0fs", exc, interval)
        except PermanentError as exc:
            log.error("%s", exc)
        await asyncio.sleep(interval)
