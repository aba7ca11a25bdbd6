"""Label/field selector parsing and matching, and the three PATCH flavours, as kube-apiserver has them."""

from __future__ import annotations

import pytest

from propolis.errors import ValidationError
from propolis_sandbox.api_patch import json_patch, merge_patch, strategic_merge_patch
from propolis_sandbox.api_selectors import parse_field_selector, parse_label_selector

LABELS = {"app": "web", "tier": "front", "team": "a"}


@pytest.mark.parametrize("selector, expected", [
    ("", True),
    ("app=web", True),
    ("app==web", True),
    ("app=db", False),
    ("app!=db", True),
    ("app!=web", False),
    ("missing!=x", True),          # != matches objects without the label
    ("app in (web,db)", True),
    ("app in (db)", False),
    ("app notin (db, cache)", True),
    ("app notin (web)", False),
    ("missing notin (x)", True),   # notin too
    ("tier", True),
    ("missing", False),
    ("!missing", True),
    ("!tier", False),
    ("app=web,tier in (front),!missing", True),
    ("app=web, tier=back", False),
    ("example.com/key=v", False),
])
def test_label_selector_semantics(selector: str, expected: bool) -> None:
    assert parse_label_selector(selector).matches(LABELS) is expected


@pytest.mark.parametrize("bad", ["app in ()", "=web", "app in (a,,b)", "Bad Key=1", "a=b=c"])
def test_label_selector_syntax_errors_name_the_parameter(bad: str) -> None:
    with pytest.raises(ValidationError) as err:
        parse_label_selector(bad)
    assert err.value.field == "labelSelector"


def test_equality_with_empty_value_matches_empty_label() -> None:
    assert parse_label_selector("app=").matches({"app": ""})
    assert not parse_label_selector("app=").matches({"app": "x"})


def test_field_selector_supported_fields_only() -> None:
    pod = {"metadata": {"name": "a", "namespace": "ns"}, "spec": {"nodeName": "n1"}, "status": {"phase": "Running"}}
    supported = frozenset({"metadata.name", "metadata.namespace", "spec.nodeName", "status.phase"})
    assert parse_field_selector("spec.nodeName=n1,status.phase!=Pending", supported, "pods").matches(pod)
    assert not parse_field_selector("spec.nodeName==n2", supported, "pods").matches(pod)
    assert parse_field_selector("spec.nodeName!=", supported, "pods").matches(pod)  # "scheduled pods"
    with pytest.raises(ValidationError, match="field label not supported: spec.bogus"):
        parse_field_selector("spec.bogus=1", supported, "pods")


def test_merge_patch_rfc7386() -> None:
    doc = {"a": {"b": 1, "c": 2}, "l": [1, 2], "x": 1}
    assert merge_patch(doc, {"a": {"b": None, "d": 3}, "l": [3], "x": None}) == {"a": {"c": 2, "d": 3}, "l": [3]}


def test_strategic_merge_merges_keyed_lists() -> None:
    status = {"conditions": [{"type": "Ready", "status": "False"}, {"type": "PodScheduled", "status": "True"}]}
    out = strategic_merge_patch(status, {"conditions": [{"type": "Ready", "status": "True"}]})
    assert out["conditions"] == [{"type": "Ready", "status": "True"}, {"type": "PodScheduled", "status": "True"}]
    out = strategic_merge_patch(status, {"conditions": [{"type": "Ready", "$patch": "delete"}]})
    assert out["conditions"] == [{"type": "PodScheduled", "status": "True"}]
    # an unkeyed list is replaced as in merge patch
    assert strategic_merge_patch({"args": ["a", "b"]}, {"args": ["c"]}) == {"args": ["c"]}


def test_json_patch_operations_and_errors() -> None:
    doc = {"metadata": {"labels": {"a": "1"}}, "spec": {"list": [1, 2]}}
    out = json_patch(doc, [
        {"op": "add", "path": "/metadata/labels/b~1c", "value": "2"},
        {"op": "replace", "path": "/spec/list/0", "value": 9},
        {"op": "add", "path": "/spec/list/-", "value": 3},
        {"op": "remove", "path": "/metadata/labels/a"},
        {"op": "test", "path": "/spec/list/1", "value": 2},
    ])
    assert out == {"metadata": {"labels": {"b/c": "2"}}, "spec": {"list": [9, 2, 3]}}
    with pytest.raises(ValidationError) as err:
        json_patch(out, [{"op": "remove", "path": "/nope"}])
    assert err.value.field.startswith("[0]")
