"""Cilium's DNS name matching for `rules.dns` and `toFQDNs` (pkg/fqdn/matchpattern), exactly.

* `matchName`: the whole name, case-insensitive, trailing dot optional on both sides.
* `matchPattern`: `*` alone matches every name; otherwise `*` is zero or more DNS characters
  (`[-a-zA-Z0-9_]`) *within one label* (`*.cilium.io` = exactly one label below, `*cilium.io` =
  names ending with "cilium.io" without another dot, `sub*.cilium.io` = a label prefix); a
  leading `**.` is one or more labels of any depth (`**.cilium.io`: a.cilium.io, a.b.cilium.io,
  not cilium.io).

Why compiled regexes: Cilium compiles each selector into one anchored regex; doing the same keeps
corner cases (characters, anchoring, the trailing dot) identical.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

DNS_CHARS = "[-a-zA-Z0-9_]"
MATCH_ALL_ANCHORED = rf"^(?:{DNS_CHARS}+[.])+$|^[.]$"
SUBDOMAIN_WILDCARD = "**."
MAX_NAME_LENGTH = 255
_NAME_CHARS = re.compile(r"^[-a-zA-Z0-9_.]+$")
_PATTERN_CHARS = re.compile(r"^[-a-zA-Z0-9_.*]+$")


def fqdn(name: str) -> str:
    """Lower-case with exactly one trailing dot (Cilium's dns.FQDN after ToLower)."""
    name = name.strip().lower()
    return name if name.endswith(".") else name + "."


def validate(match_name: str = "", match_pattern: str = "") -> None:
    """Cilium's selector validation; raises ValueError saying which field and why."""
    if bool(match_name) == bool(match_pattern):
        raise ValueError("exactly one of matchName or matchPattern is required")
    value, chars, field = ((match_name, _NAME_CHARS, "matchName") if match_name
                           else (match_pattern, _PATTERN_CHARS, "matchPattern"))
    if len(value) > MAX_NAME_LENGTH:
        raise ValueError(f"{field}: longer than {MAX_NAME_LENGTH} characters")
    if not chars.match(value):
        raise ValueError(f"{field}: {value!r} has characters outside {chars.pattern[1:-2]}")
    if match_pattern and "**" in match_pattern.removeprefix(SUBDOMAIN_WILDCARD):
        raise ValueError(f"matchPattern: `**` is allowed only as a leading `**.`, got {match_pattern!r}")


def anchored_regex(pattern: str) -> str:
    """The anchored regex Cilium builds for a matchPattern (ToAnchoredRegexp)."""
    pattern = pattern.strip().lower()
    if pattern == "*":
        return MATCH_ALL_ANCHORED
    pattern = fqdn(pattern)
    prefix = ""
    if pattern.startswith(SUBDOMAIN_WILDCARD):
        prefix, pattern = rf"(?:{DNS_CHARS}+[.])+", pattern[len(SUBDOMAIN_WILDCARD):]
    body = "".join(f"{DNS_CHARS}*" if c == "*" else ("[.]" if c == "." else re.escape(c)) for c in pattern)
    return "^" + prefix + body + "$"


@dataclass(frozen=True)
class FqdnSelector:
    """One `matchName` or `matchPattern` (a DNS rule or a toFQDNs entry); `str()` is Cilium's selector text."""

    match_name: str = ""
    match_pattern: str = ""

    def __post_init__(self) -> None:
        validate(self.match_name, self.match_pattern)

    def __str__(self) -> str:
        return f"MatchName: {self.match_name}, MatchPattern: {self.match_pattern}"

    def matches(self, name: str) -> bool:
        if self.match_name:
            return fqdn(name) == fqdn(self.match_name)
        return _compiled(self.match_pattern).match(fqdn(name)) is not None

    @property
    def key(self) -> str:
        """The key of the `fqdn:` label this selector selects and its learned IPs carry."""
        return fqdn(self.match_name) if self.match_name else self.match_pattern.lower()

    @property
    def label(self) -> str:
        """The identity label of IPs this selector learned (`fqdn:<selector>`, as Cilium's)."""
        return "fqdn:" + self.key


@lru_cache(maxsize=4096)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(anchored_regex(pattern))


def any_matches(selectors: tuple[FqdnSelector, ...] | list[FqdnSelector], name: str) -> bool:
    return any(s.matches(name) for s in selectors)
