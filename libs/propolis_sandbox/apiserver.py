"""The sandbox's Kubernetes API endpoint: kube-apiserver's paths, JSON shapes and list/watch semantics.

Why: there is no kube-apiserver on these machines, yet the k8s-watcher, the
sandbox kubelet, kubernetes-asyncio and kubectl must run against the sandbox
unchanged. This aiohttp server serves Namespaces, Nodes, Pods (+status),
Services, Events, EndpointSlices, NetworkPolicies and Cilium's CNP/CCNP CRDs
from `api_store.Store` (one global resourceVersion, bounded watch history,
410 Expired, bookmarks), with the EndpointSlice controller and the
ClusterIP/NodePort allocators running in the same process.

Run: `python -m propolis_sandbox.apiserver --run-dir DIR [--host 127.0.0.1] [--port 0]
[--service-cidr 10.96.0.0/16] [--bookmark-interval S] [--history-limit N] [--data-dir D]`; it
loads its store from `DIR/apiserver-store` (api_wal.py: objects and resourceVersion survive a kill),
writes `DIR/kubeconfig` then `DIR/apiserver.url` and serves until SIGTERM. Writes are answered once on
disk; objects are validated with the k8s-watcher's validators (k8s/validate.py: 422 Invalid naming the
field) and refused over 1.5 MiB (413). In tests (store in memory unless `data_dir` is given):
`async with ApiServer(run_dir=…) as srv: srv.url, srv.kubeconfig_path`.
Admin: `POST /_sandbox/compact` forgets the watch history (watches from an older
resourceVersion then get 410). Inspect with `kubectl --kubeconfig DIR/kubeconfig get pods -A`.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import yaml
from aiohttp import web

from propolis.errors import ValidationError
from propolis_sandbox import api_discovery as discovery
from propolis_sandbox import api_exec, api_tables
from propolis_sandbox.api_controllers import EndpointSliceController, PodUpdateRules, ServiceAllocator
from propolis_sandbox.api_patch import APPLY_PATCH, apply_patch
from propolis_sandbox.api_resources import BY_KIND, BY_PATH, Resource
from propolis_sandbox.api_selectors import parse_field_selector, parse_label_selector
from propolis_sandbox.api_store import DEFAULT_HISTORY_LIMIT, ApiStatusError, Store, bad_request, clone
from propolis_sandbox.api_wal import Wal
from propolis_sandbox.config import SandboxConfig

log = logging.getLogger("propolis_sandbox.apiserver")

Obj = dict[str, Any]
DEFAULT_SERVICE_CIDR = "10.96.0.0/16"
DEFAULT_BOOKMARK_INTERVAL_S = 10.0
PROGRESS_CHECK_S = 0.05  # how soon an idle watch hears that the store's revision moved on
DEFAULT_WATCH_TIMEOUT_S = 1800
KUBECONFIG_FILE = "kubeconfig"
URL_FILE = "apiserver.url"
DATA_DIR = "apiserver-store"  # under the run dir: the store on disk (api_wal.py)
SANDBOX_TOKEN = "propolis-sandbox"
SUBRESOURCES = ("status", "binding")
MAX_REQUEST_BODY_BYTES = 3 * 1024 * 1024  # kube-apiserver's limit; objects over 1.5 MiB are refused by the store


def _not_found_path() -> ApiStatusError:
    return ApiStatusError(404, "NotFound", "the server could not find the requested resource",
                          {"causes": [{"reason": "UnexpectedServerResponse", "message": "404 page not found"}]})


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def _flag(request: web.Request, name: str) -> bool:
    return request.query.get(name, "").lower() in ("1", "true")


class ApiServer:
    """The sandbox API server; `async with` starts it (and its controllers) and stops it.

    Properties: `url` (http://host:port), `kubeconfig_path` (Path), `store`, `port`.
    """

    def __init__(self, *, run_dir: str | Path | None = None, host: str = "127.0.0.1", port: int = 0,
                 service_cidr: str = DEFAULT_SERVICE_CIDR, bookmark_interval: float = DEFAULT_BOOKMARK_INTERVAL_S,
                 history_limit: int = DEFAULT_HISTORY_LIMIT, cluster_name: str = "propolis-sandbox",
                 validate_policies: bool = True, data_dir: str | Path | None = None,
                 exec_target: Callable[[dict[str, Any]], api_exec.ExecTarget] | None = None) -> None:
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.data_dir = Path(data_dir) if data_dir is not None else None  # None: the store lives in memory only
        self.host = host
        self.requested_port = port
        self.bookmark_interval = bookmark_interval
        self.cluster_name = cluster_name
        self.exec_target = exec_target  # pod -> where pods/exec runs its command (its network namespace, cgroup)
        self.store = Store(history_limit=history_limit, validate_policies=validate_policies)
        self.allocator = ServiceAllocator(self.store, service_cidr)
        self.store.admissions += [self.allocator, PodUpdateRules()]
        self.endpointslices = EndpointSliceController(self.store)
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._tmpdir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def kubeconfig_path(self) -> Path:
        assert self.run_dir is not None, "start the server first"
        return self.run_dir / KUBECONFIG_FILE

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        if self.run_dir is None:
            self._tmpdir = tempfile.TemporaryDirectory(prefix="propolis-apiserver-")
            self.run_dir = Path(self._tmpdir.name)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.data_dir is not None:
            self.store.attach_wal(Wal(self.data_dir))
        for ns in ("default", "kube-system", "kube-public", "kube-node-lease"):
            if self.store.find(BY_KIND["Namespace"], None, ns) is None:
                self.store.create(BY_KIND["Namespace"], None, {"metadata": {"name": ns}})
        app = web.Application(middlewares=[self._errors], client_max_size=MAX_REQUEST_BODY_BYTES)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.requested_port)
        await site.start()
        self.port = int(self._runner.addresses[0][1])  # the port the kernel picked for port 0
        self._tasks.append(asyncio.create_task(self.endpointslices.run(), name="endpointslice-controller"))
        self._write_files()
        log.info("sandbox API server listening on %s (kubeconfig %s)", self.url, self.kubeconfig_path)

    def _write_files(self) -> None:
        assert self.run_dir is not None
        kubeconfig = {
            "apiVersion": "v1", "kind": "Config", "preferences": {},
            "clusters": [{"name": self.cluster_name, "cluster": {"server": self.url}}],
            "users": [{"name": self.cluster_name, "user": {"token": SANDBOX_TOKEN}}],
            "contexts": [{"name": self.cluster_name, "context": {"cluster": self.cluster_name,
                                                                 "user": self.cluster_name, "namespace": "default"}}],
            "current-context": self.cluster_name,
        }
        for name, text in ((KUBECONFIG_FILE, yaml.safe_dump(kubeconfig, sort_keys=False)), (URL_FILE, self.url + "\n")):
            tmp = self.run_dir / f".{name}.{os.getpid()}.tmp"
            tmp.write_text(text)
            os.chmod(tmp, 0o600)
            tmp.replace(self.run_dir / name)

    async def stop(self) -> None:
        self.store.close()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._tasks.clear()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.run_dir is not None:
            (self.run_dir / URL_FILE).unlink(missing_ok=True)
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None

    async def __aenter__(self) -> ApiServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- HTTP ----------------------------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request,
                      handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        try:
            response = await handler(request)
            if request.method not in ("GET", "HEAD"):
                await self.store.sync()  # answer a write only once it is on disk, as etcd does
            return response
        except ApiStatusError as exc:
            return _json(exc.status(), exc.code)
        except ValidationError as exc:
            return _json(bad_request(str(exc)).status(), 400)
        except web.HTTPRequestEntityTooLarge:
            return _json(ApiStatusError(413, "RequestEntityTooLarge", f"Request entity too large: limit is "
                                                                      f"{MAX_REQUEST_BODY_BYTES}").status(), 413)
        except web.HTTPException:
            raise
        except Exception as exc:  # a bug must still answer as a Status, and be logged
            log.exception("%s %s failed", request.method, request.path)
            return _json(ApiStatusError(500, "InternalError", f"Internal error occurred: {exc}").status(), 500)

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        parts = [p for p in request.path.split("/") if p]
        fixed = self._fixed(request, parts)
        if fixed is not None:
            return fixed
        if parts[:2] == ["api", "v1"]:
            group, version, rest = "", "v1", parts[2:]
        elif len(parts) >= 3 and parts[0] == "apis":
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise _not_found_path()
        if not rest:
            listing = discovery.resource_list(group, version)
            if listing is None or request.method != "GET":
                raise _not_found_path()
            return _json(listing)
        namespace: str | None = None
        if rest[0] == "namespaces" and len(rest) >= 3 and rest[2] not in ("status", "finalize"):
            namespace, rest = rest[1], rest[2:]
        if (group, rest) == ("", ["bindings"]) and namespace is not None and request.method == "POST":
            body = await self._body(request)
            name = ((body or {}).get("metadata") or {}).get("name", "") if isinstance(body, dict) else ""
            return self._bind(namespace, name, body, request.query.get("dryRun") == "All")
        resource = BY_PATH.get((group, version, rest[0]))
        if resource is None or (namespace is not None and not resource.namespaced) or len(rest) > 3:
            raise _not_found_path()
        if len(rest) == 1:
            return await self._collection(request, resource, namespace)
        name, sub = rest[1], rest[2] if len(rest) == 3 else ""
        if resource.namespaced and namespace is None:
            raise _not_found_path()
        if sub == "exec" and resource.kind == "Pod" and request.method in ("GET", "POST"):
            return await self._exec(request, namespace or "", name)
        if sub and (sub not in SUBRESOURCES or (sub == "status" and not resource.has_status)
                    or (sub == "binding" and resource.kind != "Pod")):
            raise _not_found_path()
        return await self._item(request, resource, namespace, name, sub)

    def _fixed(self, request: web.Request, parts: list[str]) -> web.StreamResponse | None:
        path = "/" + "/".join(parts)
        if request.method == "POST" and path == "/_sandbox/compact":
            return _json({"resourceVersion": str(self.store.compact())})
        if request.method != "GET":
            return None
        if path in ("/healthz", "/readyz", "/livez"):
            return web.Response(text="ok")
        if path == "/version":
            return _json(discovery.KUBE_VERSION)
        if path == "/api":
            return _json(discovery.core_versions())
        if path == "/apis":
            return _json(discovery.api_group_list())
        if len(parts) == 2 and parts[0] == "apis" and parts[1] in discovery.groups():
            return _json(discovery.api_group(parts[1]))
        if path == "/openapi/v2" and "protobuf" not in request.headers.get("Accept", ""):
            return _json(discovery.openapi_v2())
        if path == "/openapi/v3":
            return _json(discovery.openapi_v3_root())
        if parts[:2] == ["openapi", "v3"] and len(parts) >= 4:
            group, version = ("", parts[3]) if parts[2] == "api" else (parts[3], parts[4] if len(parts) > 4 else "")
            doc = discovery.openapi_v3_group_version(group, version)
            if doc is not None:
                return _json(doc)
        return None

    async def _body(self, request: web.Request) -> Any:
        raw = await request.read()
        if not raw.strip():
            raise bad_request("the request body is empty")
        try:
            if "yaml" in request.content_type:
                return yaml.safe_load(raw)
            return orjson.loads(raw)
        except (orjson.JSONDecodeError, yaml.YAMLError) as exc:
            raise bad_request(f"the body of the request was in an unknown format: {exc}") from None

    def _selectors(self, request: web.Request, resource: Resource) -> tuple[Any, Any]:
        labels = parse_label_selector(request.query.get("labelSelector"))
        fields = parse_field_selector(request.query.get("fieldSelector"), resource.field_selectors, resource.plural)
        return labels, fields

    async def _collection(self, request: web.Request, resource: Resource, namespace: str | None) -> web.StreamResponse:
        dry_run = request.query.get("dryRun") == "All"
        if request.method == "GET":
            if _flag(request, "watch"):
                return await self._watch(request, resource, namespace)
            labels, fields = self._selectors(request, resource)
            try:
                limit = int(request.query.get("limit") or 0)
            except ValueError:
                raise bad_request(f"limit: Invalid value: {request.query.get('limit')!r}") from None
            items, rv, cont = self.store.list(resource, namespace, labels, fields, limit=limit,
                                              continue_token=request.query.get("continue", ""))
            if api_tables.wants_table(request.headers.get("Accept", "")):
                return _json(api_tables.table(resource, items, rv, request.query.get("includeObject", "Metadata")))
            meta: Obj = {"resourceVersion": rv}
            if cont:
                meta["continue"] = cont
            return _json({"kind": resource.list_kind, "apiVersion": resource.api_version, "metadata": meta,
                          "items": items})
        if request.method == "POST":
            if resource.namespaced and namespace is None:
                raise _not_found_path()
            created = self.store.create(resource, namespace, await self._body(request), dry_run=dry_run)
            return _json(created, 201)
        if request.method == "DELETE":
            labels, fields = self._selectors(request, resource)
            items, _, _ = self.store.list(resource, namespace, labels, fields)
            grace, _ = await self._delete_options(request)
            deleted = [self.store.delete(resource, namespace or item["metadata"].get("namespace"),
                                         item["metadata"]["name"], grace_period=grace, dry_run=dry_run)
                       for item in items]
            return _json({"kind": resource.list_kind, "apiVersion": resource.api_version,
                          "metadata": {"resourceVersion": str(self.store.rv)}, "items": deleted})
        raise ApiStatusError(405, "MethodNotAllowed", f"the server does not allow this method on the requested "
                                                      f"resource ({request.method} {resource.plural})")

    async def _delete_options(self, request: web.Request) -> tuple[int | None, Obj]:
        """gracePeriodSeconds (query or DeleteOptions body) and the DeleteOptions body."""
        grace: int | None = None
        options: Obj = {}
        if request.can_read_body:
            raw = await request.read()
            if raw.strip():
                try:
                    options = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    raise bad_request("DeleteOptions: the body is not JSON") from None
        if isinstance(options, dict) and options.get("gracePeriodSeconds") is not None:
            grace = int(options["gracePeriodSeconds"])
        if request.query.get("gracePeriodSeconds"):
            grace = int(request.query["gracePeriodSeconds"])
        return grace, options if isinstance(options, dict) else {}

    async def _item(self, request: web.Request, resource: Resource, namespace: str | None, name: str,
                    sub: str) -> web.StreamResponse:
        dry_run = request.query.get("dryRun") == "All"
        method = request.method
        if sub == "binding":
            if method != "POST":
                raise ApiStatusError(405, "MethodNotAllowed", "binding supports only create")
            return self._bind(namespace, name, await self._body(request), dry_run)
        if method == "GET":
            obj = self.store.get(resource, namespace, name)
            if api_tables.wants_table(request.headers.get("Accept", "")):
                return _json(api_tables.table(resource, [obj], obj["metadata"]["resourceVersion"],
                                              request.query.get("includeObject", "Metadata")))
            return _json(obj)
        if method == "PUT":
            return _json(self.store.update(resource, namespace, name, await self._body(request), subresource=sub,
                                           dry_run=dry_run))
        if method == "PATCH":
            content_type = request.headers.get("Content-Type", "application/merge-patch+json").split(";")[0].strip()
            if content_type == APPLY_PATCH:
                raise ApiStatusError(415, "UnsupportedMediaType", "server-side apply is not supported by the sandbox "
                                                                  "API; use client-side apply")
            patch = await self._body(request)
            current = self.store.get(resource, namespace, name)
            try:
                patched = apply_patch(content_type, clone(current), patch)
            except ValueError:
                raise ApiStatusError(415, "UnsupportedMediaType",
                                     f"the body of the request was in an unknown format - accepted media types "
                                     f"include: application/json-patch+json, application/merge-patch+json, "
                                     f"application/strategic-merge-patch+json (got {content_type})") from None
            if not isinstance(patched, dict):
                raise bad_request("the patch does not produce an object")
            return _json(self.store.update(resource, namespace, name, patched, subresource=sub, dry_run=dry_run))
        if method == "DELETE" and not sub:
            grace, options = await self._delete_options(request)
            pre = options.get("preconditions") or {}
            return _json(self.store.delete(resource, namespace, name, grace_period=grace,
                                           precondition_uid=pre.get("uid") or "",
                                           precondition_rv=pre.get("resourceVersion") or "", dry_run=dry_run))
        raise ApiStatusError(405, "MethodNotAllowed", f"the server does not allow this method on the requested "
                                                      f"resource ({method} {resource.plural})")

    async def _exec(self, request: web.Request, namespace: str, name: str) -> web.StreamResponse:
        """pods/exec (api_exec.py): in the pod's network namespace and cgroup, where the server knows them."""
        pod = self.store.get(BY_KIND["Pod"], namespace, name)
        if self.exec_target is None:
            raise ApiStatusError(400, "BadRequest", "this API server runs no pods (no --cluster-name of a sandbox): "
                                                    "pods/exec is not available")
        if not (pod.get("status") or {}).get("podIP"):
            raise bad_request(f"pod {namespace}/{name} is not running (no pod IP yet)")
        return await api_exec.serve_exec(request, namespace, name, pod, self.exec_target(pod))

    def _bind(self, namespace: str | None, name: str, body: Any, dry_run: bool) -> web.Response:
        """A scheduler's Binding (`pods/NAME/binding` or `bindings`): set spec.nodeName of an unbound pod."""
        pods = BY_KIND["Pod"]
        target = (body.get("target") or {}) if isinstance(body, dict) else {}
        if not target.get("name"):
            raise self.store_invalid("Binding", name, "target.name", "Required value")
        pod = self.store.get(pods, namespace, name)
        if pod["spec"].get("nodeName"):
            raise ApiStatusError(409, "Conflict", f'Operation cannot be fulfilled on pods/binding "{name}": pod '
                                                  f'{name} is already assigned to node "{pod["spec"]["nodeName"]}"')
        pod["spec"]["nodeName"] = target["name"]
        self.store.update(pods, namespace, name, pod, dry_run=dry_run)
        return _json({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}, 201)

    @staticmethod
    def store_invalid(kind: str, name: str, field: str, message: str) -> ApiStatusError:
        return ApiStatusError(422, "Invalid", f'{kind} "{name}" is invalid: {field}: {message}',
                              {"name": name, "kind": kind, "causes": [{"reason": "FieldValueRequired",
                                                                       "message": message, "field": field}]})

    async def _watch(self, request: web.Request, resource: Resource, namespace: str | None) -> web.StreamResponse:
        """Stream watch events as JSON lines; a too-old resourceVersion is an ERROR event with a 410 Status."""
        labels, fields = self._selectors(request, resource)
        try:
            timeout = float(request.query.get("timeoutSeconds") or DEFAULT_WATCH_TIMEOUT_S)
        except ValueError:
            raise bad_request(f"timeoutSeconds: Invalid value: {request.query.get('timeoutSeconds')!r}") from None
        bookmarks = _flag(request, "allowWatchBookmarks")
        response = web.StreamResponse(status=200, headers={"Content-Type": "application/json",
                                                           "Cache-Control": "no-cache, private"})
        response.enable_chunked_encoding()
        # sendInitialEvents=true (the watch-list protocol): current state first, then a bookmark marking its end
        initial_events = _flag(request, "sendInitialEvents")
        since = None if initial_events else request.query.get("resourceVersion")
        try:
            watch = self.store.watch(resource, namespace, labels, fields, since)
        except ApiStatusError as exc:
            if exc.code != 410:
                raise
            await response.prepare(request)
            await response.write(orjson.dumps({"type": "ERROR", "object": exc.status()}) + b"\n")
            await response.write_eof()
            return response
        await response.prepare(request)
        deadline = time.monotonic() + timeout
        try:
            if initial_events:
                while not watch.queue.empty():
                    item = watch.queue.get_nowait()
                    if item is not None:
                        await response.write(orjson.dumps({"type": item[0], "object": item[1]}) + b"\n")
                if bookmarks:
                    await response.write(self._bookmark(resource, {"k8s.io/initial-events-end": "true"}))
            covered = self.store.rv if initial_events else 0  # revision this client knows it has seen all of
            last_bookmark = time.monotonic()
            while (left := deadline - time.monotonic()) > 0:
                wait = min(left, PROGRESS_CHECK_S) if bookmarks else left
                try:
                    item = await asyncio.wait_for(watch.queue.get(), timeout=wait)
                except TimeoutError:
                    now = time.monotonic()
                    # Progress bookmarks (like etcd's progress notify): once the store moved on and this
                    # watch has nothing queued, say so within PROGRESS_CHECK_S — consumers waiting for
                    # "every kind caught up with revision N" then wait milliseconds, not an interval.
                    if bookmarks and watch.queue.empty() and deadline - now > 0 and (
                            self.store.rv > covered or now - last_bookmark >= self.bookmark_interval):
                        covered, last_bookmark = self.store.rv, now
                        await response.write(self._bookmark(resource))
                    continue
                if item is None:
                    break
                etype, obj = item
                covered = max(covered, _int_rv(obj))
                await response.write(orjson.dumps({"type": etype, "object": obj}) + b"\n")
        except ConnectionResetError:
            return response  # the client went away
        finally:
            self.store.stop_watch(watch)
        await response.write_eof()
        return response

    def _bookmark(self, resource: Resource, annotations: dict[str, str] | None = None) -> bytes:
        """A BOOKMARK: only the kind and the latest resourceVersion (every earlier event was already sent)."""
        meta: Obj = {"resourceVersion": str(self.store.rv), "creationTimestamp": None}
        if annotations:
            meta["annotations"] = annotations
        return orjson.dumps({"type": "BOOKMARK", "object": {"kind": resource.kind, "apiVersion": resource.api_version,
                                                            "metadata": meta}}) + b"\n"


def _int_rv(obj: Obj) -> int:
    try:
        return int(obj.get("metadata", {}).get("resourceVersion") or 0)
    except (TypeError, ValueError):
        return 0


# --- entry point ------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m propolis_sandbox.apiserver", description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True, help="where kubeconfig and apiserver.url are written")
    parser.add_argument("--host", default="127.0.0.1", help="listen address (loopback: plain HTTP, no auth)")
    parser.add_argument("--port", type=int, default=0, help="listen port (0: any free port)")
    parser.add_argument("--service-cidr", default=DEFAULT_SERVICE_CIDR, help="ClusterIP range of Services")
    parser.add_argument("--bookmark-interval", type=float, default=DEFAULT_BOOKMARK_INTERVAL_S,
                        help="seconds between BOOKMARK events on watches that allow them")
    parser.add_argument("--history-limit", type=int, default=DEFAULT_HISTORY_LIMIT,
                        help="watch events kept for resuming; older resourceVersions get 410 Gone")
    parser.add_argument("--cluster-name", default="propolis-sandbox",
                        help="cluster/context name in the kubeconfig: the sandbox name (pods/exec finds pods by it)")
    parser.add_argument("--nodes", type=int, default=SandboxConfig.nodes,
                        help="the sandbox's node count (pods/exec in a hostNetwork pod runs in its node's namespace)")
    parser.add_argument("--data-dir", default=None,
                        help=f"where the store is kept on disk (default RUN_DIR/{DATA_DIR}); a restart resumes it")
    return parser


async def serve(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with ApiServer(run_dir=args.run_dir, host=args.host, port=args.port, service_cidr=args.service_cidr,
                         bookmark_interval=args.bookmark_interval, history_limit=args.history_limit,
                         cluster_name=args.cluster_name, data_dir=args.data_dir or Path(args.run_dir) / DATA_DIR,
                         exec_target=functools.partial(api_exec.sandbox_target,
                                                       SandboxConfig(name=args.cluster_name, nodes=args.nodes))):
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(serve(args))
    except ValueError as exc:  # a bad --service-cidr
        print(f"apiserver: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
