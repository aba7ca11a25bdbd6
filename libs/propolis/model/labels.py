"""Cilium's label model: ``source:key=value`` labels and canonical label sets.

Why: a security identity *is* a set of labels; the sorted string form of a
``LabelSet`` is the key identities are allocated under, so two services that
derive the same labels always land on the same identity.

Parsing follows Cilium's ``labels.ParseLabel`` / ``ParseSelectLabel``:
``k8s:app=web`` has source ``k8s``; without a source a *label* gets ``unspec``
while a *selector key* gets ``any`` (matches every source); ``$host`` is the
short form of ``reserved:host``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, NamedTuple

from propolis.errors import ValidationError

SOURCE_K8S = "k8s"
SOURCE_RESERVED = "reserved"
SOURCE_CIDR = "cidr"
SOURCE_FQDN = "fqdn"
SOURCE_ANY = "any"
SOURCE_UNSPEC = "unspec"
SOURCE_CONTAINER = "container"

KNOWN_SOURCES = frozenset({SOURCE_K8S, SOURCE_RESERVED, SOURCE_CIDR, SOURCE_FQDN, SOURCE_ANY,
                           SOURCE_UNSPEC, SOURCE_CONTAINER, "cilium-generated", "node"})


class Label(NamedTuple):
    """One label. ``str()`` is Cilium's form: ``source:key=value`` or ``source:key`` when value is empty."""

    source: str
    key: str
    value: str = ""

    def __str__(self) -> str:
        return f"{self.source}:{self.key}={self.value}" if self.value else f"{self.source}:{self.key}"

    @property
    def selector_key(self) -> str:
        """``source:key`` as a selector would spell it."""
        return f"{self.source}:{self.key}"


def _split_source(text: str) -> tuple[str | None, str]:
    """``k8s:app=web`` -> ("k8s", "app=web"). A colon after '=' or '/' is part of key/value, not a source."""
    if text.startswith("$"):
        return SOURCE_RESERVED, text[1:]
    colon = text.find(":")
    if colon <= 0:
        return None, text
    head = text[:colon]
    if "=" in head or "/" in head:
        return None, text
    return head, text[colon + 1:]


def parse_label(text: str, *, default_source: str = SOURCE_UNSPEC) -> Label:
    """``k8s:app=web``, ``reserved:host``, ``$host``, ``app=web`` (source = default_source)."""
    if not isinstance(text, str) or not text:
        raise ValidationError("label", f"a label must be a non-empty string, not {text!r}")
    source, rest = _split_source(text)
    key, _, value = rest.partition("=")
    if not key:
        raise ValidationError("label", f"label {text!r} has an empty key")
    return Label(source or default_source, key, value)


# --- Kubernetes metadata.labels (apimachinery's IsQualifiedName / IsValidLabelValue) -------------
LABEL_VALUE_MAX = 63
LABEL_PREFIX_MAX = 253
ECHO_MAX = 40  # longer values are echoed truncated: an error must not repeat 10 KB of input
_NAME_PART = r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]"
_NAME_PART_RE = re.compile(rf"^{_NAME_PART}$")
_VALUE_RE = re.compile(rf"^({_NAME_PART})?$")
_DNS_SUBDOMAIN_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_NAME_PART_FORMAT = ("name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end "
                     "with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for "
                     f"validation is '{_NAME_PART}')")
_VALUE_FORMAT = ("a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and "
                 "must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', "
                 f"regex used for validation is '({_NAME_PART})?')")


def echo(value: Any) -> str:
    """A value as an error message shows it: quoted, and cut to ECHO_MAX characters with its length."""
    text = value if isinstance(value, str) else str(value)
    if len(text) > ECHO_MAX:
        text = f"{text[:ECHO_MAX]}...({len(text)} characters)"
    return f'"{text}"' if isinstance(value, str) else text


def label_key_problems(key: str) -> list[str]:
    """Why `key` is not a Kubernetes label key (optional DNS-subdomain prefix + '/' + name), in kube's words."""
    prefix, slash, name = key.rpartition("/")
    problems = []
    if slash and not prefix:
        problems.append("prefix part must be non-empty")
    elif slash and (len(prefix) > LABEL_PREFIX_MAX or not _DNS_SUBDOMAIN_RE.match(prefix)):
        problems.append("prefix part a lowercase RFC 1123 subdomain must consist of lower case alphanumeric "
                        "characters, '-' or '.', and must start and end with an alphanumeric character")
    if not name:
        problems.append("name part must be non-empty")
    else:
        if len(name) > LABEL_VALUE_MAX:
            problems.append(f"name part must be no more than {LABEL_VALUE_MAX} characters")
        if not _NAME_PART_RE.match(name):
            problems.append(_NAME_PART_FORMAT)
    return problems


