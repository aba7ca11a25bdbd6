"""Cilium's DNS name matching (pkg/fqdn/matchpattern tests' cases and the docs' examples)."""

from __future__ import annotations

import pytest

from propolis.model.matchpattern import FqdnSelector, anchored_regex, validate


def pattern(p: str) -> FqdnSelector:
    return FqdnSelector(match_pattern=p)


@pytest.mark.parametrize("p, yes, no", [
    ("*", ["cilium.io", "a.b.c.", "www.cilium.io."], []),
    ("*.cilium.io", ["www.cilium.io", "WWW.Cilium.IO.", "_srv.cilium.io"], ["cilium.io", "a.b.cilium.io", "wwwcilium.io"]),
    ("*cilium.io", ["cilium.io", "subcilium.io"], ["sub.cilium.io", "ciliumxio"]),
    ("sub*.cilium.io", ["sub.cilium.io", "subway.cilium.io"], ["asub.cilium.io", "sub.x.cilium.io"]),
    ("**.cilium.io", ["a.cilium.io", "a.b.cilium.io"], ["cilium.io", "acilium.io"]),
    ("*.amazonaws.com", ["s3.amazonaws.com"], ["ec2.us-east-1.amazonaws.com", "amazonaws.com"]),
    ("api.stripe.com", ["api.stripe.com", "API.STRIPE.COM."], ["xapi.stripe.com", "api.stripe.com.evil"]),
])
def test_patterns(p, yes, no):
    sel = pattern(p)
    assert all(sel.matches(n) for n in yes), [n for n in yes if not sel.matches(n)]
    assert not any(sel.matches(n) for n in no), [n for n in no if sel.matches(n)]


def test_match_name_is_exact_case_insensitive_trailing_dot():
    sel = FqdnSelector(match_name="Example.ORG")
    assert sel.matches("example.org.") and sel.matches("EXAMPLE.org")
    assert not sel.matches("www.example.org") and not sel.matches("example.org.uk")
    assert sel.label == "fqdn:example.org."


def test_dots_are_literal_not_any_character():
    assert not pattern("a.b.com").matches("axb.com") and anchored_regex("a.b").startswith("^a[.]b[.]")


@pytest.mark.parametrize("name, pat, why", [
    ("", "", "exactly one"), ("a.com", "*.a.com", "exactly one"), ("bad name.com", "", "characters"),
    ("", "a*$.com", "characters"), ("a" * 256, "", "longer than 255"), ("", "a.**.com", "leading"),
])
def test_invalid_selectors_are_refused_naming_the_field(name, pat, why):
    with pytest.raises(ValueError, match=why):
        validate(name, pat)
