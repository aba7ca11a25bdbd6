"""SelectorCache: which identities each selector matches, kept current as identities come and go.

Why (like Cilium's ``pkg/policy/selectorcache.go``): policies name peers by
selectors, the datapath needs identity numbers. Evaluating every selector
against every identity on each change would be O(selectors x identities); instead
an inverted label index answers a new selector with set operations, and an
identity added or removed is tested only against the cached selectors.
``selections()`` is what ``propolis policy selectors`` prints.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Iterable, Mapping
from typing import TypeVar

from propolis.model.labels import SOURCE_ANY, LabelSet
from propolis.model.selectors import OP_DOES_NOT_EXIST, OP_EXISTS, OP_IN, LabelSelector, Requirement

_Key = TypeVar("_Key", bound=Hashable)


def _index_one(table: dict[_Key, set[int]], key: _Key, number: int, add: bool) -> None:
    """Add `number` to (or remove it from) one inverted-index bucket; an emptied bucket goes."""
    if add:
        table.setdefault(key, set()).add(number)
        return
    bucket = table.get(key)
    if bucket is not None:
        bucket.discard(number)
        if not bucket:
            del table[key]


class SelectorCache:
    """Identity table + selector -> frozenset of matching identity numbers."""

    def __init__(self) -> None:
        self.identities: dict[int, LabelSet] = {}
        self._by_label: dict[tuple[str, str, str], set[int]] = defaultdict(set)
        self._by_any_label: dict[tuple[str, str], set[int]] = defaultdict(set)
        self._by_key: dict[tuple[str, str], set[int]] = defaultdict(set)
        self._by_any_key: dict[str, set[int]] = defaultdict(set)
        self._all: set[int] = set()
        self._selections: dict[LabelSelector, frozenset[int]] = {}

    # --- identities ------------------------------------------------------------------
    def _index(self, number: int, labels: LabelSet, add: bool) -> None:
        for lbl in labels:
            _index_one(self._by_label, (lbl.source, lbl.key, lbl.value), number, add)
            _index_one(self._by_any_label, (lbl.key, lbl.value), number, add)
            _index_one(self._by_key, (lbl.source, lbl.key), number, add)
            _index_one(self._by_any_key, lbl.key, number, add)
        if add:
            self._all.add(number)
        else:
            self._all.discard(number)

    def upsert_identity(self, number: int, labels: LabelSet) -> set[LabelSelector]:
        """Add or change one identity; returns the selectors whose selection changed."""
        old = self.identities.get(number)
        if old == labels:
            return set()
        if old is not None:
            self._index(number, old, add=False)
        self.identities[number] = labels
        self._index(number, labels, add=True)
        changed = set()
        for sel, ids in self._selections.items():
            now, before = sel.matches(labels), number in ids
            if now != before:
                self._selections[sel] = ids | {number} if now else ids - {number}
                changed.add(sel)
        return changed

    def remove_identity(self, number: int) -> set[LabelSelector]:
        old = self.identities.pop(number, None)
        if old is None:
            return set()
        self._index(number, old, add=False)
        changed = set()
        for sel, ids in self._selections.items():
            if number in ids:
                self._selections[sel] = ids - {number}
                changed.add(sel)
        return changed

    def set_identities(self, table: Mapping[int, LabelSet]) -> set[LabelSelector]:
        """Make the identity table equal to ``table`` (diffs only); returns the selectors that changed."""
        changed: set[LabelSelector] = set()
        for number in [n for n in self.identities if n not in table]:
            changed |= self.remove_identity(number)
        for number, labels in table.items():
            changed |= self.upsert_identity(number, labels)
        return changed

    # --- selectors -------------------------------------------------------------------
    def _requirement(self, req: Requirement) -> set[int]:
        if req.operator in (OP_EXISTS, OP_DOES_NOT_EXIST):
            hit = self._by_any_key.get(req.key, set()) if req.source == SOURCE_ANY else \
                self._by_key.get((req.source, req.key), set())
        else:
            hit = set()
            for value in req.values:
                hit |= (self._by_any_label.get((req.key, value), set()) if req.source == SOURCE_ANY else
                        self._by_label.get((req.source, req.key, value), set()))
        return hit if req.operator in (OP_IN, OP_EXISTS) else self._all - hit

    def select(self, selector: LabelSelector) -> frozenset[int]:
        """Identities matching ``selector`` (computed once, then kept current)."""
        cached = self._selections.get(selector)
        if cached is not None:
            return cached
        result: set[int] | None = None
        # Positive requirements first: they shrink the candidate set fastest.
        for req in sorted(selector.requirements, key=lambda r: r.operator not in (OP_IN, OP_EXISTS)):
            part = self._requirement(req)
            result = set(part) if result is None else result & part
            if not result:
                break
        selection = frozenset(self._all if result is None else result)
        self._selections[selector] = selection
        return selection

    def retain(self, selectors: Iterable[LabelSelector]) -> None:
        """Forget cached selectors no policy uses any more."""
        keep = set(selectors)
        for sel in [s for s in self._selections if s not in keep]:
            del self._selections[sel]

    def selections(self) -> dict[str, list[int]]:
        """Every cached selector (canonical string) -> sorted identities: `propolis policy selectors`."""
        return {str(sel): sorted(ids) for sel, ids in sorted(self._selections.items(), key=lambda kv: str(kv[0]))}
