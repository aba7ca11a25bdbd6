"""Plain-JSON calls to a Kubernetes API through kubernetes-asyncio's ApiClient (auth, TLS, connection pool).

Why not the generated `CoreV1Api` methods: the sandbox's kubelet, scheduler and node registration send
plain dicts (merge patches, Bindings, Nodes) and read watches line by line, while the generated methods
are typed for model objects, type a `_preload_content=False` call by its model although it returns the
raw aiohttp response, and their stubs omit `_content_type`. Paths come from the product's kind table
(`propolis.k8s.kinds`), as the k8s-watcher's reflector builds them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import aiohttp
from kubernetes_asyncio.client import ApiClient
from kubernetes_asyncio.client.exceptions import ApiException

from propolis.k8s.kinds import BY_KIND

JSON = "application/json"
MERGE_PATCH = "application/merge-patch+json"
PODS, NODES, SERVICES = BY_KIND["Pod"], BY_KIND["Node"], BY_KIND["Service"]

Query = Sequence[tuple[str, str]]


async def request(api: ApiClient, method: str, path: str, *, query: Query = (), body: object = None,
                  content_type: str = JSON) -> aiohttp.ClientResponse:
    """The raw response (status unchecked): for watches, read line by line inside `async with`."""
    resp = await api.call_api(path, method, query_params=list(query),
                              header_params={"Content-Type": content_type, "Accept": JSON}, body=body,
                              auth_settings=["BearerToken"], _preload_content=False, _return_http_data_only=True)
    if not isinstance(resp, aiohttp.ClientResponse):
        raise TypeError(f"{method} {path}: expected the raw aiohttp response, got {type(resp).__name__}")
    return resp


async def call(api: ApiClient, method: str, path: str, *, query: Query = (), body: object = None,
               content_type: str = JSON) -> dict[str, Any]:
    """The JSON answer; a non-2xx status raises ApiException (as the generated methods do); the connection is
    released either way."""
    resp = await request(api, method, path, query=query, body=body, content_type=content_type)
    try:
        text = await resp.text()
        if not 200 <= resp.status <= 299:
            raise ApiException(status=resp.status, reason=text[:300])
        answer: dict[str, Any] = json.loads(text) if text.strip() else {}
        return answer
    finally:
        resp.release()
