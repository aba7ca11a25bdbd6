"""msgpack codec with a schema name and version on every payload.

A payload is a msgpack map ``{"_s": schema, "_v": [major, minor], ...fields}``.
A reader accepts any minor version of a major it knows (new optional fields are
ignored, missing ones take their defaults) and refuses an unknown major with
`SchemaVersionError` — a clear error instead of silently misreading state.
Typed messages are dataclasses registered with `@message`; anything shown to a
person goes through `to_json` (orjson).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, TypeVar

import msgpack
import orjson

from propolis.errors import PermanentError, SchemaVersionError

T = TypeVar("T")

_REGISTRY: dict[str, type] = {}


class DecodeError(PermanentError):
    """Bytes that are not a Propolis payload (malformed msgpack, missing schema)."""


def message(schema: str, version: tuple[int, int] = (1, 0)) -> Callable[[type[T]], type[T]]:
    """Class decorator: register a dataclass as the typed form of ``schema``."""

    def wrap(cls: type[T]) -> type[T]:
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"{cls.__name__} must be a dataclass")
        if schema in _REGISTRY and _REGISTRY[schema] is not cls:
            raise TypeError(f"schema {schema!r} registered twice")
        cls.SCHEMA = schema  # type: ignore[attr-defined]
        cls.VERSION = version  # type: ignore[attr-defined]
        cls._FIELDS = tuple(f.name for f in dataclasses.fields(cls))  # type: ignore[attr-defined,arg-type]
        _REGISTRY[schema] = cls
        return cls

    return wrap


def encode(obj: Any) -> bytes:
    """Encode a registered message dataclass."""
    cls = type(obj)
    try:
        schema, version, fields = cls.SCHEMA, cls.VERSION, cls._FIELDS
    except AttributeError:
        raise TypeError(f"{cls.__name__} is not a registered message") from None
    payload: dict[str, Any] = {"_s": schema, "_v": version}
    for name in fields:
        payload[name] = getattr(obj, name)
    return msgpack.packb(payload, use_bin_type=True)


def decode_raw(data: bytes) -> dict[str, Any]:
    """Decode to a plain dict (schema fields included), validating the envelope only."""
    try:
        payload = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise DecodeError(f"malformed msgpack payload ({len(data)} bytes): {exc}") from exc
    if not isinstance(payload, dict) or "_s" not in payload or "_v" not in payload:
        raise DecodeError("payload has no schema envelope (_s/_v)")
    return payload


def decode(data: bytes, expected: type[T] | None = None) -> T:
    """Decode to the registered dataclass; ``expected`` pins the schema."""
    payload = decode_raw(data)
    schema = payload.pop("_s")
    version = payload.pop("_v")
    cls = _REGISTRY.get(schema)
    if cls is None:
        raise DecodeError(f"unknown schema {schema!r}")
    if expected is not None and cls is not expected:
        raise DecodeError(f"expected schema {expected.SCHEMA!r}, got {schema!r}")  # type: ignore[attr-defined]
    major = version[0] if isinstance(version, (list, tuple)) and version else None
    if major != cls.VERSION[0]:  # type: ignore[attr-defined]
        raise SchemaVersionError(
            f"schema {schema!r} version {version!r}: this build reads major {cls.VERSION[0]} only"  # type: ignore[attr-defined]
        )
    known = cls._FIELDS  # type: ignore[attr-defined]
    return cls(**{k: v for k, v in payload.items() if k in known})  # type: ignore[no-any-return]


def to_jsonable(data: bytes) -> Any:
    """Best effort view of any payload for a person: msgpack -> python, raw bytes otherwise."""
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception:
        try:
            return {"_raw": data.decode()}
        except UnicodeDecodeError:
            return {"_raw_hex": data.hex()}


def to_json(obj: Any) -> bytes:
    """JSON for people and HTTP clients (dataclasses, bytes as text where possible)."""
    return orjson.dumps(obj, default=_json_default, option=orjson.OPT_NON_STR_KEYS)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (bytes, bytearray)):
        try:
            return obj.decode()
        except UnicodeDecodeError:
            return obj.hex()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")
