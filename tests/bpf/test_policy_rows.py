"""Abstract policy entries -> policy-map rows (no kernel needed)."""

from __future__ import annotations

import pytest

from propolis.datapath import PolicyEntry
from propolis.errors import ValidationError
from propolis.maps.policy import POLICY_PREFIX_STATIC, PolicyRowKey, compute_rows, describe_row, port_blocks


@pytest.mark.parametrize("first,last", [(0, 65535), (80, 80), (8000, 8100), (1, 65534), (1024, 2047), (7, 9)])
def test_port_blocks_cover_exactly(first, last):
    covered = []
    for start, bits in port_blocks(first, last):
        size = 1 << (16 - bits)
        assert start % size == 0
        covered.extend(range(start, start + size))
    assert covered == list(range(first, last + 1))


def test_port_range_blocks_are_few():
    assert len(port_blocks(8000, 8100)) <= 2 * 16
    assert port_blocks(0, 65535) == [(0, 0)]


def test_wildcards_become_short_prefixes():
    rows = compute_rows([PolicyEntry("ingress", identity=7), PolicyEntry("egress", protocol=17)])
    keys = sorted(rows)
    assert PolicyRowKey(7, 0, POLICY_PREFIX_STATIC, 0, 0) in rows
    assert PolicyRowKey(0, 1, POLICY_PREFIX_STATIC + 8, 17, 0) in rows
    assert len(keys) == 2


def test_any_protocol_with_port_means_tcp_udp_sctp():
    rows = compute_rows([PolicyEntry("ingress", port=53)])
    assert sorted(k.protocol for k in rows) == [6, 17, 132]


def test_covered_allow_becomes_deny_but_others_stay():
    rows = compute_rows([
        PolicyEntry("ingress", identity=5, protocol=6, port=80),
        PolicyEntry("ingress", identity=5, protocol=6, port=81),
        PolicyEntry("ingress", identity=5, protocol=6, port=80, end_port=80, deny=True),
        PolicyEntry("ingress", identity=6, protocol=6, port=443),
        PolicyEntry("ingress", identity=6, deny=True),
    ])
    by_port = {(k.sec_label, k.dport): v.deny for k, v in rows.items()}
    assert by_port[(5, 80)] is True and by_port[(5, 81)] is False
    assert by_port[(6, 443)] is True and by_port[(6, 0)] is True


def test_same_key_merges_deny_first_and_keeps_proxy_port():
    rows = compute_rows([PolicyEntry("egress", 9, 6, 80, proxy_port=15001), PolicyEntry("egress", 9, 6, 80)])
    (value,) = rows.values()
    assert value.proxy_port == 15001 and not value.deny
    desc = describe_row(*next(iter(rows.items())))
    assert desc["port_protocol"] == "80/TCP" and desc["proxy_port"] == 15001


@pytest.mark.parametrize("bad,field", [
    (PolicyEntry("sideways"), "direction"),  # type: ignore[arg-type]
    (PolicyEntry("ingress", port=70000), "port"),
    (PolicyEntry("ingress", protocol=6, port=90, end_port=80), "end_port"),
    (PolicyEntry("ingress", protocol=300), "protocol"),
])
def test_bad_entries_name_the_field(bad, field):
    with pytest.raises(ValidationError) as err:
        compute_rows([bad])
    assert err.value.field.endswith(field)
