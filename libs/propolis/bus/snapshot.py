"""A KV bucket as it is now, read with batched direct gets: no JetStream consumer is created.

Why: a KV watch used as a snapshot leaves an ordered consumer on the stream for
its inactive threshold (5 minutes in nats-py); every `propolis status`,
`sandbox wait` poll and `policy get` left one, and a busy wait loop hit the
stream's consumer limit. Direct gets (`$JS.API.DIRECT.GET.<stream>` with
``next_by_subj`` and ``batch``) page through the stream's messages in sequence
order; a later message of a key replaces an earlier one (a delete or purge
marker removes it), so the result is the bucket as of the last message read.
The buckets keep one revision per key (`subjects.BUCKETS`), so the pages hold
about one message per key. Needs ``allow_direct`` on the stream, which
`Bus.kv(create=True)` and `Bus.ensure_buckets` set.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import TYPE_CHECKING, Any

from nats.aio.msg import Msg
from nats.js.kv import KV_DEL, KV_OP, KV_PURGE

from propolis.bus import codec
from propolis.errors import PermanentError, TemporaryError

if TYPE_CHECKING:
    from propolis.bus.connection import Bus
    from propolis.bus.kv import Entry

log = logging.getLogger("propolis.bus.snapshot")

#: Messages per direct-get request (the server answers each request with at most this many, then EOB).
PAGE_SIZE = 1000


#: values decoded between two yields to the event loop
YIELD_EVERY = 200


def stream_name(bucket: str) -> str:
    return f"KV_{bucket}"


async def kv_snapshot(bus: Bus, bucket: str, keys: str = ">", *, timeout: float = 5.0,
                      refused: dict[str, str] | None = None, decode: bool = True) -> dict[str, Entry]:
    """Every live key under ``keys`` with its decoded value; an undecodable value is logged and left out
    (in ``refused``, when given: key -> why, so a reader can report it). ``decode=False``: the values as
    stored (bytes), undecodable ones included: a writer comparing thousands of keys with what it would
    write creates no objects for the garbage collector to walk (a 12,000-object snapshot's full
    collections stalled the k8s-watcher's event loop up to 0.5 s).

    Raises TemporaryError when the server does not answer a page within ``timeout`` seconds."""
    from propolis.bus.kv import Entry  # kv.py imports this module's caller; import late

    prefix = f"$KV.{bucket}."
    raw: dict[str, tuple[bytes, int] | None] = {}
    seq = 1
    while True:
        page, pending = await _page(bus, bucket, prefix + keys, seq, timeout)
        for msg in page:
            key = msg.headers["Nats-Subject"][len(prefix):]
            rev = int(msg.headers["Nats-Sequence"])
            seq = rev + 1
            op = msg.headers.get(KV_OP) or msg.headers.get("Nats-Marker-Reason")
            raw[key] = None if op in (KV_DEL, KV_PURGE, "MaxAge", "Purge", "Remove") else (msg.data, rev)
        if not page or pending == 0:
            break
    out: dict[str, Entry] = {}
    for n, (key, item) in enumerate(raw.items()):
        if n % YIELD_EVERY == YIELD_EVERY - 1:
            await asyncio.sleep(0)  # decoding 12,000 objects takes ~0.5 s: let the service's other work in
        if item is None:
            continue
        data, rev = item
        if not decode:
            out[key] = Entry(key, data, rev)
            continue
        try:
            out[key] = Entry(key, codec.decode(data), rev)
        except PermanentError as exc:
            log.error("KV %s/%s revision %d unreadable, left out of the snapshot: %s", bucket, key, rev, exc)
            if refused is not None:
                refused[key] = str(exc)
    return out


async def _page(bus: Bus, bucket: str, subject: str, seq: int, timeout: float) -> tuple[list[Any], int]:
    """One batched direct get from ``seq`` on: (messages, how many more match after them)."""
    inbox = bus.new_inbox()
    got: asyncio.Queue[Msg] = asyncio.Queue()
    sub = await bus.subscribe_raw(inbox, got.put)
    request = {"seq": seq, "next_by_subj": subject, "batch": PAGE_SIZE}
    try:
        await bus.publish_raw(f"$JS.API.DIRECT.GET.{stream_name(bucket)}", json.dumps(request).encode(), reply=inbox)
        page: list[Any] = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                msg = await asyncio.wait_for(got.get(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise TemporaryError(f"KV {bucket}: no answer to a direct get within {timeout:.0f}s") from None
            headers = msg.headers or {}
            status = headers.get("Status")
            if status is None:
                page.append(msg)
                continue
            if status == "204":  # end of batch
                return page, int(headers.get("Nats-Num-Pending", "0"))
            if status == "404":  # nothing (more) matches
                return page, 0
            if status == "503":
                raise TemporaryError(f"KV {bucket}: direct get unavailable (stream {stream_name(bucket)} "
                                     "without allow_direct: an admin's ensure_buckets enables it)")
            raise TemporaryError(f"KV {bucket}: direct get answered {status} "
                                 f"{headers.get('Description', '')}".rstrip())
    finally:
        await sub.unsubscribe()
