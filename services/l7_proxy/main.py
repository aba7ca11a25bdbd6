"""l7-proxy (per node): enforces L7 (HTTP) policy on the flows the datapath redirects to it.

Wiring only; the components are `propolis.l7.service`. See README.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from propolis.errors import ValidationError
from propolis.l7.service import SERVICE, PolicyInputsComponent, ProxyComponent
from propolis.runtime.component import Component
from propolis.runtime.service import run_service
from propolis.runtime.settings import CommonSettings, setting


@dataclass
class Settings(CommonSettings):
    node_netns: str = setting("", "network namespace of the node (empty = this one)")
    policy_enforcement: str = setting("default", "Cilium's policy enforcement mode (as the datapath-writer's)",
                                      choices=("default", "always", "never"))
    proxy_header_timeout: float = setting(10.0, "a request head must be complete this long after its first "
                                                "byte (408 otherwise)", unit="s")
    proxy_idle_timeout: float = setting(300.0, "a kept-alive connection with no request is closed after",
                                        unit="s")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("proxy_header_timeout", "proxy_idle_timeout"):
            if getattr(self, name) <= 0:
                raise ValidationError(name, "must be > 0")


def build(settings: Settings) -> list[Component]:
    inputs = PolicyInputsComponent(settings.node_name, cluster_name=settings.cluster_name,
                                   mode=settings.policy_enforcement)
    return [inputs, ProxyComponent(inputs, node=settings.node_name, netns=settings.node_netns or None,
                                   header_timeout=settings.proxy_header_timeout,
                                   idle_timeout=settings.proxy_idle_timeout)]


def main(argv: list[str] | None = None) -> int:
    return run_service(SERVICE, Settings, build, argv)


if __name__ == "__main__":
    raise SystemExit(main())
