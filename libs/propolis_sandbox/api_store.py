"""The sandbox API's in-memory store: one global resourceVersion, a bounded event history, watches.

Why it works like etcd + the watch cache: every write takes the next
resourceVersion (one counter for all kinds, as etcd's revision), and its event
goes into a bounded history. A watch from resourceVersion R replays the
history after R and follows; R older than the retained window gives
`Expired` (HTTP 410 / an ERROR event with code 410), which is what makes
reflectors relist. `compact()` drops the history so tests can force that.
Selectors apply to watches with the apiserver's rule: an object that stops
matching is sent as DELETED, one that starts matching as ADDED.

All methods are synchronous (no await between reading and writing), so the
asyncio loop gives the same atomicity etcd's transactions give.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import functools
import json
import logging
import random
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from propolis.errors import ValidationError
from propolis.k8s import validate
from propolis_sandbox.api_resources import RESOURCES, Resource
from propolis_sandbox.api_selectors import FieldSelector, LabelSelector
from propolis_sandbox.api_wal import Wal

log = logging.getLogger("propolis_sandbox.api")

Obj = dict[str, Any]
ObjList = list[Obj]  # `Store.list` shadows the builtin inside the class
DEFAULT_HISTORY_LIMIT = 5000
MAX_OBJECT_BYTES = 1536 * 1024  # etcd's default request limit (--max-request-bytes 1.5 MiB)
_GENERATE_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"

#: the empty selectors (immutable): a list without selectors matches everything
MATCH_ALL_LABELS = LabelSelector()
MATCH_ALL_FIELDS = FieldSelector()


def now_rfc3339(offset_s: float = 0.0) -> str:
    t = datetime.now(UTC) + timedelta(seconds=offset_s)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def clone(obj: Obj) -> Obj:
    """A deep copy through JSON: what a client would get back (and no aliasing into the store)."""
    copied: Obj = orjson.loads(orjson.dumps(obj))
    return copied


class ApiStatusError(Exception):
    """An error answered as a Kubernetes `Status` (reason NotFound, AlreadyExists, Conflict, Invalid, Expired…)."""

    def __init__(self, code: int, reason: str, message: str, details: Obj | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details

    def status(self) -> Obj:
        body: Obj = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                     "message": self.message, "reason": self.reason, "code": self.code}
        if self.details:
            body["details"] = self.details
        return body


def _details(resource: Resource, name: str) -> Obj:
    d: Obj = {"name": name, "kind": resource.plural}
    if resource.group:
        d["group"] = resource.group
    return d


def not_found(resource: Resource, name: str) -> ApiStatusError:
    return ApiStatusError(404, "NotFound", f'{resource.qualified()} "{name}" not found', _details(resource, name))


def already_exists(resource: Resource, name: str) -> ApiStatusError:
    return ApiStatusError(409, "AlreadyExists", f'{resource.qualified()} "{name}" already exists',
                          _details(resource, name))


def conflict(resource: Resource, name: str, why: str) -> ApiStatusError:
    return ApiStatusError(409, "Conflict", f'Operation cannot be fulfilled on {resource.qualified()} "{name}": {why}',
                          _details(resource, name))


def bad_request(message: str) -> ApiStatusError:
    return ApiStatusError(400, "BadRequest", message)


def expired(requested: int, oldest: int) -> ApiStatusError:
    return ApiStatusError(410, "Expired", f"too old resource version: {requested} ({oldest})")


def too_large(resource: Resource, name: str, size: int) -> ApiStatusError:
    """What kube-apiserver answers when etcd refuses an object over its request limit."""
    return ApiStatusError(413, "RequestEntityTooLarge", f'{resource.qualified()} "{name}" is too large: {size} bytes, '
                                                        f"the limit is {MAX_OBJECT_BYTES} bytes (etcd's request limit)",
                          _details(resource, name))


def unprocessable(resource: Resource, name: str, errors: list[ValidationError]) -> ApiStatusError:
    causes = [{"reason": _cause_reason(e.reason), "message": e.reason, "field": e.field} for e in errors]
    text = ", ".join(f"{e.field}: {e.reason}" if e.field else e.reason for e in errors)
    details = {"name": name, "kind": resource.kind, "causes": causes}
    if resource.group:
        details["group"] = resource.group
    return ApiStatusError(422, "Invalid", f'{resource.kind} "{name}" is invalid: {text}', details)


def _cause_reason(message: str) -> str:
    for prefix, reason in (("Required value", "FieldValueRequired"), ("Duplicate value", "FieldValueDuplicate"),
                           ("Unsupported value", "FieldValueNotSupported"), ("Forbidden", "FieldValueForbidden")):
        if message.startswith(prefix):
            return reason
    return "FieldValueInvalid"


@dataclass
class WatchEvent:
    """One change: the object after it (before it, for DELETED) and the object before it (for selectors)."""

    rv: int
    resource: Resource
    type: str  # ADDED | MODIFIED | DELETED
    obj: Obj
    old: Obj | None


@dataclass(eq=False)
class Watch:
    """One watcher's view: its filter and a queue of (type, object) ready to send; None ends it."""

    resource: Resource
    namespace: str | None
    labels: LabelSelector
    fields: FieldSelector
    queue: asyncio.Queue[tuple[str, Obj] | None] = field(default_factory=asyncio.Queue)

    def _matches(self, obj: Obj | None) -> bool:
        if obj is None:
            return False
        meta = obj.get("metadata") or {}
        if self.namespace is not None and meta.get("namespace") != self.namespace:
            return False
        return self.labels.matches(meta.get("labels")) and self.fields.matches(obj)

    def offer(self, event: WatchEvent) -> None:
        if event.resource is not self.resource:
            return
        now_matches = self._matches(event.obj)
        if event.type == "ADDED":
            if now_matches:
                self.queue.put_nowait(("ADDED", event.obj))
        elif event.type == "DELETED":
            if now_matches:
                self.queue.put_nowait(("DELETED", event.obj))
        else:
            was = self._matches(event.old)
            if was and now_matches:
                self.queue.put_nowait(("MODIFIED", event.obj))
            elif now_matches:
                self.queue.put_nowait(("ADDED", event.obj))
            elif was:
                self.queue.put_nowait(("DELETED", event.obj))


