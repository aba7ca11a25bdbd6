"""Kubernetes LabelSelectors over security labels, with Cilium's label sources.

Why: every policy peer and subject is a selector; the selector cache
(propolis.policy.selectorcache) evaluates them against the identity table.

A selector key carries a source like a label: ``k8s:app`` matches only labels
of source ``k8s``; ``app`` (source ``any``) matches the key under any source;
``reserved:host`` matches the reserved host label. ``{}`` matches everything
(the caller adds the namespace scope, as Cilium does when it parses a CNP).
Operators follow Kubernetes: ``In``, ``NotIn`` (true when the key is absent),
``Exists``, ``DoesNotExist``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from propolis.errors import ValidationError
from propolis.model.labels import SOURCE_ANY, Label, LabelSet, parse_selector_key

OP_IN, OP_NOT_IN, OP_EXISTS, OP_DOES_NOT_EXIST = "In", "NotIn", "Exists", "DoesNotExist"
OPERATORS = (OP_IN, OP_NOT_IN, OP_EXISTS, OP_DOES_NOT_EXIST)

# Kubernetes qualified names: optional DNS-subdomain prefix '/', name of <= 63 chars.
_NAME = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)$")
_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def _check_key(key: str, where: str) -> None:
    prefix, slash, name = key.rpartition("/")
    if not name or len(name) > 63 or not _NAME.match(name) or (slash and (not prefix or len(prefix) > 253)):
        raise ValidationError(where, f"invalid label key {key!r}")


def _check_value(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ValidationError(where, f"label value must be a string, not {type(value).__name__}")
    if len(value) > 63 or not _VALUE.match(value):
        raise ValidationError(where, f"invalid label value {value!r}")
    return value


@dataclass(frozen=True, order=True)
class Requirement:
    """One condition: (source, key) ``operator`` values."""

    source: str
    key: str
    operator: str
    values: tuple[str, ...] = ()

    def __str__(self) -> str:
        k = f"{self.source}:{self.key}"
        if self.operator == OP_EXISTS:
            return k
        if self.operator == OP_DOES_NOT_EXIST:
            return f"!{k}"
        if self.operator == OP_IN and len(self.values) == 1:
            return f"{k}={self.values[0]}"
        op = "in" if self.operator == OP_IN else "notin"
        return f"{k} {op} ({','.join(self.values)})"

    def matches(self, labels: LabelSet) -> bool:
        found = labels.get(self.source, self.key)
        if self.operator == OP_EXISTS:
            return bool(found)
        if self.operator == OP_DOES_NOT_EXIST:
            return not found
        hit = any(lbl.value in self.values for lbl in found)
        return hit if self.operator == OP_IN else not hit


@dataclass(frozen=True)
class LabelSelector:
    """A conjunction of requirements; hashable, with a canonical string (the selector cache key)."""

    requirements: tuple[Requirement, ...] = ()

    @staticmethod
    def of(requirements: Iterable[Requirement]) -> LabelSelector:
        return LabelSelector(tuple(sorted(set(requirements))))

    def __str__(self) -> str:
        return "{" + ", ".join(str(r) for r in self.requirements) + "}" if self.requirements else "{}"

    @property
    def is_wildcard(self) -> bool:
        return not self.requirements

    def matches(self, labels: LabelSet) -> bool:
        return all(r.matches(labels) for r in self.requirements)

    def with_requirements(self, extra: Iterable[Requirement]) -> LabelSelector:
        return LabelSelector.of([*self.requirements, *extra])

    def has_key(self, source: str, key: str) -> bool:
        return any(r.source == source and r.key == key for r in self.requirements)

    def has_source(self, source: str) -> bool:
        return any(r.source == source for r in self.requirements)

    def value_of(self, source: str, key: str) -> str | None:
        for r in self.requirements:
            if r.source == source and r.key == key and r.operator == OP_IN and len(r.values) == 1:
                return r.values[0]
        return None


def equals(source: str, key: str, value: str) -> Requirement:
    return Requirement(source, key, OP_IN, (value,))


def exists(source: str, key: str) -> Requirement:
    return Requirement(source, key, OP_EXISTS)


def selector_for_label(label: Label) -> LabelSelector:
    return LabelSelector((equals(label.source, label.key, label.value),))


def parse_label_selector(doc: Any, where: str, *, key_prefix: str = "", default_source: str = SOURCE_ANY,
                         allow_source: bool = True) -> LabelSelector:
    """A k8s LabelSelector document -> LabelSelector, refusing unknown fields and bad values.

    ``key_prefix`` is put before every key (``io.cilium.k8s.namespace.labels.`` for
    namespaceSelectors); keys without a source get ``default_source``.
    """
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ValidationError(where, "must be a label selector (a mapping)")
    unknown = set(doc) - {"matchLabels", "matchExpressions"}
    if unknown:
        raise ValidationError(f"{where}.{sorted(unknown)[0]}", "unknown field")
    reqs: list[Requirement] = []

    def split(raw: Any, at: str) -> tuple[str, str]:
        if not isinstance(raw, str) or not raw:
            raise ValidationError(at, "label key must be a non-empty string")
        if allow_source:
            source, key = parse_selector_key(raw)
            if source == SOURCE_ANY and not raw.startswith("any:"):
                source = default_source
        else:
            source, key = default_source, raw
        _check_key(key, at)
        return source, key_prefix + key

    match_labels = doc.get("matchLabels")
    if match_labels is not None:
        if not isinstance(match_labels, dict):
            raise ValidationError(f"{where}.matchLabels", "must be a mapping of key to value")
        for raw_key, value in match_labels.items():
            at = f"{where}.matchLabels.{raw_key}"
            source, key = split(raw_key, at)
            reqs.append(equals(source, key, _check_value("" if value is None else value, at)))
    exprs = doc.get("matchExpressions")
    if exprs is not None:
        if not isinstance(exprs, list):
            raise ValidationError(f"{where}.matchExpressions", "must be a list")
        for i, expr in enumerate(exprs):
            at = f"{where}.matchExpressions[{i}]"
            if not isinstance(expr, dict):
                raise ValidationError(at, "must be a mapping with key, operator, values")
            extra = set(expr) - {"key", "operator", "values"}
            if extra:
                raise ValidationError(f"{at}.{sorted(extra)[0]}", "unknown field")
            if "key" not in expr:
                raise ValidationError(f"{at}.key", "required")
            source, key = split(expr["key"], f"{at}.key")
            op = expr.get("operator")
            if op not in OPERATORS:
                raise ValidationError(f"{at}.operator", f"must be one of {', '.join(OPERATORS)}, not {op!r}")
            values = expr.get("values")
            if values is not None and not isinstance(values, list):
                raise ValidationError(f"{at}.values", "must be a list of strings")
            values = values or []
            if op in (OP_IN, OP_NOT_IN) and not values:
                raise ValidationError(f"{at}.values", f"must be non-empty when operator is {op}")
            if op in (OP_EXISTS, OP_DOES_NOT_EXIST) and values:
                raise ValidationError(f"{at}.values", f"must be empty when operator is {op}")
            checked = tuple(sorted({_check_value(v, f"{at}.values[{j}]") for j, v in enumerate(values)}))
            reqs.append(Requirement(source, key, op, checked))
    return LabelSelector.of(reqs)
