"""What callers used to take from `bus.nc` directly, through `Bus` (real nats-server): raw pattern and
queue-group subscriptions, scatter-gather through an inbox, and the server/JetStream facts `status` shows."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from nats.aio.msg import Msg

from propolis.bus import codec, subjects
from propolis.bus.connection import Bus
from propolis.bus.messages import Watermark


async def test_a_queue_group_on_a_pattern_gets_each_message_once_and_bytes_stay_as_sent(bus: Bus) -> None:
    got: dict[str, list[bytes]] = {"a": [], "b": [], "all": []}

    def into(name: str) -> Callable[[Msg], Awaitable[None]]:
        async def handler(msg: Msg) -> None:
            got[name].append(msg.data)
        return handler

    await bus.subscribe_raw(f"{subjects.PREFIX}.events.>", into("a"), queue="workers")
    await bus.subscribe_raw(f"{subjects.PREFIX}.events.>", into("b"), queue="workers")
    await bus.subscribe_raw(f"{subjects.PREFIX}.events.*", into("all"))
    for i in range(20):
        await bus.publish_raw(subjects.events_subject("test"), b"\xc1 not msgpack %d" % i)
    await bus.flush()
    for _ in range(50):
        if len(got["all"]) == 20 and len(got["a"]) + len(got["b"]) == 20:
            break
        await asyncio.sleep(0.02)
    assert len(got["all"]) == 20 and got["all"][0] == b"\xc1 not msgpack 0"  # raw: what the codec would refuse
    assert len(got["a"]) + len(got["b"]) == 20  # the group shares the messages: each one handled once


async def test_scatter_gather_through_an_inbox(bus: Bus) -> None:
    async def answer(msg: Msg) -> None:
        for n in (1, 2):
            await bus.publish_raw(msg.reply, codec.encode(Watermark(n, 0.0)))

    await bus.subscribe_raw("test.ask", answer)
    await bus.subscribe_raw("test.ask", answer)  # two responders, as every node's observer answers
    inbox = bus.new_inbox()
    answers: asyncio.Queue[int] = asyncio.Queue()

    async def collect(msg: Msg) -> None:
        answers.put_nowait(codec.decode(msg.data, Watermark).resource_version)

    sub = await bus.subscribe_raw(inbox, collect)
    await bus.publish_raw("test.ask", b"", reply=inbox)
    got = sorted([await asyncio.wait_for(answers.get(), 5) for _ in range(4)])
    await sub.unsubscribe()
    assert got == [1, 1, 2, 2]


async def test_server_version_and_jetstream_info(bus: Bus) -> None:
    major, minor, patch = bus.server_version.split(".")
    assert int(major) >= 2 and minor.isdigit() and patch.isdigit()
    info = await bus.jetstream_info()
    assert info.streams == len(subjects.BUCKETS)  # the fixture's ensure_buckets made every bucket
