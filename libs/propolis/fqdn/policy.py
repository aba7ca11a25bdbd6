"""Which DNS rules judge a redirected query, and which toFQDNs selectors want its answer.

The same inputs and compiler as the datapath-writer (`l7.policy.ProxyPolicy`, watermark-gated
buckets, `DesiredState`), so the rules are exactly those of the entries that set the dns-proxy's
port: the client's egress entries toward the server's identity (or any peer) on that protocol and
port. No such entry = None: the query was not redirected by policy, it is dropped (fail closed).
"""

from __future__ import annotations

from propolis.fqdn.proxy import Redirected
from propolis.l7.policy import ProxyPolicy
from propolis.model import identity as idm
from propolis.model.matchpattern import FqdnSelector
from propolis.policy.entries import PROTOCOL_NUMBERS
from propolis.policy.proxy_ports import PROXY_PORTS

DNS_PROXY_PORT = PROXY_PORTS[("dns", "egress")]


class DnsPolicy(ProxyPolicy):
    def dns_rules(self, where: Redirected) -> list[FqdnSelector] | None:
        """The matchName/matchPattern selectors allowing names from the client to that server and port."""
        client, server = self.identity_of(where.client_ip), self.identity_of(where.server_ip)
        if not self.ready or client in (idm.RESERVED_WORLD, idm.RESERVED_HOST):
            return None
        result = self._desired.compiled(self.inputs, client)
        number, server_port = PROTOCOL_NUMBERS[where.protocol], where.server_port
        found: list[FqdnSelector] | None = None
        for entry, anns in result.l7.items():
            if entry.direction != "egress" or entry.deny or entry.proxy_port != DNS_PROXY_PORT:
                continue
            if entry.identity not in (0, server) or entry.protocol not in (0, number):
                continue
            if not (entry.port == 0 or entry.port <= server_port <= (entry.end_port or entry.port)):
                continue
            found = found if found is not None else []
            for ann in anns:
                found.extend(FqdnSelector(r.match_name, r.match_pattern) for r in ann.rules.dns)
        return found

    def fqdn_selectors(self) -> list[FqdnSelector]:
        """Every toFQDNs selector of the policies (the writer gives identities only to those in use)."""
        self._desired.compiled(self.inputs, idm.RESERVED_WORLD)  # brings the engine up to the inputs
        return sorted(self._desired.engine.fqdn_selectors(), key=str)