def label_value_problems(value: str) -> list[str]:
    """Why `value` is not a Kubernetes label value, in kube's words (the length limit first)."""
    problems = []
    if len(value) > LABEL_VALUE_MAX:
        problems.append(f"must be no more than {LABEL_VALUE_MAX} characters")
    if not _VALUE_RE.match(value):
        problems.append(_VALUE_FORMAT)
    return problems


def kubernetes_label_errors(labels: Any, field: str = "metadata.labels") -> list[ValidationError]:
    """Every problem of a `metadata.labels` map, as kube-apiserver words them (long values echoed cut)."""
    if not isinstance(labels, Mapping):
        return [ValidationError(field, f"Invalid value: {echo(labels)}: must be a map of strings")]
    errors = []
    for key, value in labels.items():
        if not isinstance(key, str) or not isinstance(value, str):
            errors.append(ValidationError(field, f"Invalid value: {echo(value)}: must be a map of strings"))
            continue
        errors += [ValidationError(field, f"Invalid value: {echo(key)}: {p}") for p in label_key_problems(key)]
        errors += [ValidationError(field, f"Invalid value: {echo(value)}: {p}") for p in label_value_problems(value)]
    return errors


def parse_select_label(text: str) -> Label:
    """Like parse_label, but a missing source means ``any`` (Cilium's ParseSelectLabel)."""
    return parse_label(text, default_source=SOURCE_ANY)


def parse_selector_key(key: str) -> tuple[str, str]:
    """A selector key ``k8s:app`` -> ("k8s", "app"); ``app`` -> ("any", "app"); ``k8s.app`` is *not* special."""
    source, rest = _split_source(key)
    return (source or SOURCE_ANY), rest


class LabelSet:
    """An immutable, hashable set of labels with one canonical sorted form.

    At most one label per (source, key). ``str(ls)`` (and ``ls.key``) joins the
    sorted label strings with ``;`` and is the identity key.
    """

    __slots__ = ("_labels", "_by_key", "_hash", "_strings")

    def __init__(self, labels: Iterable[Label | str] = ()) -> None:
        by_key: dict[tuple[str, str], Label] = {}
        for item in labels:
            lbl = item if isinstance(item, Label) else parse_label(item)
            by_key[(lbl.source, lbl.key)] = lbl
        ordered = tuple(sorted(by_key.values(), key=str))
        self._labels = ordered
        self._by_key = by_key
        self._strings = tuple(str(lbl) for lbl in ordered)
        self._hash = hash(self._strings)

    @classmethod
    def from_strings(cls, labels: Iterable[str]) -> LabelSet:
        return cls(parse_label(s) for s in labels)

    @classmethod
    def from_map(cls, mapping: Mapping[str, str], source: str = SOURCE_K8S) -> LabelSet:
        return cls(Label(source, k, str(v)) for k, v in mapping.items())

    # --- set protocol ------------------------------------------------------------
    def __iter__(self) -> Iterator[Label]:
        return iter(self._labels)

    def __len__(self) -> int:
        return len(self._labels)

    def __contains__(self, item: object) -> bool:
        if isinstance(item, str):
            item = parse_label(item)
        return isinstance(item, Label) and self._by_key.get((item.source, item.key)) == item

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LabelSet) and self._strings == other._strings

    def __hash__(self) -> int:
        return self._hash

    def __str__(self) -> str:
        return ";".join(self._strings)

    def __repr__(self) -> str:
        return f"LabelSet({list(self._strings)!r})"

    @property
    def key(self) -> str:
        """The canonical identity key (sorted, ``;``-joined)."""
        return str(self)

    def strings(self) -> list[str]:
        """Sorted label strings (what the identities bucket stores)."""
        return list(self._strings)

    # --- lookups used by selectors -----------------------------------------------
    def get(self, source: str, key: str) -> list[Label]:
        """Labels with this key; source ``any`` matches every source."""
        if source == SOURCE_ANY:
            return [lbl for lbl in self._labels if lbl.key == key]
        lbl = self._by_key.get((source, key))
        return [lbl] if lbl is not None else []

    def has_source(self, source: str) -> bool:
        return any(lbl.source == source for lbl in self._labels)

    def union(self, other: Iterable[Label]) -> LabelSet:
        return LabelSet([*self._labels, *other])
