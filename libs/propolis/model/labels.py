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

from typing import Iterable, Iterator, Mapping, NamedTuple

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
    def from_strings(cls, labels: Iterable[str]) -> "LabelSet":
        return cls(parse_label(s) for s in labels)

    @classmethod
    def from_map(cls, mapping: Mapping[str, str], source: str = SOURCE_K8S) -> "LabelSet":
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

    def union(self, other: Iterable[Label]) -> "LabelSet":
        return LabelSet([*self._labels, *other])
