"""hubble-relay (per cluster): every node's flows in one place, over HTTP/JSON streaming.

Historic queries go to every node's observer at once (`propolis.v1.hubble.query`, answers merged
by time); follow subscribes to `propolis.v1.flows.>`. The API (see `propolis.hubble.relay`) is
what `propolis observe` and the service-map page at `/` use. The base URL is in this service's
heartbeat (`progress["relay_url"]`), which is how `propolis observe` finds it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from propolis.errors import ValidationError
from propolis.hubble.relay import start_relay
from propolis.runtime.component import Component
from propolis.runtime.service import Runtime, run_service
from propolis.runtime.settings import CommonSettings, setting

SERVICE = "hubble-relay"


@dataclass
class Settings(CommonSettings):
    hubble_relay_listen_address: str = setting("127.0.0.1:4245", "host:port of the relay API and service-map "
                                                                 "page (port 0 = any free port)")
    hubble_relay_query_timeout: float = setting(3.0, "how long a historic query waits for nodes", unit="s")

    def __post_init__(self) -> None:
        super().__post_init__()
        host, sep, port = self.hubble_relay_listen_address.rpartition(":")
        if not sep or not port.isdigit():
            raise ValidationError("hubble_relay_listen_address", "must be host:port")


class RelayComponent(Component):
    name, title = "relay", "HTTP/JSON flow API, service map and its page"

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self.settings = settings
        self.runner: Any = None

    async def start(self, rt: Runtime) -> None:
        host, _, port = self.settings.hubble_relay_listen_address.rpartition(":")
        relay, self.runner, url, task = await start_relay(rt.bus, host or "127.0.0.1", int(port),
                                                          timeout=self.settings.hubble_relay_query_timeout)
        rt.spawn("servicemap", _await(task), self)
        rt.progress["relay_url"] = url
        rt.features["Hubble Relay"] = {"state": "Ok", "detail": url}

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


async def _await(task: asyncio.Task[None]) -> None:
    try:
        await task
    finally:
        task.cancel()


def build(settings: Settings) -> list[Component]:
    return [RelayComponent(settings)]


def main(argv: list[str] | None = None) -> int:
    return run_service(SERVICE, Settings, build, argv)


if __name__ == "__main__":
    raise SystemExit(main())
