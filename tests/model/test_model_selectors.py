"""LabelSelector matching with Cilium label sources, checked directly and through the SelectorCache index."""

import pytest

from propolis.errors import ValidationError
from propolis.model.labels import LabelSet
from propolis.model.selectors import parse_label_selector
from propolis.policy.selectorcache import SelectorCache

WEB = LabelSet.from_strings(["k8s:app=web", "k8s:tier=front", "k8s:io.kubernetes.pod.namespace=prod",
                             "k8s:io.cilium.k8s.namespace.labels.env=production"])
DB = LabelSet.from_strings(["k8s:app=db", "k8s:io.kubernetes.pod.namespace=prod"])
CONTAINER = LabelSet.from_strings(["container:app=web"])
HOST = LabelSet.from_strings(["reserved:host"])
EMPTY = LabelSet()

CASES = [
    ({}, [WEB, DB, CONTAINER, HOST, EMPTY], []),
    ({"matchLabels": {"app": "web"}}, [WEB, CONTAINER], [DB, HOST, EMPTY]),
    ({"matchLabels": {"k8s:app": "web"}}, [WEB], [CONTAINER, DB]),
    ({"matchLabels": {"any:app": "web"}}, [WEB, CONTAINER], [DB]),
    ({"matchLabels": {"container:app": "web"}}, [CONTAINER], [WEB]),
    ({"matchLabels": {"reserved:host": ""}}, [HOST], [WEB, EMPTY]),
    ({"matchLabels": {"k8s:io.kubernetes.pod.namespace": "prod"}}, [WEB, DB], [HOST]),
    ({"matchLabels": {"io.kubernetes.pod.namespace": "prod", "app": "db"}}, [DB], [WEB]),
    ({"matchLabels": {"io.cilium.k8s.namespace.labels.env": "production"}}, [WEB], [DB]),
    ({"matchExpressions": [{"key": "app", "operator": "In", "values": ["web", "db"]}]}, [WEB, DB, CONTAINER], [HOST]),
    ({"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["web"]}]}, [DB, HOST, EMPTY], [WEB, CONTAINER]),
    ({"matchExpressions": [{"key": "k8s:app", "operator": "NotIn", "values": ["web"]}]}, [DB, CONTAINER, HOST], [WEB]),
    ({"matchExpressions": [{"key": "tier", "operator": "Exists"}]}, [WEB], [DB, HOST]),
    ({"matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]}, [DB, HOST, EMPTY], [WEB]),
    ({"matchLabels": {"app": "web"}, "matchExpressions": [{"key": "tier", "operator": "In", "values": ["front"]}]},
     [WEB], [CONTAINER, DB]),
    ({"matchLabels": {"app": "web"}, "matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]},
     [CONTAINER], [WEB]),
]


@pytest.mark.parametrize("doc, matching, not_matching", CASES)
def test_selector_matches(doc, matching, not_matching):
    sel = parse_label_selector(doc, "sel")
    for ls in matching:
        assert sel.matches(ls), (doc, ls)
    for ls in not_matching:
        assert not sel.matches(ls), (doc, ls)


@pytest.mark.parametrize("doc, matching, not_matching", CASES)
def test_selector_cache_agrees_with_direct_matching(doc, matching, not_matching):
    cache = SelectorCache()
    table = {n: ls for n, ls in enumerate([WEB, DB, CONTAINER, HOST, EMPTY], start=256)}
    cache.set_identities(table)
    sel = parse_label_selector(doc, "sel")
    expected = {n for n, ls in table.items() if sel.matches(ls)}
    assert cache.select(sel) == expected
    assert {table[n] for n in expected} >= set(matching)


def test_selector_cache_incremental_updates():
    cache = SelectorCache()
    web = parse_label_selector({"matchLabels": {"app": "web"}}, "s")
    assert cache.select(web) == frozenset()
    changed = cache.upsert_identity(300, WEB)
    assert changed == {web} and cache.select(web) == {300}
    assert cache.upsert_identity(300, WEB) == set()  # unchanged
    assert cache.upsert_identity(300, DB) == {web} and cache.select(web) == frozenset()
    cache.upsert_identity(301, CONTAINER)
    assert cache.select(web) == {301}
    assert cache.remove_identity(301) == {web} and cache.select(web) == frozenset()
    assert cache.selections() == {str(web): []}


def test_canonical_form_is_order_independent():
    a = parse_label_selector({"matchLabels": {"a": "1", "b": "2"}}, "s")
    b = parse_label_selector({"matchExpressions": [{"key": "b", "operator": "In", "values": ["2"]}],
                              "matchLabels": {"a": "1"}}, "s")
    assert a == b and str(a) == "{any:a=1, any:b=2}"


def test_key_prefix_and_default_source():
    sel = parse_label_selector({"matchLabels": {"team": "x"}}, "s", key_prefix="io.cilium.k8s.namespace.labels.",
                               default_source="k8s", allow_source=False)
    assert str(sel) == "{k8s:io.cilium.k8s.namespace.labels.team=x}"


@pytest.mark.parametrize("doc, field", [
    ("x", "sel"),
    ({"matchLabel": {}}, "sel.matchLabel"),
    ({"matchLabels": []}, "sel.matchLabels"),
    ({"matchLabels": {"app": 1}}, "sel.matchLabels.app"),
    ({"matchLabels": {"app": "has space"}}, "sel.matchLabels.app"),
    ({"matchLabels": {"bad key!": "x"}}, "sel.matchLabels.bad key!"),
    ({"matchExpressions": {}}, "sel.matchExpressions"),
    ({"matchExpressions": [{"key": "a", "operator": "Equals", "values": ["x"]}]}, "sel.matchExpressions[0].operator"),
    ({"matchExpressions": [{"key": "a", "operator": "In"}]}, "sel.matchExpressions[0].values"),
    ({"matchExpressions": [{"key": "a", "operator": "In", "values": []}]}, "sel.matchExpressions[0].values"),
    ({"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]}, "sel.matchExpressions[0].values"),
    ({"matchExpressions": [{"operator": "Exists"}]}, "sel.matchExpressions[0].key"),
    ({"matchExpressions": [{"key": "a", "operator": "Exists", "value": "x"}]}, "sel.matchExpressions[0].value"),
    ({"matchExpressions": [{"key": "a", "operator": "In", "values": [3]}]}, "sel.matchExpressions[0].values[0]"),
])
def test_bad_selectors_name_the_field(doc, field):
    with pytest.raises(ValidationError) as err:
        parse_label_selector(doc, "sel")
    assert err.value.field == field
