"""nats-server configuration with one user per service: publish rights = its own slice.

Reading is open to every service (subscribe ``>``, JetStream consumer and
direct-get APIs on every bucket); writing a KV bucket means publishing to
``$KV.<bucket>.<key>``, so a user may publish only under the keys of its own
slice (from `subjects.slices`). Creating or deleting streams is the admin's
alone (the admin user is what the CLI, the sandbox supervisor and bucket
bootstrap use). A compromised DNS proxy therefore cannot rewrite policy, and
a process without credentials cannot connect at all.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path

from propolis.bus import subjects

#: JetStream API calls any reader needs: account and stream info, message gets, and its own consumers.
#: Consumers: only `CONSUMER.CREATE.<stream>` (no name token), so the server names every consumer a
#: service creates and no service can create, update or take over a named one; no DELETE, no durables,
#: no pull (MSG.NEXT): a service cannot delete or drain another's consumers. Its own ephemeral
#: consumers (KV watches) go away after their inactive threshold; snapshots use direct gets and
#: create none (`bus/snapshot.py`).
READER_API = [
    "$JS.API.INFO",
    "$JS.API.STREAM.INFO.*",
    "$JS.API.STREAM.NAMES",
    "$JS.API.STREAM.MSG.GET.*",
    "$JS.API.DIRECT.GET.>",
    "$JS.API.CONSUMER.CREATE.*",
    "$JS.API.CONSUMER.INFO.>",
    "$JS.FC.>",
    "$JS.ACK.>",
    "_INBOX.>",
    "$SRV.>",
]


@dataclass(frozen=True)
class Credentials:
    user: str
    password: str


def user_name(service: str, node: str | None = None) -> str:
    return f"{service}@{node}" if node else service


def service_of(user: str) -> tuple[str, str | None]:
    """``hubble@n1`` -> (``hubble``, ``n1``); ``k8s-watcher`` -> (``k8s-watcher``, None)."""
    service, _, node = user.partition("@")
    return service, node or None


def publish_allow(service: str, node: str = "*", *, kv_prefix: str = "") -> list[str]:
    """The subjects ``service`` (on ``node``) may publish to. A service the ownership table
    (`subjects.slices`) does not name may read and write nothing, not even its heartbeat.
    ``kv_prefix``: what a relay maps KV writes to (`relay.kv_write_prefix`): a server checks
    permissions on the mapped subject, so a relay's users are allowed the mapped key subjects."""
    sl = subjects.slices(node).get(service)
    allow = list(READER_API)
    if sl is None:
        return allow
    allow += [f"{kv_prefix}$KV.{bucket}.{keys}" for bucket, keys in sl.kv_writes]
    allow += list(sl.publishes)
    return allow


def remote_reader_permissions(bucket: str = subjects.CLUSTERMESH_BUCKET) -> dict[str, object]:
    """Cluster Mesh: what a remote cluster's clustermesh-apiserver may do here, with the one user
    (`subjects.CLUSTERMESH_REMOTE_USER`) this cluster hands out: read the export bucket (stream info,
    direct gets, its own watch consumers) and nothing else; it publishes to no KV or Propolis subject."""
    stream = f"KV_{bucket}"
    return {"publish": {"allow": [f"$JS.API.STREAM.INFO.{stream}", f"$JS.API.DIRECT.GET.{stream}",
                                  f"$JS.API.DIRECT.GET.{stream}.>", f"$JS.API.STREAM.MSG.GET.{stream}",
                                  f"$JS.API.CONSUMER.CREATE.{stream}", f"$JS.API.CONSUMER.INFO.{stream}.>",
                                  f"$JS.FC.{stream}.>", f"$JS.ACK.{stream}.>", "$JS.API.INFO"]},
            "subscribe": {"allow": ["_INBOX.>"]}}


def remote_users(services: list[str]) -> list[str]:
    """Users for other clusters: the remote reader exists only where a clustermesh-apiserver exports."""
    return [subjects.CLUSTERMESH_REMOTE_USER] if "clustermesh-apiserver" in services else []


def server_config(users: dict[str, Credentials], *, admin: Credentials, kv_prefix: str = "") -> str:
    """nats-server config text. ``users`` maps user name (``service``, or ``service@node`` for one
    node's instance, whose per-node slices then name that node) -> credentials. Connections without
    valid credentials are refused. ``kv_prefix``: see `publish_allow` (a relay's config)."""
    entries: list[dict[str, object]] = [
        {"user": admin.user, "password": admin.password},  # admin: everything
    ]
    for name, cred in users.items():
        service, node = service_of(name)
        perms = (remote_reader_permissions() if service == subjects.CLUSTERMESH_REMOTE_USER else
                 {"publish": {"allow": publish_allow(service, node or "*", kv_prefix=kv_prefix)},
                  "subscribe": {"allow": [">"]}})
        entries.append({"user": cred.user, "password": cred.password, "permissions": perms})
    # JSON is valid nats-server config syntax.
    return "authorization " + json.dumps({"users": entries}, indent=2) + "\n"


def generate_credentials(services: list[str], nodes: dict[str, list[str]] | None = None
                         ) -> tuple[Credentials, dict[str, Credentials]]:
    """The admin plus one user per service; a service listed in ``nodes`` gets one user (and
    password) per node instead, so one node's instance cannot act as another node's."""
    admin = Credentials("admin", secrets.token_hex(16))
    users: dict[str, Credentials] = {}
    for service in services:
        for node in (nodes or {}).get(service, [None]):
            name = user_name(service, node)
            users[name] = Credentials(name, secrets.token_hex(16))
    return admin, users


def save_credentials(path: Path, admin: Credentials, users: dict[str, Credentials]) -> None:
    """Write every password to ``path``, readable by root only (0600 from creation on)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"admin": asdict(admin), "users": {name: asdict(c) for name, c in users.items()}}
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def load_credentials(path: Path | str) -> tuple[Credentials, dict[str, Credentials]]:
    """What `save_credentials` wrote: (admin, users by name)."""
    data = json.loads(Path(path).read_text())
    return Credentials(**data["admin"]), {name: Credentials(**c) for name, c in data["users"].items()}
