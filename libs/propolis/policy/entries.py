"""The compiler's output rows: `PolicyEntry` (what a per-endpoint BPF policy map holds) and L7 notes.

Why here: the policy package is pure Python and must not import the datapath
(bcc, ctypes maps); the datapath re-exports `PolicyEntry` from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from propolis.policy.rules import L7Rules

Direction = Literal["ingress", "egress"]

PROTO_ANY = 0
PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ICMPV6 = 58
PROTO_SCTP = 132
PROTOCOL_NUMBERS = {"TCP": PROTO_TCP, "UDP": PROTO_UDP, "SCTP": PROTO_SCTP, "ICMP": PROTO_ICMP,
                    "ICMPv6": PROTO_ICMPV6, "ANY": PROTO_ANY}
PROTOCOL_NAMES = {v: k for k, v in PROTOCOL_NUMBERS.items()}

ICMP_TYPE_PORT_FLAG = 0x100


def icmp_type_port(icmp_type: int) -> int:
    """`PolicyEntry.port` of a rule for one ICMP type: the type with bit 8 set, so type 0
    (EchoReply) is a type and not port 0 = any (Cilium's open bug: an EchoReply rule matches
    every type). The datapath puts ICMP packets in the policy key the same way (bpf/lib/packet.h)."""
    return ICMP_TYPE_PORT_FLAG | icmp_type


@dataclass(frozen=True, order=True)
class PolicyEntry:
    """One allow/deny row for an endpoint.

    identity 0 = any peer; protocol 0 = any (6 TCP, 17 UDP, 132 SCTP, 1 ICMP, 58 ICMPv6);
    port 0 = any port (ICMP: `icmp_type_port(type)`); end_port 0 = single port, else the last
    port of the range; proxy_port != 0 = allow and redirect to that L7 proxy port (later).
    """

    direction: Direction
    identity: int = 0
    protocol: int = 0
    port: int = 0
    end_port: int = 0
    deny: bool = False
    proxy_port: int = 0

    def describe(self) -> str:
        peer = "any" if self.identity == 0 else str(self.identity)
        proto = PROTOCOL_NAMES.get(self.protocol, str(self.protocol))
        if self.protocol in (PROTO_ICMP, PROTO_ICMPV6) and self.port & ICMP_TYPE_PORT_FLAG:
            port = f"type-{self.port & 0xff}"
        else:
            port = "*" if self.port == 0 else str(self.port)
        if self.end_port:
            port += f"-{self.end_port}"
        verdict = "deny" if self.deny else (f"redirect:{self.proxy_port}" if self.proxy_port else "allow")
        return f"{self.direction} {peer} {proto}/{port} {verdict}"


@dataclass(frozen=True)
class L7Annotation:
    """The L7 rules that apply to one entry, and the policy they come from (for the L7 proxy later)."""

    kind: str  # "http" | "kafka" | "dns" | an l7proto name
    rules: L7Rules
    origin: str = ""
    server_names: tuple[str, ...] = ()
