"""Name resolution as a pod does it: its own resolv.conf, queries sent from inside its namespace.

Why not ask the API: `sandbox probe FROM NAME` must show what the pod itself would get —
through kube-dns (its search list, ndots 5), the world's DNS behind it, and whatever
policy or DNS proxy sits on the way — so the query is real and leaves from the pod.
"""

from __future__ import annotations

import asyncio

import dns.exception
import dns.resolver

from propolis.errors import CliError
from propolis_sandbox import netns as netns_mod

RESOLVE_TIMEOUT_S = 3.0


def resolve_blocking(netns: str, name: str, *, timeout: float = RESOLVE_TIMEOUT_S) -> list[str]:
    """A records of `name` as resolved by the pod in `netns` (in the calling thread: it enters the namespace)."""
    conf = netns_mod.resolv_conf_dir(netns) / "resolv.conf"
    if not conf.exists():
        raise CliError(f"{netns} has no resolver configuration ({conf}): the kubelet writes it when it wires the pod")
    resolver = dns.resolver.Resolver(filename=str(conf))
    resolver.lifetime = timeout
    resolver.cache = None
    try:
        with netns_mod.entered(netns):
            answer = resolver.resolve(name, "A", search=True)
    except dns.resolver.NXDOMAIN as exc:
        tried = exc.qnames()  # type: ignore[no-untyped-call]  # dnspython leaves NXDOMAIN.qnames unannotated
        raise CliError(f"{name}: no such name (NXDOMAIN; tried {', '.join(str(n) for n in tried)})") from None
    except (dns.resolver.NoAnswer, dns.resolver.NoNameservers) as exc:
        raise CliError(f"{name}: no address ({exc})") from None
    except dns.exception.Timeout:
        servers = ", ".join(str(n) for n in resolver.nameservers)
        raise CliError(f"{name}: no DNS answer within {timeout:.0f} s from {servers}") from None
    return [rr.to_text() for rr in answer]


async def resolve(netns: str, name: str, *, timeout: float = RESOLVE_TIMEOUT_S) -> list[str]:
    return await asyncio.to_thread(resolve_blocking, netns, name, timeout=timeout)
