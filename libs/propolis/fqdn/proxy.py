"""The DNS proxy's decision core: check a redirected query, forward it, learn its answer, then release it.

Transport-free on purpose: the listener (UDP/TCP, transparent, in the node namespace) hands each
query here with who sent it and where it was going (the original destination); this module
decides and returns the bytes to send back, or None to drop. Per query:

1. parse (dnspython); what does not parse gets FORMERR (header readable) or is dropped;
2. the endpoint's DNS rules for that server and port (`rules_for`) must allow the name
   (Cilium's matching, `model/matchpattern.py`); otherwise `dnsRejectResponseCode` (REFUSED or
   NXDOMAIN) — no rules at all (the endpoint is not redirected for that server) drops: fail closed;
3. forward to the original destination (`exchange`);
4. every A record whose name matches a toFQDNs selector is handed to `learn` (which allocates
   the identity and writes ipcache and policy maps) and *awaited* before the answer is released,
   bounded by `proxyResponseMaxDelay` (100 ms): the first connection after a resolution is not
   dropped. A late `learn` keeps running; the answer is released at the bound (as Cilium does).
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype

from propolis.fqdn.wire import WireError, answer_a_records
from propolis.model.matchpattern import FqdnSelector, any_matches

log = logging.getLogger("propolis.fqdn.proxy")

PROXY_RESPONSE_MAX_DELAY_S = 0.1  # dnsProxy.proxyResponseMaxDelay
REJECT_RCODES = {"refused": dns.rcode.REFUSED, "nameError": dns.rcode.NXDOMAIN}  # dnsProxy.dnsRejectResponseCode
MAX_QUERY_SIZE = 65535


@dataclass(frozen=True)
class Redirected:
    """Who asked and where the query was going (the original destination, kept by the redirect)."""

    client_ip: str
    server_ip: str
    server_port: int = 53
    protocol: str = "UDP"
    client_port: int = 0


@dataclass
class Learned:
    """An answer's addresses for the names toFQDNs selectors want, handed to `learn` before release."""

    client_ip: str
    name: str
    ips: list[str]
    ttl: int
    selectors: list[FqdnSelector] = field(default_factory=list)


@dataclass
class Observation:
    """A query (rcode None) or its answer, for Hubble (`l7.flows.dns_flow`)."""

    where: Redirected
    query: str
    qtypes: list[str]
    verdict: str  # FORWARDED | DROPPED
    rcode: int | None = None
    ips: list[str] = field(default_factory=list)
    ttl: int = 0
    latency_ns: int = 0


#: rules_for(where) -> the DNS rules allowing names from that client to that server, port and protocol;
#: None = not redirected there by policy
RulesFor = Callable[[Redirected], "list[FqdnSelector] | None"]
Exchange = Callable[[bytes, Redirected], Awaitable[bytes]]
Learn = Callable[[Learned], Awaitable[None]]
Observe = Callable[[Observation], None]


def _formerr(wire: bytes) -> bytes | None:
    if len(wire) < 12 or wire[2] & 0x80:
        return None  # no header, or a response (never answered: no reflection)
    qid, flags = struct.unpack("!HH", wire[:4])
    return struct.pack("!HHHHHH", qid, 0x8000 | (flags & 0x7900) | dns.rcode.FORMERR, 0, 0, 0, 0)


class DnsProxy:
    def __init__(self, rules_for: RulesFor, exchange: Exchange, learn: Learn,
                 fqdn_selectors: Callable[[], list[FqdnSelector]], *, reject: str = "refused",
                 max_delay_s: float = PROXY_RESPONSE_MAX_DELAY_S, observe: Observe | None = None) -> None:
        if reject not in REJECT_RCODES:
            raise ValueError(f"dnsRejectResponseCode must be one of {sorted(REJECT_RCODES)}, got {reject!r}")
        self.rules_for = rules_for
        self.exchange = exchange
        self.learn = learn
        self.fqdn_selectors = fqdn_selectors
        self.reject_rcode = REJECT_RCODES[reject]
        self.max_delay_s = max_delay_s
        self.observe = observe
        self.stats = {"allowed": 0, "denied": 0, "formerr": 0, "dropped": 0, "upstream_errors": 0, "late_learns": 0}

    async def handle(self, wire: bytes, where: Redirected) -> bytes | None:
        rules = self.rules_for(where)
        if rules is None:
            self.stats["dropped"] += 1
            return None
        if len(wire) > MAX_QUERY_SIZE:
            self.stats["dropped"] += 1
            return None
        try:
            query = dns.message.from_wire(wire)
        except (dns.exception.DNSException, ValueError, IndexError, struct.error, UnicodeError):
            query = None
        if query is None or query.flags & dns.flags.QR or len(query.question) != 1:
            out = _formerr(wire) if query is None or not query.flags & dns.flags.QR else None
            self.stats["formerr" if out else "dropped"] += 1
            return out
        name = query.question[0].name.to_text()
        qtypes = [dns.rdatatype.to_text(query.question[0].rdtype)]
        started = time.perf_counter_ns()
        if not any_matches(rules, name):
            self.stats["denied"] += 1
            response = dns.message.make_response(query)
            response.set_rcode(self.reject_rcode)
            if self.observe is not None:
                self.observe(Observation(where, name, qtypes, "DROPPED"))
                self.observe(Observation(where, name, qtypes, "FORWARDED", rcode=int(self.reject_rcode)))
            return response.to_wire()
        self.stats["allowed"] += 1
        if self.observe is not None:
            self.observe(Observation(where, name, qtypes, "FORWARDED"))
        try:
            answer_wire = await self.exchange(wire, where)
            records = answer_a_records(answer_wire)
            if answer_wire[:2] != wire[:2]:
                raise WireError("the answer's id is not the query's")
        except (TimeoutError, OSError, ValueError) as exc:
            self.stats["upstream_errors"] += 1
            log.info("forwarding %s to %s: %s", name, where.server_ip, exc)
            response = dns.message.make_response(query)
            response.set_rcode(dns.rcode.SERVFAIL)
            return response.to_wire()
        await self._learn_before_release(name, records, where)
        if self.observe is not None:
            self.observe(Observation(where, name, qtypes, "FORWARDED", rcode=answer_wire[3] & 0x0F,
                                     ips=[ip for _, ips, _ in records for ip in ips],
                                     ttl=min((ttl for _, _, ttl in records), default=0),
                                     latency_ns=time.perf_counter_ns() - started))
        return answer_wire

    async def _learn_before_release(self, qname: str, records: list[tuple[str, list[str], int]],
                                    where: Redirected) -> None:
        """A records of the answer whose owner (or the query name, through a CNAME chain) a selector matches."""
        selectors = self.fqdn_selectors() if records else []
        learned = []
        for owner, ips, ttl in records:
            matching = [s for s in selectors if s.matches(owner) or s.matches(qname)]
            if matching:
                learned.append(Learned(where.client_ip, owner, ips, ttl, matching))
        if not learned:
            return
        task = asyncio.ensure_future(asyncio.gather(*(self.learn(item) for item in learned)))
        done, _ = await asyncio.wait({task}, timeout=self.max_delay_s)
        if not done:
            self.stats["late_learns"] += 1
            log.warning("policy for %s not written within %.0f ms: answer released anyway",
                        ", ".join(item.name for item in learned), self.max_delay_s * 1000)
