"""Label and field selectors with the Kubernetes query syntax, for the sandbox API's list and watch.

Why our own parser: the sandbox API must answer `?labelSelector=` and
`?fieldSelector=` exactly as kube-apiserver does (including `!=` and `notin`
matching objects that lack the label), because the watcher and kubelet rely
on those semantics. Syntax errors raise ValidationError naming the parameter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from propolis.errors import ValidationError
from propolis.model.labels import echo, label_key_problems, label_value_problems

_EQUALITY_RE = re.compile(r"^\s*([^\s!=]+)\s*(==|!=|=)\s*(.*?)\s*$")
_SET_RE = re.compile(r"^\s*([^\s!=(]+)\s+(in|notin)\s*\((.*)\)\s*$")

Obj = dict[str, Any]


@dataclass(frozen=True)
class Requirement:
    """One term of a label selector: `key op values` (ops: in, notin, exists, !exists)."""

    key: str
    op: str
    values: frozenset[str] = frozenset()

    def matches(self, labels: dict[str, str]) -> bool:
        present = self.key in labels
        if self.op == "exists":
            return present
        if self.op == "!exists":
            return not present
        if self.op == "in":
            return present and labels[self.key] in self.values
        return not present or labels[self.key] not in self.values  # notin / !=


@dataclass(frozen=True)
class LabelSelector:
    """A parsed `labelSelector`; the empty selector matches everything."""

    requirements: tuple[Requirement, ...] = ()

    def matches(self, labels: dict[str, str] | None) -> bool:
        labels = labels or {}
        return all(r.matches(labels) for r in self.requirements)


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside parentheses."""
    parts: list[str] = []
    current: list[str] = []
    depth = 0
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def check_label_key(key: str, field: str) -> str:
    if problems := label_key_problems(key):
        raise ValidationError(field, f"invalid label key {echo(key)}: {problems[0]}")
    return key


def check_label_value(value: str, field: str) -> str:
    if problems := label_value_problems(value):
        raise ValidationError(field, f"invalid label value {echo(value)}: {problems[0]}")
    return value


def parse_label_selector(text: str | None, field: str = "labelSelector") -> LabelSelector:
    """`a=b,c!=d,e in (x,y),f notin (z),g,!h` -> LabelSelector; ValidationError(field, …) on bad syntax."""
    if not text or not text.strip():
        return LabelSelector()
    reqs: list[Requirement] = []
    for term in _split_top_level(text):
        term = term.strip()
        if not term:
            raise ValidationError(field, f"empty term in selector {text!r}")
        if m := _SET_RE.match(term):
            values = [v.strip() for v in m.group(3).split(",")]
            if any(v == "" for v in values):
                raise ValidationError(field, f"for 'in', 'notin' operators, values set can't be empty or hold "
                                             f"an empty value: {term!r}")
            reqs.append(Requirement(check_label_key(m.group(1), field), m.group(2),
                                    frozenset(check_label_value(v, field) for v in values)))
        elif m := _EQUALITY_RE.match(term):
            op = "notin" if m.group(2) == "!=" else "in"
            reqs.append(Requirement(check_label_key(m.group(1), field), op, frozenset({check_label_value(m.group(3), field)})))
        elif term.startswith("!"):
            reqs.append(Requirement(check_label_key(term[1:].strip(), field), "!exists"))
        elif " " not in term and "(" not in term:
            reqs.append(Requirement(check_label_key(term, field), "exists"))
        else:
            raise ValidationError(field, f"unable to parse requirement {term!r}")
    return LabelSelector(tuple(reqs))


def selector_from_map(labels: dict[str, str]) -> LabelSelector:
    """A Service's `spec.selector` (equality on every key)."""
    return LabelSelector(tuple(Requirement(k, "in", frozenset({v})) for k, v in sorted(labels.items())))


@dataclass(frozen=True)
class FieldSelector:
    """A parsed `fieldSelector`: (path, equal?, value) terms over dotted object paths."""

    terms: tuple[tuple[str, bool, str], ...] = ()

    def matches(self, obj: Obj) -> bool:
        for path, equal, value in self.terms:
            if (field_value(obj, path) == value) != equal:
                return False
        return True


def field_value(obj: Obj, path: str) -> str:
    """The string form of a dotted path (missing -> ""), as field selectors compare it."""
    cur: Any = obj
    for part in path.split("."):
        cur = cur.get(part) if isinstance(cur, dict) else None
        if cur is None:
            return ""
    if isinstance(cur, bool):
        return "true" if cur else "false"
    return str(cur)


def parse_field_selector(text: str | None, supported: frozenset[str], plural: str,
                         field: str = "fieldSelector") -> FieldSelector:
    """`metadata.name=x,spec.nodeName!=` -> FieldSelector; an unsupported field is refused like kube-apiserver."""
    if not text or not text.strip():
        return FieldSelector()
    terms = []
    for term in text.split(","):
        m = _EQUALITY_RE.match(term)
        if not m:
            raise ValidationError(field, f"invalid selector: {term!r}; can't understand {term!r}")
        path, op, value = m.group(1), m.group(2), m.group(3)
        if path not in supported:
            raise ValidationError(field, f"field label not supported: {path} (for {plural}: "
                                         f"{', '.join(sorted(supported))})")
        terms.append((path, op != "!=", value))
    return FieldSelector(tuple(terms))
