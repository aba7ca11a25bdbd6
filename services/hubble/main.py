"""hubble (per node): the node's datapath events -> Hubble flows on the bus, ring buffer, metrics, exporter.

The wiring only: the components (enricher, then observer), their duties and the settings are in
`propolis.hubble.service`. Read it with `propolis observe` (through hubble-relay when one runs), or raw
with `propolis bus tail 'propolis.v1.flows.>'`.
"""

from __future__ import annotations

from propolis.hubble.service import SERVICE, EnricherComponent, ObserverComponent, Settings
from propolis.runtime.component import Component
from propolis.runtime.service import run_service

__all__ = ["Settings", "build", "main"]


def build(settings: Settings) -> list[Component]:
    enricher = EnricherComponent(settings)
    return [enricher, ObserverComponent(settings, enricher)]


def main(argv: list[str] | None = None) -> int:
    return run_service(SERVICE, Settings, build, argv)


if __name__ == "__main__":
    raise SystemExit(main())
