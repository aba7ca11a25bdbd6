"""Real dependencies from fixtures: a nats-server per test on a free loopback port.

Loaded by the root conftest.py as a pytest plugin.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from propolis.bus.connection import Bus
from propolis.bus.embedded import EmbeddedNats


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Root tests are skipped (with the reason) when not root; CI runs as root."""
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (network namespaces, BPF)")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[EmbeddedNats]:
    server = EmbeddedNats(tmp_path / "nats")
    server.start_sync()
    try:
        yield server
    finally:
        server.stop_sync()


@pytest.fixture
async def bus(nats_server: EmbeddedNats) -> AsyncIterator[Bus]:
    """An admin bus with every bucket created."""
    b = Bus(nats_server.url, name="test")
    await b.connect(max_wait=5)
    await b.ensure_buckets()
    try:
        yield b
    finally:
        await b.close()


@pytest.fixture
async def no_task_leaks() -> AsyncIterator[None]:
    """Fail a test that leaves asyncio tasks pending."""
    before = asyncio.all_tasks()
    yield
    await asyncio.sleep(0)
    leaked = [t for t in asyncio.all_tasks() - before if not t.done() and t is not asyncio.current_task()]
    if leaked:
        for t in leaked:
            t.cancel()
        pytest.fail(f"test left tasks pending: {[t.get_name() for t in leaked]}")


@pytest.fixture
async def running() -> AsyncIterator[Any]:
    """``running(reconciler)`` starts its loop for the test and cancels it afterwards."""
    tasks: list[asyncio.Task[Any]] = []

    def start(rec: Any) -> Any:
        tasks.append(asyncio.create_task(rec.run(), name=f"test-reconciler-{rec.name}"))
        return rec

    yield start
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
