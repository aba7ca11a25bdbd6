"""msgpack codec with a schema name and version on every payload.

A payload is a msgpack array ``[schema, major, minor, field1, field2, …]``
with the fields in dataclass declaration order (positional, like protobuf
field numbers: compact and about twice as fast as a map). A minor version may
only append fields: a reader ignores trailing values it does not know and
gives missing trailing fields their defaults. An unknown major version is
refused with `SchemaVersionError` — a clear error instead of silently
misreading state. Decoding also checks every field against the dataclass's
type annotations (one generic check, here): a payload whose `ips` is a
string where a list is declared is a `DecodeError` naming the field, so
poison data is refused where it enters instead of crashing a consumer.
Typed messages are dataclasses registered with `@message`;
anything shown to a person goes through `to_jsonable`/`to_json` (orjson),
which puts the field names back.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Any, ClassVar, Protocol, TypeVar, cast, overload

import msgpack
import orjson

from propolis.errors import PermanentError, SchemaVersionError

T = TypeVar("T")


class _Message(Protocol):
    """What `@message` adds to a dataclass (set at registration, so invisible to type checkers otherwise)."""

    SCHEMA: ClassVar[str]
    VERSION: ClassVar[tuple[int, int]]
    _FIELDS: ClassVar[tuple[str, ...]]
    _CHECKS: ClassVar[tuple[tuple[str, str, Callable[[Any], bool]], ...]]
    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]


_REGISTRY: dict[str, type[_Message]] = {}
_pack = msgpack.Packer(use_bin_type=True).pack
_unpackb = msgpack.unpackb


class DecodeError(PermanentError):
    """Bytes that are not a Propolis payload (malformed msgpack, missing schema)."""


def message(schema: str, version: tuple[int, int] = (1, 0)) -> Callable[[type[T]], type[T]]:
    """Class decorator: register a dataclass as the typed form of ``schema``."""

    def wrap(cls: type[T]) -> type[T]:
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"{cls.__name__} must be a dataclass")
        if schema in _REGISTRY and _REGISTRY[schema] is not cls:
            raise TypeError(f"schema {schema!r} registered twice")
        registered = cast("type[_Message]", cls)  # what the lines below make it
        registered.SCHEMA = schema
        registered.VERSION = version
        registered._FIELDS = tuple(f.name for f in dataclasses.fields(cls))
        registered._CHECKS = _field_checks(cls)
        _REGISTRY[schema] = registered
        return cls

    return wrap


Check = Callable[[Any], bool]


def _type_check(tp: Any) -> Check | None:
    """A predicate for values of annotation ``tp`` as msgpack decodes them; None = anything goes."""
    if tp is Any or tp is object:
        return None
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        checks = [_type_check(a) for a in args]
        alternatives = [c for c in checks if c is not None]
        if len(alternatives) < len(checks):
            return None
        return lambda v: any(a(v) for a in alternatives)
    if origin in (list, tuple, set, frozenset):  # every sequence travels as a msgpack array
        homogeneous = origin is not tuple or (len(args) == 2 and args[1] is Ellipsis)
        item = _type_check(args[0]) if args and homogeneous else None
        if item is None:
            return lambda v: isinstance(v, list)
        return lambda v: isinstance(v, list) and all(item(x) for x in v)
    if origin is dict:
        key, value = (_type_check(args[0]), _type_check(args[1])) if args else (None, None)
        if key is None and value is None:
            return lambda v: isinstance(v, dict)
        return lambda v: isinstance(v, dict) and all((key is None or key(k)) and (value is None or value(x))
                                                     for k, x in v.items())
    if tp is float:
        return lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    if tp is int:
        return lambda v: isinstance(v, int) and not isinstance(v, bool)
    if isinstance(tp, type):
        return lambda v: isinstance(v, tp)
    return None


def _field_checks(cls: type) -> tuple[tuple[str, str, Check], ...]:
    """(field, declared type as text, predicate) for every field whose type can be checked."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - annotations naming something unresolvable: decode unchecked
        return ()
    out = []
    for f in dataclasses.fields(cls):
        check = _type_check(hints.get(f.name, Any))
        if check is not None:
            shown = getattr(hints[f.name], "__name__", None) if typing.get_origin(hints[f.name]) is None else None
            out.append((f.name, shown or str(hints[f.name]).replace("typing.", ""), check))
    return tuple(out)


