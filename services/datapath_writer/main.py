"""datapath-writer: bus inputs + CNI announcements -> this node's BPF maps and tc programs.

The wiring only: the components and what each requires are in `propolis.writer.components` (their
start order and duties are described there), the settings in `propolis.writer.settings`.

State: `propolis bpf endpoint list --node N`, `propolis bpf policy get EP --node N`,
`propolis bpf ipcache list --node N`.
"""

from __future__ import annotations

from propolis.runtime.component import Component
from propolis.runtime.service import run_service
from propolis.writer.components import (
    SERVICE,
    BandwidthManager,
    ConntrackGCComponent,
    DatapathComponent,
    Endpoints,
    Enforcer,
    InputsComponent,
    IpcachePublisher,
    LoadBalancer,
    SocketLoadBalancer,
)
from propolis.writer.settings import Settings

__all__ = ["Settings", "build", "main"]


def build(settings: Settings) -> list[Component]:
    datapath = DatapathComponent(settings)
    inputs = InputsComponent(settings.node_name)
    lb = LoadBalancer(settings, datapath)
    publisher = IpcachePublisher(settings)
    bandwidth = BandwidthManager(settings)
    enforcer = Enforcer(settings, datapath, inputs, lb, publisher, bandwidth)
    return [datapath, inputs, lb, publisher, bandwidth, SocketLoadBalancer(settings, datapath), enforcer,
            Endpoints(settings, datapath, inputs, enforcer), ConntrackGCComponent(settings, datapath)]


def main(argv: list[str] | None = None) -> int:
    return run_service(SERVICE, Settings, build, argv)


if __name__ == "__main__":
    raise SystemExit(main())