class Admission:
    """A hook the store calls before persisting (allocators, namespace lifecycle); raise ApiStatusError to refuse."""

    def on_create(self, resource: Resource, obj: Obj) -> None: ...

    def on_update(self, resource: Resource, old: Obj, new: Obj) -> None: ...

    def committed_delete(self, resource: Resource, obj: Obj) -> None: ...


class Store:
    """Objects of every served resource, keyed by (namespace, name), plus history and watches."""

    def __init__(self, *, history_limit: int = DEFAULT_HISTORY_LIMIT, validate_policies: bool = True) -> None:
        self.rv = 0
        # False: policies get only their CRD's structural check, as on a cluster without Propolis' validation
        # (tests of the k8s-watcher's own refusal path need an invalid policy to reach it)
        self.validate_policies = validate_policies
        self.objects: dict[tuple[str, str], dict[tuple[str, str], Obj]] = {r.key: {} for r in RESOURCES}
        self.history: collections.deque[WatchEvent] = collections.deque()
        self.history_limit = history_limit
        self.floor = 0  # watches from a resourceVersion below this get 410 Expired
        self.watches: set[Watch] = set()
        self.admissions: list[Admission] = []
        self._grace_timers: dict[tuple[str, str, str], asyncio.TimerHandle] = {}
        self.namespace_finalize_delay = 0.5  # seconds a deleted namespace stays Terminating before its contents go
        self.hooks: list[Callable[[WatchEvent], None]] = []  # in-process controllers, called after each commit
        self.wal: Wal | None = None  # the store on disk (api_wal.py); None: in memory only

    # --- on disk -------------------------------------------------------------------------

    def attach_wal(self, wal: Wal) -> None:
        """Load what `wal` holds (objects and the revision they reached) and log every commit to it from now.

        The watch history starts empty: a watch from an older resourceVersion gets 410 Expired and relists,
        and resourceVersions continue upward from the last one committed. Call with the event loop running, so
        pods that were terminating and namespaces being finalized get their timers again."""
        assert self.rv == 0, "attach the store on disk before the first write"
        rv, objects = wal.load()
        by_key = {r.key: r for r in RESOURCES}
        for resource_key, bucket in objects.items():
            if resource_key not in by_key:
                log.warning("stored objects of an unknown resource %s/%s are ignored", *resource_key)
                continue
            self.objects[resource_key].update(bucket)
        self.rv = self.floor = rv
        wal.start(lambda: (self.rv, [(key, obj) for key, bucket in self.objects.items() for obj in bucket.values()]))
        self.wal = wal
        self._resume_timers()

    def _resume_timers(self) -> None:
        """Timers die with the process: re-arm pod GC for terminating pods and namespace finalization."""
        pods = next(r for r in RESOURCES if r.plural == "pods")
        namespaces = next(r for r in RESOURCES if r.plural == "namespaces")
        now = datetime.now(UTC)
        for pod in self.stored(pods):
            meta = pod["metadata"]
            if meta.get("deletionTimestamp"):
                left = (datetime.strptime(meta["deletionTimestamp"], "%Y-%m-%dT%H:%M:%SZ")
                        .replace(tzinfo=UTC) - now).total_seconds()
                self._schedule_forced_delete(pods, meta.get("namespace"), meta["name"], max(int(left), 0))
        for ns in self.stored(namespaces):
            name = ns["metadata"]["name"]
            if ns["metadata"].get("deletionTimestamp"):
                self._schedule(("namespaces", "", name), self.namespace_finalize_delay,
                               functools.partial(self._finalize_namespace, namespaces, name), run_without_loop=False)

    async def sync(self) -> None:
        """Return once every commit so far is on disk (group commit; immediate without a store on disk)."""
        if self.wal is not None:
            await self.wal.sync()

    # --- reading -------------------------------------------------------------------------

    def _bucket(self, resource: Resource) -> dict[tuple[str, str], Obj]:
        return self.objects[resource.key]

    def _key(self, resource: Resource, namespace: str | None, name: str) -> tuple[str, str]:
        return ((namespace or "") if resource.namespaced else "", name)

    def get(self, resource: Resource, namespace: str | None, name: str) -> Obj:
        obj = self._bucket(resource).get(self._key(resource, namespace, name))
        if obj is None:
            raise not_found(resource, name)
        return clone(obj)

    def find(self, resource: Resource, namespace: str | None, name: str) -> Obj | None:
        obj = self._bucket(resource).get(self._key(resource, namespace, name))
        return clone(obj) if obj is not None else None

    def list(self, resource: Resource, namespace: str | None = None, labels: LabelSelector = MATCH_ALL_LABELS,
             fields: FieldSelector = MATCH_ALL_FIELDS, *, limit: int = 0,
             continue_token: str = "") -> tuple[ObjList, str, str]:
        """(items, resourceVersion, continue) sorted by namespace/name, like etcd's key order."""
        start_after: tuple[str, str] | None = None
        rv = str(self.rv)
        if continue_token:
            try:
                token = json.loads(base64.urlsafe_b64decode(continue_token.encode()))
                start_after, rv = (token["ns"], token["name"]), token["rv"]
            except (ValueError, KeyError, TypeError):
                raise bad_request(f"continue key is not valid: {continue_token!r}") from None
        items: ObjList = []
        for key in sorted(self._bucket(resource)):
            if start_after is not None and key <= start_after:
                continue
            obj = self._bucket(resource)[key]
            meta = obj["metadata"]
            if namespace is not None and resource.namespaced and meta.get("namespace") != namespace:
                continue
            if not labels.matches(meta.get("labels")) or not fields.matches(obj):
                continue
            if limit and len(items) == limit:
                last = items[-1]["metadata"]
                token = {"ns": last.get("namespace", ""), "name": last["name"], "rv": rv}
                return items, rv, base64.urlsafe_b64encode(json.dumps(token).encode()).decode()
            items.append(clone(obj))
        return items, rv, ""

    # --- writing -------------------------------------------------------------------------

    def _commit(self, resource: Resource, etype: str, obj: Obj, old: Obj | None) -> Obj:
        self.rv += 1
        if etype != "DELETED":
            obj["metadata"]["resourceVersion"] = str(self.rv)
            self._bucket(resource)[self._key(resource, obj["metadata"].get("namespace"), obj["metadata"]["name"])] = obj
        else:
            obj["metadata"]["resourceVersion"] = str(self.rv)
            self._bucket(resource).pop(self._key(resource, obj["metadata"].get("namespace"),
                                                 obj["metadata"]["name"]), None)
        if self.wal is not None:
            self.wal.append(self.rv, resource.key, etype, obj)
        event = WatchEvent(self.rv, resource, etype, clone(obj), old)
        self.history.append(event)
        while len(self.history) > self.history_limit:
            self.floor = self.history.popleft().rv
        for watch in list(self.watches):
            watch.offer(event)
        for hook in self.hooks:
            hook(event)
        return clone(obj)

    def _check_namespace(self, resource: Resource, namespace: str | None) -> None:
        if resource.namespaced:
            ns_resource = next(r for r in RESOURCES if r.plural == "namespaces")
            if not namespace:
                raise bad_request("the server could not find the requested resource: a namespace is required")
            if (namespace_obj := self._bucket(ns_resource).get(("", namespace))) is None:
                raise not_found(ns_resource, namespace)
            if namespace_obj["metadata"].get("deletionTimestamp"):
                raise ApiStatusError(403, "Forbidden", f'{resource.qualified()} is forbidden: unable to create new '
                                                       f"content in namespace {namespace} because it is being "
                                                       "terminated")

    def _prepare_identity(self, resource: Resource, namespace: str | None, obj: Obj) -> Obj:
        if not isinstance(obj, dict):
            raise bad_request("the body of the request is not a JSON object")
        api_version, kind = obj.get("apiVersion"), obj.get("kind")
        if api_version and api_version != resource.api_version:
            raise bad_request(f"the API version in the data ({api_version}) does not match the expected API version "
                              f"({resource.api_version})")
        if kind and kind != resource.kind:
            raise bad_request(f"the kind in the data ({kind}) does not match the expected kind ({resource.kind})")
        obj["apiVersion"], obj["kind"] = resource.api_version, resource.kind
        meta = obj.get("metadata")
        if meta is None:
            meta = obj["metadata"] = {}
        if not isinstance(meta, dict):
            raise bad_request("metadata must be an object")
        if resource.namespaced:
            if meta.get("namespace") and namespace and meta["namespace"] != namespace:
                raise bad_request("the namespace of the provided object does not match the namespace sent on the "
                                  "request")
            meta["namespace"] = namespace or meta.get("namespace") or "default"
        else:
            meta.pop("namespace", None)
        return meta

    def _validate(self, resource: Resource, obj: Obj) -> None:
        """The product's validators (propolis.k8s.validate): what `sandbox apply` and the k8s-watcher check too."""
        name = obj["metadata"].get("name", "")
        size = len(orjson.dumps(obj))
        if size > MAX_OBJECT_BYTES:
            raise too_large(resource, name, size)
        errors = validate.object_errors(resource.kind, obj, policies=self.validate_policies)
        if errors:
            raise unprocessable(resource, name, errors)

    def create(self, resource: Resource, namespace: str | None, obj: Obj, *, dry_run: bool = False) -> Obj:
        obj = clone(obj)
        meta = self._prepare_identity(resource, namespace, obj)
        if not meta.get("name"):
            if meta.get("generateName"):
                meta["name"] = meta["generateName"] + "".join(random.choices(_GENERATE_ALPHABET, k=5))
            else:
                raise unprocessable(resource, "", [ValidationError("metadata.name",
                                                                   "Required value: name or generateName is required")])
        if resource.namespaced:
            self._check_namespace(resource, meta["namespace"])
        if self._key(resource, meta.get("namespace"), meta["name"]) in self._bucket(resource):
            raise already_exists(resource, meta["name"])
        if resource.has_status and resource.status_on_create != "keep":
            if callable(resource.status_on_create):
                obj["status"] = resource.status_on_create(obj)
            else:
                obj.pop("status", None)
        resource.defaults(obj)
        self._validate(resource, obj)
        for admission in self.admissions:
            admission.on_create(resource, obj)
        for k in ("resourceVersion", "deletionTimestamp", "deletionGracePeriodSeconds"):
            meta.pop(k, None)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = now_rfc3339()
        meta["generation"] = 1
        if dry_run:
            return obj
        return self._commit(resource, "ADDED", obj, None)

    def update(self, resource: Resource, namespace: str | None, name: str, obj: Obj, *,
               subresource: str = "", dry_run: bool = False) -> Obj:
        """PUT: optimistic concurrency on metadata.resourceVersion; `status` subresource changes only status."""
        obj = clone(obj)
        meta = self._prepare_identity(resource, namespace, obj)
        if meta.get("name") and meta["name"] != name:
            raise bad_request(f'the name of the object ({meta["name"]}) does not match the name on the URL ({name})')
        meta["name"] = name
        current = self._bucket(resource).get(self._key(resource, namespace, name))
        if current is None:
            raise not_found(resource, name)
        wanted_rv = meta.get("resourceVersion")
        if wanted_rv and str(wanted_rv) != current["metadata"]["resourceVersion"]:
            raise conflict(resource, name, "the object has been modified; please apply your changes to the latest "
                                           "version and try again")
        if subresource == "status":
            new = clone(current)
            new["status"] = obj.get("status", {})
        else:
            new = obj
            if resource.has_status:
                if "status" in current:
                    new["status"] = clone(current["status"])
                else:
                    new.pop("status", None)
            for k in ("uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "namespace"):
                if k in current["metadata"]:
                    new["metadata"][k] = current["metadata"][k]
                else:
                    new["metadata"].pop(k, None)
            resource.defaults(new)
            self._validate(resource, new)
            for admission in self.admissions:
                admission.on_update(resource, current, new)
        new["metadata"]["generation"] = current["metadata"].get("generation", 1)
        if _spec_of(new, resource) != _spec_of(current, resource):
            new["metadata"]["generation"] += 1
        new["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        if new == current:
            return clone(current)  # a no-op write: no new resourceVersion, no event (as kube-apiserver)
        if dry_run:
            return new
        return self._commit(resource, "MODIFIED", new, clone(current))

    def delete(self, resource: Resource, namespace: str | None, name: str, *, grace_period: int | None = None,
               precondition_uid: str = "", precondition_rv: str = "", dry_run: bool = False,
               _finalize: bool = False) -> Obj:
        """Pods bound to an existing node terminate gracefully (deletionTimestamp; the kubelet finalizes)."""
        current = self._bucket(resource).get(self._key(resource, namespace, name))
        if current is None:
            raise not_found(resource, name)
        if precondition_uid and precondition_uid != current["metadata"].get("uid"):
            raise conflict(resource, name, f"Precondition failed: UID in precondition: {precondition_uid}, UID in "
                                           f"object meta: {current['metadata'].get('uid')}")
        if precondition_rv and precondition_rv != current["metadata"].get("resourceVersion"):
            raise conflict(resource, name, "the object has been modified; please apply your changes to the latest "
                                           "version and try again")
        if dry_run:
            return clone(current)
        if resource.kind == "Pod" and self._graceful(current, grace_period):
            if current["metadata"].get("deletionTimestamp"):
                return clone(current)
            grace = grace_period if grace_period is not None else \
                int(current["spec"].get("terminationGracePeriodSeconds", 30))
            new = clone(current)
            new["metadata"]["deletionTimestamp"] = now_rfc3339(grace)
            new["metadata"]["deletionGracePeriodSeconds"] = grace
            self._schedule_forced_delete(resource, namespace, name, grace)
            return self._commit(resource, "MODIFIED", new, clone(current))
        if resource.kind == "Namespace" and current["metadata"].get("deletionTimestamp") and not _finalize:
            return clone(current)
        if resource.kind == "Namespace" and not _finalize:
            new = clone(current)
            new["metadata"]["deletionTimestamp"] = now_rfc3339()
            new["status"] = {"phase": "Terminating"}
            out = self._commit(resource, "MODIFIED", new, clone(current))
            self._schedule(("namespaces", "", name), self.namespace_finalize_delay,
                           lambda: self._finalize_namespace(resource, name), run_without_loop=True)
            return out
        timer = self._grace_timers.pop((resource.plural, namespace or "", name), None)
        if timer is not None:
            timer.cancel()
        gone = clone(current)
        out = self._commit(resource, "DELETED", gone, clone(current))
        for admission in self.admissions:
            admission.committed_delete(resource, out)
        return out

    def _finalize_namespace(self, resource: Resource, name: str) -> None:
        """The namespace controller's job: delete what the namespace holds, then the namespace."""
        for other in RESOURCES:
            if other.namespaced:
                for key in [k for k in self._bucket(other) if k[0] == name]:
                    self.delete(other, name, key[1], grace_period=0)
        self.delete(resource, None, name, grace_period=0, _finalize=True)

    def _schedule(self, key: tuple[str, str, str], delay: float, action: Callable[[], object], *,
                  run_without_loop: bool) -> None:
        """Run `action` after `delay` on the event loop (outside a loop: now, or never)."""
        def run() -> None:
            self._grace_timers.pop(key, None)
            try:
                action()
            except ApiStatusError:
                pass
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            if run_without_loop:
                run()
            return
        self._grace_timers[key] = loop.call_later(max(delay, 0), run)

    def _graceful(self, pod: Obj, grace_period: int | None) -> bool:
        if grace_period == 0:
            return False
        node = (pod.get("spec") or {}).get("nodeName")
        if not node:
            return False
        nodes = next(r for r in RESOURCES if r.plural == "nodes")
        return ("", node) in self._bucket(nodes)

    def _schedule_forced_delete(self, resource: Resource, namespace: str | None, name: str, grace: int) -> None:
        """The sandbox's pod GC: a pod its kubelet never finalized is removed when its grace period ends."""
        self._schedule((resource.plural, namespace or "", name), grace + 1,
                       lambda: self.delete(resource, namespace, name, grace_period=0), run_without_loop=False)

    # --- watching ------------------------------------------------------------------------

    def watch(self, resource: Resource, namespace: str | None, labels: LabelSelector, fields: FieldSelector,
              resource_version: str | None) -> Watch:
        """Start a watch: unset/"0" = current objects as ADDED then changes; R = every change after R (or 410)."""
        w = Watch(resource, namespace, labels, fields)
        if not resource_version or resource_version == "0":
            items, _, _ = self.list(resource, namespace, labels, fields)
            for item in items:
                w.queue.put_nowait(("ADDED", item))
        else:
            try:
                since = int(resource_version)
            except ValueError:
                raise bad_request(f'resourceVersion: Invalid value: "{resource_version}": must be an integer') from None
            if since < self.floor:
                raise expired(since, self.floor)
            for event in self.history:
                if event.rv > since:
                    w.offer(event)
        self.watches.add(w)
        return w

    def stop_watch(self, w: Watch) -> None:
        self.watches.discard(w)

    def compact(self) -> int:
        """Forget every event so far: a watch from an older resourceVersion now gets 410 Expired."""
        self.history.clear()
        self.floor = self.rv
        return self.rv

    def close(self) -> None:
        if self.wal is not None:
            self.wal.close()
            self.wal = None
        for w in list(self.watches):
            w.queue.put_nowait(None)
        self.watches.clear()
        for timer in self._grace_timers.values():
            timer.cancel()
        self._grace_timers.clear()

    def all_objects(self, resource: Resource) -> Iterable[Obj]:
        return (clone(o) for o in self._bucket(resource).values())

    def stored(self, resource: Resource, namespace: str | None = None) -> ObjList:
        """The stored objects themselves (no copy): for in-process readers that never mutate them."""
        return [o for o in self._bucket(resource).values()
                if namespace is None or o["metadata"].get("namespace") == namespace]


def _spec_of(obj: Obj, resource: Resource) -> Obj:
    """Everything but metadata and status: a change here bumps metadata.generation."""
    return {k: v for k, v in obj.items() if k not in ("metadata", "status", "apiVersion", "kind")}

