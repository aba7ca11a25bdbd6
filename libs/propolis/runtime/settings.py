"""Settings are dataclasses with documented defaults; flags and env vars derive from field names.

Field ``heartbeat_interval`` is ``--heartbeat-interval`` and
``PROPOLIS_HEARTBEAT_INTERVAL``; a flag beats the env var, which beats the
default. ``metadata={"help": ..., "unit": ..., "choices": ...}`` documents a
field; validation lives in ``__post_init__`` and raises ValidationError naming
the field.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from propolis.errors import ValidationError
from propolis.model.types import NodeName

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

S = TypeVar("S", bound="DataclassInstance")

ENV_PREFIX = "PROPOLIS_"


def setting(default: Any, help: str, *, unit: str = "", choices: tuple[str, ...] = ()) -> Any:
    """A documented settings field."""
    return field(default=default, metadata={"help": help, "unit": unit, "choices": choices})


@dataclass
class CommonSettings:
    """Settings every service has."""

    nats_url: str = setting("nats://127.0.0.1:4222", "NATS server URL")
    nats_user: str = setting("", "NATS user (one per service; empty = no auth)")
    nats_password: str = setting("", "NATS password")
    node_name: NodeName = setting(socket.gethostname(), "Kubernetes node this instance serves")
    cluster_name: str = setting("default", "cluster name (Cluster Mesh: unique per cluster)")
    cluster_id: int = setting(0, "cluster ID 0-255 (identities are shifted by cluster_id << 16)")
    http_host: str = setting("127.0.0.1", "address of /healthz, /readyz and /metrics")
    http_port: int = setting(0, "port of /healthz, /readyz and /metrics (0 = any free port, -1 = off)")
    heartbeat_interval: float = setting(2.0, "how often to publish a heartbeat", unit="s")
    log_level: str = setting("info", "log level", choices=("debug", "info", "warning", "error"))
    shutdown_timeout: float = setting(10.0, "deadline for a graceful stop", unit="s")

    def __post_init__(self) -> None:
        if not self.nats_url.startswith(("nats://", "tls://", "ws://", "wss://")):
            raise ValidationError("nats_url", f"not a NATS URL: {self.nats_url!r}")
        if not 0 <= self.cluster_id <= 255:
            raise ValidationError("cluster_id", f"must be 0-255, got {self.cluster_id}")
        if self.heartbeat_interval <= 0:
            raise ValidationError("heartbeat_interval", "must be > 0")
        if not self.node_name:
            raise ValidationError("node_name", "must not be empty")


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def _convert(name: str, typ: Any, raw: str) -> Any:
    typ = getattr(typ, "__supertype__", typ)  # a NewType (NodeName) converts as the type it names
    try:
        if typ is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if typ in (int, float, str):
            return typ(raw)
        if typing.get_origin(typ) is list:
            return [x for x in raw.split(",") if x]
    except ValueError:
        raise ValidationError(name, f"invalid value {raw!r} for {getattr(typ, '__name__', typ)}") from None
    raise ValidationError(name, f"unsupported settings type {typ}")


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field; values stay strings here and are converted by `load`."""
    for f in dataclasses.fields(cls):
        meta = f.metadata
        unit = f" [{meta['unit']}]" if meta.get("unit") else ""
        parser.add_argument(flag_name(f.name), dest=f.name, default=None,
                            help=f"{meta.get('help', '')}{unit} (env {env_name(f.name)}, default {f.default!r})")


def load(cls: type[S], args: argparse.Namespace | None = None, env: Mapping[str, str] | None = None) -> S:
    """Build settings from flags (``args``), then env, then defaults; validate."""
    env = os.environ if env is None else env
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        raw = getattr(args, f.name, None) if args is not None else None
        if raw is None:
            raw = env.get(env_name(f.name))
        if raw is None:
            continue
        value = _convert(f.name, hints[f.name], raw) if isinstance(raw, str) else raw
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise ValidationError(f.name, f"must be one of {', '.join(choices)}, got {value!r}")
        values[f.name] = value
    return cls(**values)


def describe(obj: Any) -> list[tuple[str, Any, str]]:
    """(flag, resolved value, help) rows for ``--describe``."""
    rows = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if "password" in f.name and value:
            value = "***"
        rows.append((flag_name(f.name), value, f.metadata.get("help", "")))
    return rows
