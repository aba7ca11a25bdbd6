"""nats-server configuration with one user per service: publish rights = its own slice.

Reading is open to every service (subscribe ``>``, JetStream consumer and
direct-get APIs on every bucket); writing a KV bucket means publishing to
``$KV.<bucket>.<key>``, so a user may publish only under the keys of its own
slice (from `subjects.slices`). Creating or deleting streams is the admin's
alone (the admin user is what the CLI, the sandbox supervisor and bucket
bootstrap use). A compromised DNS proxy therefore cannot rewrite policy.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass

from propolis.bus import subjects

#: JetStream API calls any reader needs: account info, consumers, message gets, stream info.
READER_API = [
    "$JS.API.INFO",
    "$JS.API.STREAM.INFO.*",
    "$JS.API.STREAM.NAMES",
    "$JS.API.STREAM.MSG.GET.*",
    "$JS.API.DIRECT.GET.>",
    "$JS.API.CONSUMER.CREATE.>",
    "$JS.API.CONSUMER.DURABLE.CREATE.>",
    "$JS.API.CONSUMER.INFO.>",
    "$JS.API.CONSUMER.DELETE.>",
    "$JS.API.CONSUMER.MSG.NEXT.>",
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


def publish_allow(service: str, node: str = "*") -> list[str]:
    """The subjects ``service`` (on ``node``) may publish to."""
    sl = subjects.slices(node)[service]
    allow = list(READER_API)
    allow += [f"$KV.{bucket}.{keys}" for bucket, keys in sl.kv_writes]
    allow += list(sl.publishes)
    return allow


def server_config(users: dict[str, Credentials], *, admin: Credentials,
                  nodes: dict[str, list[str]] | None = None) -> str:
    """nats-server config text. ``users`` maps service name -> credentials; a service listed in
    ``nodes`` gets one user per node (``service@node``) whose per-node slices name that node."""
    entries: list[dict[str, object]] = [
        {"user": admin.user, "password": admin.password},  # admin: everything
    ]
    for service, cred in users.items():
        for node in (nodes or {}).get(service, [None]):  # type: ignore[list-item]
            entries.append({
                "user": user_name(cred.user, node), "password": cred.password,
                "permissions": {"publish": {"allow": publish_allow(service, node or "*")},
                                "subscribe": {"allow": [">"]}},
            })
    # JSON is valid nats-server config syntax.
    return "authorization " + json.dumps({"users": entries}, indent=2) + "\n"


def generate_credentials(services: list[str]) -> tuple[Credentials, dict[str, Credentials]]:
    admin = Credentials("admin", secrets.token_hex(16))
    return admin, {s: Credentials(s, secrets.token_hex(16)) for s in services}