def _checked(cls: type[_Message], obj: T) -> T:
    values = obj.__dict__
    for name, declared, check in cls._CHECKS:
        if not check(values[name]):
            shown = repr(values[name])
            raise DecodeError(f"{cls.SCHEMA} field {name!r}: expected {declared}, got "
                              f"{type(values[name]).__name__} {shown[:60]}{'…' if len(shown) > 60 else ''}")
    return obj


def encode(obj: Any) -> bytes:
    """Encode a registered message dataclass."""
    cls = type(obj)
    try:
        schema, (major, minor) = cls.SCHEMA, cls.VERSION
    except AttributeError:
        raise TypeError(f"{cls.__name__} is not a registered message") from None
    return _pack([schema, major, minor, *obj.__dict__.values()])


def _envelope(data: bytes) -> list[Any]:
    try:
        payload = _unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise DecodeError(f"malformed msgpack payload ({len(data)} bytes): {exc}") from exc
    if (not isinstance(payload, list) or len(payload) < 3 or not isinstance(payload[0], str)
            or not isinstance(payload[1], int)):
        raise DecodeError("payload has no schema envelope [schema, major, minor, …]")
    return payload


@overload
def decode(data: bytes, expected: None = None) -> Any: ...
@overload
def decode(data: bytes, expected: type[T]) -> T: ...
def decode(data: bytes, expected: type[T] | None = None) -> T | Any:
    """Decode to the registered dataclass; ``expected`` pins the schema."""
    payload = _envelope(data)
    schema, major = payload[0], payload[1]
    cls = _REGISTRY.get(schema)
    if cls is None:
        raise DecodeError(f"unknown schema {schema!r}")
    if expected is not None and cls is not expected:
        raise DecodeError(f"expected schema {getattr(expected, 'SCHEMA', expected.__name__)!r}, got {schema!r}")
    if major != cls.VERSION[0]:
        raise SchemaVersionError(
            f"schema {schema!r} version {major}.{payload[2]}: this build reads major {cls.VERSION[0]} only")
    fields = cls._FIELDS
    values = payload[3:]
    if len(values) >= len(fields):
        obj = cls.__new__(cls)  # the common case: skip __init__, drop unknown trailing values
        obj.__dict__.update(zip(fields, values))
        return cast(T, _checked(cls, obj))  # the registry maps the schema to its class: T when expected
    missing = [f.name for f in dataclasses.fields(cls)[len(values):]
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise DecodeError(f"{schema} {major}.{payload[2]} payload lacks required fields {', '.join(missing)}")
    return cast(T, _checked(cls, cls(**dict(zip(fields, values)))))


def to_jsonable(data: bytes) -> Any:
    """A view of any payload for a person: named fields when the schema is known."""
    try:
        payload = _envelope(data)
    except DecodeError:
        try:
            return _unpackb(data, raw=False, strict_map_key=False)
        except Exception:  # noqa: BLE001 - not msgpack: the fallback below decides
            try:
                return {"_raw": data.decode()}
            except UnicodeDecodeError:
                return {"_raw_hex": data.hex()}
    cls = _REGISTRY.get(payload[0])
    names = cls._FIELDS if cls is not None else ()
    doc: dict[str, Any] = {"_schema": payload[0], "_version": f"{payload[1]}.{payload[2]}"}
    for i, value in enumerate(payload[3:]):
        doc[names[i] if i < len(names) else f"_{i}"] = value
    return doc


def as_dict(obj: Any) -> dict[str, Any]:
    """A message's fields as a plain dict (for JSON output)."""
    return dict(obj.__dict__)


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
