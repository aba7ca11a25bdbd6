"""YAML documents for `propolis sandbox apply`, resolved to kinds and validated before anything is applied.

Why validate on the client: `propolis sandbox apply` must refuse a file with
one bad document without applying the good ones, and say which document and
which field. So every document is parsed and checked here first, with the
product's validators (`propolis.k8s.validate`, the ones the API server runs
too); only then does anything reach the API server (which validates again,
with a dry run). The kinds are the product's table (`propolis.k8s.kinds`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from propolis.errors import ValidationError
from propolis.k8s import validate
from propolis.k8s.kinds import KINDS as MIRRORED_KINDS
from propolis.k8s.kinds import Kind

KINDS: dict[str, Kind] = {k.kind: k for k in MIRRORED_KINDS.values()}
"""What `apply` accepts, by kind name: every kind Propolis acts on."""

APPLY_ORDER: dict[str, int] = {"Namespace": 0, "Node": 5}
"""Namespaces first (deleted last), then nodes; every other kind at 50."""


def apply_order(kind: Kind) -> int:
    return APPLY_ORDER.get(kind.kind, 50)


def resolve_kind(name: str) -> Kind:
    """`pods`, `pod`, `po`, `Pod`, `svc`, `cnp`… -> the kind."""
    wanted = name.lower()
    for kind in KINDS.values():
        if wanted in (kind.singular, kind.plural) or wanted in kind.short_names:
            return kind
    raise ValidationError("kind", f"unknown kind {name!r}; the sandbox serves: {', '.join(KINDS)}")


@dataclass
class Document:
    """One YAML document with where it came from (for error messages)."""

    source: str
    index: int  # 1-based within the source
    body: dict[str, Any]
    kind: Kind

    @property
    def name(self) -> str:
        return str(self.body.get("metadata", {}).get("name", ""))

    @property
    def namespace(self) -> str | None:
        if not self.kind.namespaced:
            return None
        return str(self.body.get("metadata", {}).get("namespace") or "default")

    @property
    def where(self) -> str:
        ident = f"{self.kind.kind} {self.namespace + '/' if self.namespace else ''}{self.name}"
        return f"{self.source} document {self.index} ({ident})"


def _files(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix in (".yaml", ".yml", ".json") and p.is_file())
        elif path.is_file():
            files.append(path)
        else:
            raise ValidationError("-f", f"{raw}: no such file or directory")
    return files


def load_documents(paths: list[str]) -> list[Document]:
    """Parse every file (multi-document YAML; `kind: List` expanded); errors name file and document."""
    docs: list[Document] = []
    for path in _files(paths):
        try:
            raw_docs = list(yaml.safe_load_all(path.read_text()))
        except yaml.YAMLError as exc:
            raise ValidationError(str(path), f"not valid YAML: {exc}") from exc
        docs += documents_from(str(path), raw_docs)
    if not docs:
        raise ValidationError("-f", f"no documents in {', '.join(paths)}")
    return docs


def documents_from(source: str, raw_docs: list[Any]) -> list[Document]:
    """Objects already parsed (from a file, or built in code like the connectivity test's) -> Documents."""
    docs: list[Document] = []
    index = 0
    for raw in raw_docs:
        if raw is None:
            continue
        items = raw.get("items", []) if isinstance(raw, dict) and raw.get("kind") == "List" else [raw]
        for item in items:
            index += 1
            where = f"{source} document {index}"
            if not isinstance(item, dict):
                raise ValidationError(where, "a document must be a mapping")
            kind_name = item.get("kind")
            if not isinstance(kind_name, str) or not kind_name:
                raise ValidationError(f"{where}: kind", "missing")
            kind = KINDS.get(kind_name)
            if kind is None:
                raise ValidationError(f"{where}: kind", f"unknown kind {kind_name!r}; the sandbox serves: "
                                                        f"{', '.join(KINDS)}")
            docs.append(Document(source, index, item, kind))
    return docs


def validate_documents(docs: list[Document]) -> None:
    """Check every document; the first problem raises ValidationError('<file> document N (Kind ns/name): field')."""
    seen: dict[tuple[str, str | None, str], str] = {}
    for doc in docs:
        try:
            validate_document(doc)
        except ValidationError as exc:
            raise ValidationError(f"{doc.where}: {exc.field}", exc.reason) from None
        key = (doc.kind.kind, doc.namespace, doc.name)
        if key in seen:
            raise ValidationError(f"{doc.where}: metadata.name", f"defined twice (also in {seen[key]})")
        seen[key] = doc.where


def validate_document(doc: Document) -> None:
    """What `apply` needs (the kind's apiVersion, a name), then the product's validators; the first problem raises."""
    body = doc.body
    if body.get("apiVersion") != doc.kind.api_version:
        raise ValidationError("apiVersion", f"{doc.kind.kind} is served as {doc.kind.api_version!r}, "
                                            f"got {body.get('apiVersion')!r}")
    meta = body.get("metadata")
    if not isinstance(meta, dict):
        raise ValidationError("metadata", "missing")
    if not meta.get("name"):
        raise validate.required("metadata.name", "apply needs a name")
    for error in validate.object_errors(doc.kind.kind, body):
        raise error
