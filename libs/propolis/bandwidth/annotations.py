"""The pod annotations the Bandwidth Manager enforces, in Kubernetes quantity syntax (10M, 100M, 1G, 512Ki).

Bounds are the kubelet's (`ExtractPodBandwidthResources`: at least 1k, at most 1P bits per second).
A value that does not parse is an error naming the annotation; the datapath-writer keeps that pod's
last enforced limits and reports it (never more open because of a typo).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from propolis.errors import ValidationError

EGRESS_BANDWIDTH = "kubernetes.io/egress-bandwidth"
INGRESS_BANDWIDTH = "kubernetes.io/ingress-bandwidth"
ANNOTATIONS = (EGRESS_BANDWIDTH, INGRESS_BANDWIDTH)

MIN_BITS_PER_SECOND = 1_000
MAX_BITS_PER_SECOND = 10**15

_SUFFIXES: dict[str, int | Decimal] = {
    "": 1, "m": Decimal("0.001"), "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_QUANTITY = re.compile(r"^\+?(?P<number>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
                       r"(?:(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E)|[eE](?P<exponent>[+-]?[0-9]+))?$")


def parse_quantity(value: str, *, annotation: str) -> int:
    """Bits per second from a Kubernetes quantity; ValidationError naming `annotation` otherwise."""
    match = _QUANTITY.match(value.strip())
    if match is None:
        raise ValidationError(annotation, f"{value!r} is not a Kubernetes quantity (e.g. 10M, 100M, 1G)")
    try:
        number = Decimal(match["number"])
    except InvalidOperation:
        raise ValidationError(annotation, f"{value!r} is not a Kubernetes quantity (e.g. 10M, 100M, 1G)") from None
    scale = Decimal(10) ** int(match["exponent"]) if match["exponent"] else Decimal(_SUFFIXES[match["suffix"] or ""])
    bits = int(number * scale)
    if bits < MIN_BITS_PER_SECOND:
        raise ValidationError(annotation, f"{value!r} is unreasonably small (< 1k bits/s)")
    if bits > MAX_BITS_PER_SECOND:
        raise ValidationError(annotation, f"{value!r} is unreasonably large (> 1P bits/s)")
    return bits


@dataclass(frozen=True)
class BandwidthLimits:
    """A pod's limits in bits per second (0 = not limited in that direction)."""

    egress: int = 0
    ingress: int = 0

    def __bool__(self) -> bool:
        return bool(self.egress or self.ingress)


def pod_limits(annotations: Mapping[str, str]) -> BandwidthLimits:
    """The limits a pod's annotations ask for; ValidationError naming the first annotation that is wrong."""
    egress, ingress = (parse_quantity(str(annotations[a]), annotation=a) if a in annotations else 0
                       for a in ANNOTATIONS)
    return BandwidthLimits(egress=egress, ingress=ingress)
