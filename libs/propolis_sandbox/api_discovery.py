"""Discovery documents (`/version`, `/api`, `/apis`, APIResourceLists, a minimal `/openapi/v2`).

Why: kubectl and client libraries find resources (and short names such as
`cnp`, `svc`) through discovery before they send a request; these documents
list exactly the resources the sandbox API serves, with their verbs.
"""

from __future__ import annotations

from typing import Any

from propolis_sandbox.api_resources import RESOURCES, Resource

Obj = dict[str, Any]
KUBE_VERSION = {"major": "1", "minor": "31", "gitVersion": "v1.31.0-propolis-sandbox", "gitCommit": "",
                "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.22",
                "compiler": "gc", "platform": "linux/amd64"}
VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]


def groups() -> dict[str, list[str]]:
    """group -> versions (the core group is "")."""
    out: dict[str, list[str]] = {}
    for r in RESOURCES:
        versions = out.setdefault(r.group, [])
        if r.version not in versions:
            versions.append(r.version)
    return out


def core_versions() -> Obj:
    return {"kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]}


def api_group_list() -> Obj:
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [api_group(g) for g in groups() if g]}


def api_group(group: str) -> Obj:
    versions = [{"groupVersion": f"{group}/{v}", "version": v} for v in groups()[group]]
    return {"kind": "APIGroup", "apiVersion": "v1", "name": group, "versions": versions,
            "preferredVersion": versions[0]}


def _entry(r: Resource) -> Obj:
    entry: Obj = {"name": r.plural, "singularName": r.singular, "namespaced": r.namespaced, "kind": r.kind,
                  "verbs": VERBS, "storageVersionHash": ""}
    if r.short_names:
        entry["shortNames"] = list(r.short_names)
    if r.categories:
        entry["categories"] = list(r.categories)
    return entry


def resource_list(group: str, version: str) -> Obj | None:
    served = [r for r in RESOURCES if r.group == group and r.version == version]
    if not served:
        return None
    resources = []
    for r in served:
        resources.append(_entry(r))
        if r.has_status:
            resources.append({"name": f"{r.plural}/status", "singularName": "", "namespaced": r.namespaced,
                              "kind": r.kind, "verbs": ["get", "patch", "update"]})
    return {"kind": "APIResourceList", "apiVersion": "v1",
            "groupVersion": f"{group}/{version}" if group else version, "resources": resources}


def openapi_v2() -> Obj:
    """A valid Swagger 2.0 document with one untyped definition per kind (enough for kubectl's lookups)."""
    definitions = {}
    for r in RESOURCES:
        definitions[f"io.propolis_sandbox.{r.group or 'core'}.{r.version}.{r.kind}"] = {
            "type": "object",
            "x-kubernetes-group-version-kind": [{"group": r.group, "version": r.version, "kind": r.kind}],
        }
    return {"swagger": "2.0", "info": {"title": "Propolis sandbox", "version": KUBE_VERSION["gitVersion"]},
            "paths": {}, "definitions": definitions}


def _gv_path(group: str, version: str) -> str:
    return f"apis/{group}/{version}" if group else f"api/{version}"


def openapi_v3_root() -> Obj:
    """`/openapi/v3`: one document per group-version (kubectl finds server-side field validation here)."""
    paths = {}
    for group, versions in groups().items():
        for version in versions:
            paths[_gv_path(group, version)] = {"serverRelativeURL": f"/openapi/v3/{_gv_path(group, version)}"}
    return {"paths": paths}


def openapi_v3_group_version(group: str, version: str) -> Obj | None:
    """A minimal OpenAPI 3 document: each item path's PATCH names its kind and accepts `fieldValidation`,
    so kubectl validates on the server instead of downloading schemas."""
    served = [r for r in RESOURCES if r.group == group and r.version == version]
    if not served:
        return None
    param = {"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": True}}
    paths: Obj = {}
    for r in served:
        gvk = {"group": r.group, "version": r.version, "kind": r.kind}
        base = f"/{_gv_path(group, version)}" + ("/namespaces/{namespace}" if r.namespaced else "") + f"/{r.plural}"
        operation = {"operationId": f"patch{r.kind}", "x-kubernetes-group-version-kind": gvk,
                     "parameters": [param], "responses": {"200": {"description": "OK"}}}
        paths[base + "/{name}"] = {"patch": operation, "parameters": [param]}
        paths[base] = {"post": {**operation, "operationId": f"create{r.kind}"}, "parameters": [param]}
    return {"openapi": "3.0.0", "info": {"title": "Propolis sandbox", "version": KUBE_VERSION["gitVersion"]},
            "paths": paths, "components": {"schemas": {}}}
