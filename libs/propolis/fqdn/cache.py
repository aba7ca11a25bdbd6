"""The FQDN cache: which IPs each name resolved to, until when (Cilium's DNSCache + DNSZombieMappings).

Retention as Cilium's: an entry lives `max(ttl, min_ttl)` from its lookup; at most
`max_ips_per_hostname` IPs per name (the entries expiring first are evicted); an expired
IP with live conntrack entries becomes a *zombie* and is kept while connections use it,
then for `idle_connection_grace_period` after it was last seen alive. Everything is JSON
so the dns-proxy can persist it in its bus bucket and restore it after a restart.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

from propolis.model.matchpattern import FqdnSelector, fqdn

DEFAULT_MIN_TTL = 0  # --tofqdns-min-ttl since Cilium 1.14
DEFAULT_MAX_IPS_PER_HOSTNAME = 1000  # --tofqdns-endpoint-max-ip-per-hostname (1.19 chart)
DEFAULT_IDLE_CONNECTION_GRACE_S = 0.0  # --tofqdns-idle-connection-grace-period


@dataclass
class CacheEntry:
    """One (name, IP) as `cilium fqdn cache list` shows it."""

    name: str
    ip: str
    lookup_time: float
    ttl: int
    expires_at: float
    zombie: bool = False
    alive_at: float = 0.0  # a zombie: when conntrack last showed a connection to it

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class FqdnCache:
    def __init__(self, *, min_ttl: int = DEFAULT_MIN_TTL, max_ips_per_hostname: int = DEFAULT_MAX_IPS_PER_HOSTNAME,
                 idle_connection_grace_s: float = DEFAULT_IDLE_CONNECTION_GRACE_S) -> None:
        self.min_ttl = min_ttl
        self.max_ips_per_hostname = max_ips_per_hostname
        self.idle_connection_grace_s = idle_connection_grace_s
        self.entries: dict[str, dict[str, CacheEntry]] = {}

    def update(self, name: str, ips: Iterable[str], ttl: int, now: float) -> list[str]:
        """Record an answer; returns the IPs that are new for this name (they need identities/policy)."""
        name = fqdn(name)
        table = self.entries.setdefault(name, {})
        new = []
        for ip in ips:
            entry = table.get(ip)
            if entry is None:
                new.append(ip)
            expires = now + max(ttl, self.min_ttl)
            if entry is None or entry.zombie or expires >= entry.expires_at:
                table[ip] = CacheEntry(name, ip, now, ttl, expires)
        if len(table) > self.max_ips_per_hostname:
            for victim in sorted(table.values(), key=lambda e: e.expires_at)[: len(table) - self.max_ips_per_hostname]:
                del table[victim.ip]
                if victim.ip in new:
                    new.remove(victim.ip)
        return new

    def expire(self, now: float, alive: Callable[[str], bool] = lambda ip: False) -> list[tuple[str, str]]:
        """Drop expired entries; an expired IP `alive` says is in use stays as a zombie. Returns what was removed."""
        removed = []
        for name, table in list(self.entries.items()):
            for ip, entry in list(table.items()):
                if entry.expires_at > now:
                    continue
                if alive(ip):
                    entry.zombie, entry.alive_at = True, now
                    continue
                if entry.zombie and now - entry.alive_at < self.idle_connection_grace_s:
                    continue
                del table[ip]
                removed.append((name, ip))
            if not table:
                del self.entries[name]
        return removed

    def ips_for(self, selector: FqdnSelector) -> set[str]:
        """Every IP a name this selector matches resolved to (zombies included: connections keep working)."""
        return {ip for name, table in self.entries.items() if selector.matches(name) for ip in table}

    def names_for(self, ip: str) -> list[str]:
        """Hubble's destination_names for a flow to `ip`."""
        return sorted(name for name, table in self.entries.items() if ip in table)

    def dump(self) -> list[CacheEntry]:
        return sorted((e for table in self.entries.values() for e in table.values()), key=lambda e: (e.name, e.ip))

    def to_json(self) -> list[dict[str, Any]]:
        return [e.to_json() for e in self.dump()]

    def restore(self, rows: Iterable[dict[str, Any]]) -> None:
        """Load what `to_json` wrote (a restarted dns-proxy); rows that do not fit are skipped, not fatal."""
        for row in rows:
            try:
                entry = CacheEntry(**row)
            except TypeError:
                continue
            self.entries.setdefault(fqdn(entry.name), {})[entry.ip] = entry
