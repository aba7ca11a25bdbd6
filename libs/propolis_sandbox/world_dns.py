"""The world's authoritative DNS: the test zones toFQDNs policies and probes resolve against.

Why these names: the seed's `allow-aws-egress` allows `*.amazonaws.com` and
`api.stripe.com`, so the zone has several AWS names with more than one address each,
`api.stripe.com`, and names no policy here allows (`example.org`). Names whose
address changes on every answer and short/long TTLs exercise the FQDN cache.
Every address lives in the world namespace (on its loopback, `world.py`),
so a name resolved here is a host that answers.

Run in the world namespace: `python -m propolis_sandbox.world_dns --listen 198.51.100.53`.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import signal
import sys

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from propolis_sandbox.dns_server import DnsServer, bound_sockets
from propolis_sandbox.world import WORLD_ZONE, ZoneRecord


class WorldZone:
    """Answers from `WORLD_ZONE`, authoritatively: NXDOMAIN for other names, NOERROR/no data for other types."""

    def __init__(self, zone: dict[str, ZoneRecord] | None = None) -> None:
        self.zone = {k.lower(): v for k, v in (zone or WORLD_ZONE).items()}
        self.cursors = {name: itertools.cycle(r.addresses) for name, r in self.zone.items() if r.rotate}

    def addresses(self, name: str) -> tuple[list[str], int] | None:
        record = self.zone.get(name.lower())
        if record is None:
            return None
        if record.rotate:
            return [next(self.cursors[name.lower()])], record.ttl
        return list(record.addresses), record.ttl

    async def answer(self, query: dns.message.Message) -> dns.message.Message:
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        question = query.question[0]
        found = self.addresses(question.name.to_text())
        if found is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
        elif question.rdtype in (dns.rdatatype.A, dns.rdatatype.ANY):
            addrs, ttl = found
            response.answer.append(dns.rrset.from_text_list(question.name, ttl, dns.rdataclass.IN,
                                                            dns.rdatatype.A, addrs))
        return response


async def serve(listen: str, port: int) -> None:
    server = DnsServer(WorldZone().answer)
    await server.start(*bound_sockets(listen, port))
    print("ready", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, help="address to serve on (UDP and TCP)")
    parser.add_argument("--port", type=int, default=53)
    args = parser.parse_args(argv)
    try:
        asyncio.run(serve(args.listen, args.port))
    except OSError as exc:
        print(f"world-dns: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
