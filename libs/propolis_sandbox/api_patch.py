"""PATCH bodies as kube-apiserver understands them: JSON merge, strategic merge and JSON patch.

Why three: kubernetes-asyncio's patch_* methods send strategic merge patch by
default (merge patch when told), `kubectl apply/patch` send strategic merge
for built-in kinds and merge patch for CRDs, and `kubectl patch --type json`
sends RFC 6902. Strategic merge here merges the lists Kubernetes merges by key
(containers by name, ports by containerPort/port, conditions by type, …) and
honours `$patch: delete|replace`; other lists are replaced, as in merge patch.
"""

from __future__ import annotations

from typing import Any

from propolis.errors import ValidationError

MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
JSON_PATCH = "application/json-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"

# list field name -> merge key, as in the Kubernetes types' patchMergeKey tags
MERGE_KEYS: dict[str, str] = {
    "containers": "name", "initContainers": "name", "ephemeralContainers": "name", "volumes": "name",
    "env": "name", "volumeMounts": "mountPath", "conditions": "type", "addresses": "type",
    "ownerReferences": "uid", "imagePullSecrets": "name", "tolerations": "key", "hostAliases": "ip",
    "containerStatuses": "name", "initContainerStatuses": "name", "podIPs": "ip", "hostIPs": "ip",
}
_PORT_KEYS = {"ports": ("containerPort", "port")}


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge recursively, null deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _merge_key(name: str, items: list[Any]) -> str | None:
    if name in MERGE_KEYS:
        return MERGE_KEYS[name]
    if name in _PORT_KEYS:
        for candidate in _PORT_KEYS[name]:
            if all(isinstance(i, dict) and candidate in i for i in items):
                return candidate
    return None


def strategic_merge_patch(target: Any, patch: Any, field_name: str = "") -> Any:
    """Strategic merge: like merge patch, but keyed lists merge element-wise; `$patch` directives honoured."""
    if not isinstance(patch, dict):
        return patch
    if patch.get("$patch") == "replace":
        return {k: v for k, v in patch.items() if k != "$patch"}
    if patch.get("$patch") == "delete":
        return None
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if key.startswith("$"):
            continue
        if value is None:
            result.pop(key, None)
        elif isinstance(value, list) and isinstance(result.get(key), list):
            result[key] = _merge_list(key, result[key], value)
        elif isinstance(value, dict):
            result[key] = strategic_merge_patch(result.get(key), value, key)
        else:
            result[key] = value
    return result


def _merge_list(name: str, current: list[Any], patch: list[Any]) -> list[Any]:
    key = _merge_key(name, current + patch)
    if key is None or not all(isinstance(i, dict) for i in current + patch):
        return [i for i in patch if not (isinstance(i, dict) and i.get("$patch"))]
    merged = list(current)
    for item in patch:
        if item.get("$patch") == "replace":
            return [i for i in patch if i.get("$patch") != "replace"]
        idx = next((n for n, existing in enumerate(merged) if existing.get(key) == item.get(key)), None)
        if item.get("$patch") == "delete":
            if idx is not None:
                merged.pop(idx)
        elif idx is None:
            merged.append(strategic_merge_patch({}, item, name))
        else:
            merged[idx] = strategic_merge_patch(merged[idx], item, name)
    return merged


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise ValidationError("path", f"JSON pointer {path!r} must start with '/'")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _parent(doc: Any, parts: list[str], path: str) -> Any:
    cur = doc
    for part in parts[:-1]:
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        elif isinstance(cur, list) and part.isdigit() and int(part) < len(cur):
            cur = cur[int(part)]
        else:
            raise ValidationError("path", f"doc is missing path: {path!r}")
    return cur


def _get(doc: Any, path: str) -> Any:
    parts = _pointer(path)
    if not parts:
        return doc
    parent = _parent(doc, parts, path)
    last = parts[-1]
    if isinstance(parent, dict) and last in parent:
        return parent[last]
    if isinstance(parent, list) and last.isdigit() and int(last) < len(parent):
        return parent[int(last)]
    raise ValidationError("path", f"doc is missing path: {path!r}")


def _remove(doc: Any, path: str) -> Any:
    parts = _pointer(path)
    parent = _parent(doc, parts, path)
    last = parts[-1]
    if isinstance(parent, dict) and last in parent:
        return parent.pop(last)
    if isinstance(parent, list) and last.isdigit() and int(last) < len(parent):
        return parent.pop(int(last))
    raise ValidationError("path", f"unable to remove nonexistent key: {path!r}")


def _add(doc: Any, path: str, value: Any) -> Any:
    parts = _pointer(path)
    if not parts:
        return value
    parent = _parent(doc, parts, path)
    last = parts[-1]
    if isinstance(parent, dict):
        parent[last] = value
    elif isinstance(parent, list):
        if last == "-":
            parent.append(value)
        elif last.isdigit() and int(last) <= len(parent):
            parent.insert(int(last), value)
        else:
            raise ValidationError("path", f"add operation index out of bounds: {path!r}")
    else:
        raise ValidationError("path", f"doc is missing path: {path!r}")
    return doc


def json_patch(doc: Any, operations: Any) -> Any:
    """RFC 6902 add/remove/replace/move/copy/test; errors name the operation."""
    if not isinstance(operations, list):
        raise ValidationError("body", "a JSON patch must be a list of operations")
    for i, op in enumerate(operations):
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise ValidationError(f"[{i}]", "each operation needs 'op' and 'path'")
        kind, path = op["op"], op["path"]
        try:
            if kind == "add":
                doc = _add(doc, path, op.get("value"))
            elif kind == "remove":
                _remove(doc, path)
            elif kind == "replace":
                _get(doc, path)
                if _pointer(path):
                    _remove(doc, path)
                doc = _add(doc, path, op.get("value"))
            elif kind == "move":
                value = _remove(doc, op["from"])
                doc = _add(doc, path, value)
            elif kind == "copy":
                doc = _add(doc, path, _get(doc, op["from"]))
            elif kind == "test":
                if _get(doc, path) != op.get("value"):
                    raise ValidationError("path", f"testing value {path!r} failed")
            else:
                raise ValidationError("op", f"unexpected kind of JSON patch operation: {kind!r}")
        except ValidationError as exc:
            raise ValidationError(f"[{i}].{exc.field}", exc.reason) from None
    return doc


def apply_patch(content_type: str, current: Any, patch: Any) -> Any:
    base = content_type.split(";")[0].strip()
    if base == MERGE_PATCH:
        return merge_patch(current, patch)
    if base == STRATEGIC_MERGE_PATCH:
        return strategic_merge_patch(current, patch)
    if base == JSON_PATCH:
        return json_patch(current, patch)
    raise ValueError(base)
