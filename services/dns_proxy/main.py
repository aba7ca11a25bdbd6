"""dns-proxy (per node): judges the DNS queries the datapath redirects to it and learns toFQDNs addresses.

Wiring only; the components are `propolis.fqdn.service`. See README.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from propolis.errors import ValidationError
from propolis.fqdn.cache import DEFAULT_IDLE_CONNECTION_GRACE_S, DEFAULT_MAX_IPS_PER_HOSTNAME, DEFAULT_MIN_TTL
from propolis.fqdn.proxy import PROXY_RESPONSE_MAX_DELAY_S, REJECT_RCODES
from propolis.fqdn.service import SERVICE, DnsInputsComponent, DnsProxyComponent, FqdnCacheComponent
from propolis.maps.spec import default_pin_dir
from propolis.runtime.component import Component
from propolis.runtime.service import run_service
from propolis.runtime.settings import CommonSettings, setting


@dataclass
class Settings(CommonSettings):
    node_netns: str = setting("", "network namespace of the node (empty = this one)")
    bpf_pin_dir: str = setting("", "bpffs directory of this node's maps, for conntrack (zombies; empty = "
                                   "/sys/fs/bpf/propolis/<node>)")
    policy_enforcement: str = setting("default", "Cilium's policy enforcement mode (as the datapath-writer's)",
                                      choices=("default", "always", "never"))
    dns_reject_response_code: str = setting("refused", "Cilium's dnsProxy.dnsRejectResponseCode: the answer to a "
                                                       "denied query", choices=tuple(REJECT_RCODES))
    proxy_response_max_delay: float = setting(PROXY_RESPONSE_MAX_DELAY_S, "Cilium's dnsProxy.proxyResponseMaxDelay: "
                                              "an answer waits at most this long for its IPs' policy", unit="s")
    tofqdns_min_ttl: int = setting(DEFAULT_MIN_TTL, "Cilium's tofqdns-min-ttl: a learned IP lives at least this "
                                                    "long", unit="s")
    tofqdns_endpoint_max_ip_per_hostname: int = setting(DEFAULT_MAX_IPS_PER_HOSTNAME,
                                                        "Cilium's tofqdns-endpoint-max-ip-per-hostname")
    tofqdns_idle_connection_grace_period: float = setting(DEFAULT_IDLE_CONNECTION_GRACE_S,
                                                          "Cilium's tofqdns-idle-connection-grace-period", unit="s")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.proxy_response_max_delay <= 0:
            raise ValidationError("proxy_response_max_delay", "must be > 0")
        if self.tofqdns_min_ttl < 0:
            raise ValidationError("tofqdns_min_ttl", "must be >= 0")
        if self.tofqdns_endpoint_max_ip_per_hostname < 1:
            raise ValidationError("tofqdns_endpoint_max_ip_per_hostname", "must be >= 1")


def build(settings: Settings) -> list[Component]:
    inputs = DnsInputsComponent(settings.node_name, cluster_name=settings.cluster_name,
                                mode=settings.policy_enforcement)
    cache = FqdnCacheComponent(settings.node_name, pin_dir=settings.bpf_pin_dir or default_pin_dir(settings.node_name),
                               min_ttl=settings.tofqdns_min_ttl,
                               max_ips_per_hostname=settings.tofqdns_endpoint_max_ip_per_hostname,
                               idle_connection_grace_s=settings.tofqdns_idle_connection_grace_period)
    return [inputs, cache, DnsProxyComponent(inputs, cache, node=settings.node_name,
                                             netns=settings.node_netns or None,
                                             reject=settings.dns_reject_response_code,
                                             max_delay_s=settings.proxy_response_max_delay)]


def main(argv: list[str] | None = None) -> int:
    return run_service(SERVICE, Settings, build, argv)


if __name__ == "__main__":
    raise SystemExit(main())
