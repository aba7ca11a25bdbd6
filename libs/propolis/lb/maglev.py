"""Maglev consistent hashing (Eisenbud et al., NSDI 2016), as Cilium's loadBalancer.algorithm=maglev.

Why: with random selection a flow's backend lives only in its conntrack entry; with Maglev
every node maps a 5-tuple to the same backend, and adding/removing one backend moves only
about 1/N of the flows. The table has M (prime) slots; each backend fills slots in the
order of its own permutation (offset, skip from two hashes of its name) until full.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from propolis.errors import ValidationError


def _hash(name: str, seed: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8, key=seed).digest(), "little")


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    i = 2
    while i * i <= n:
        if n % i == 0:
            return False
        i += 1
    return True


def maglev_table(backends: Sequence[str], size: int) -> list[int]:
    """Slot -> index into `backends` (names such as "10.0.0.1:80/TCP"). Empty -> []."""
    if not is_prime(size):
        raise ValidationError("maglev.tableSize", f"{size} is not prime")
    if not backends:
        return []
    if len(backends) > size:
        raise ValidationError("maglev.tableSize", f"{size} slots for {len(backends)} backends")
    offsets = [_hash(b, b"maglev-offset") % size for b in backends]
    skips = [_hash(b, b"maglev-skip") % (size - 1) + 1 for b in backends]
    nexts = [0] * len(backends)
    table = [-1] * size
    filled = 0
    while True:
        for i in range(len(backends)):
            while True:
                slot = (offsets[i] + nexts[i] * skips[i]) % size
                nexts[i] += 1
                if table[slot] < 0:
                    break
            table[slot] = i
            filled += 1
            if filled == size:
                return table
