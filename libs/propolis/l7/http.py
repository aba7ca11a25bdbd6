"""HTTP/1.1 for the L7 proxy: Cilium's HTTP rule semantics and a streaming message parser.

Rules (`HTTPRuleMatcher`, Cilium's `PortRuleHTTP` as Envoy enforces it): `method`, `path` and
`host` are regular expressions matched against the whole value (anchored full match; `path` is
the request target as sent, query included, like Envoy's `:path`); `headers` are "Name" (present)
or "Name: value" (equal); `headerMatches` compare a header's value, and a mismatch denies unless
`mismatch` is LOG (allowed, logged). ADD/DELETE/REPLACE (Envoy rewrites the header) and
secret-valued matches are not built: they deny on mismatch (fail closed). An empty rule allows
every request; a request is allowed when any rule matches.

Parsing (`MessageStream`): httptools (llhttp) turns bytes into events — a head, body pieces, the
end — for requests or responses, so every request on a kept-alive or pipelined connection is
judged on its own and bodies stream without being buffered. Limits, as Envoy's defaults:
a header block over `MAX_HEADER_BYTES` (60 KiB) is refused (431).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import httptools

from propolis.errors import ValidationError
from propolis.policy.rules import HTTPRule

MAX_HEADER_BYTES = 60 * 1024
ACCESS_DENIED = b"Access denied\r\n"


class HeaderTooLarge(Exception):
    """The header block passed MAX_HEADER_BYTES."""


class BadMessage(Exception):
    """The bytes are not HTTP/1.x (llhttp's error names what)."""


@dataclass
class Head:
    """A request line or status line and its headers, as received."""

    method: str = ""  # requests
    url: str = ""  # requests
    status: int = 0  # responses
    reason: str = ""  # responses
    version: str = "1.1"
    headers: list[tuple[str, str]] = field(default_factory=list)
    chunked: bool = False
    keep_alive: bool = True
    upgrade: bool = False

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k.lower() == name), None)

    @property
    def host(self) -> str:
        return self.header("host") or ""

    def serialize(self) -> bytes:
        """The head to send on (bodies follow as `body_bytes` frames them)."""
        if self.method:
            first = f"{self.method} {self.url} HTTP/{self.version}\r\n"
        else:
            first = f"HTTP/{self.version} {self.status} {self.reason}\r\n"
        lines = "".join(f"{k}: {v}\r\n" for k, v in self.headers)
        return (first + lines + "\r\n").encode("latin-1")


def body_bytes(head: Head, piece: bytes) -> bytes:
    """One body piece framed as the head announced it (chunked bodies are re-chunked)."""
    if not head.chunked:
        return piece
    return b"%x\r\n%s\r\n" % (len(piece), piece) if piece else b""


def end_bytes(head: Head) -> bytes:
    return b"0\r\n\r\n" if head.chunked else b""


class MessageStream:
    """Feed bytes, get events: ("head", Head), ("body", bytes), ("end", Head). Raises BadMessage,
    HeaderTooLarge."""

    def __init__(self, *, response: bool = False) -> None:
        self.response = response
        self._parser = (httptools.HttpResponseParser if response else httptools.HttpRequestParser)(self)
        self.events: list[tuple[str, Any]] = []
        self._head: Head | None = None
        self._header_bytes = 0
        self._name = b""
        self.in_message = False  # between a message's first byte and its end
        self.head_started: float | None = None  # monotonic time the current head began, None = not in a head

    # --- httptools callbacks ---
    def on_message_begin(self) -> None:
        self._head = Head()
        self._header_bytes = 0
        self.in_message = True
        self.head_started = time.monotonic()

    def _count(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > MAX_HEADER_BYTES:
            raise HeaderTooLarge()

    def on_url(self, url: bytes) -> None:
        assert self._head is not None
        self._count(len(url))
        self._head.url += url.decode("latin-1")

    def on_status(self, status: bytes) -> None:
        assert self._head is not None
        self._head.reason += status.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self._head is not None
        self._count(len(name) + len(value) + 4)
        self._head.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self.head_started = None
        head = self._head
        assert head is not None
        p = self._parser
        head.version = p.get_http_version()
        head.upgrade = p.should_upgrade()
        head.keep_alive = p.should_keep_alive() and not head.upgrade  # refused upgrades end the connection
        if isinstance(p, httptools.HttpResponseParser):
            head.status = p.get_status_code()
        else:
            head.method = p.get_method().decode("latin-1")
        te = (head.header("transfer-encoding") or "").lower()
        head.chunked = "chunked" in te
        self.events.append(("head", head))

    def on_body(self, body: bytes) -> None:
        self.events.append(("body", bytes(body)))

    def on_message_complete(self) -> None:
        self.events.append(("end", self._head))
        self.in_message = False

    # --- feeding ---
    def feed(self, data: bytes) -> list[tuple[str, Any]]:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # Upgrade/CONNECT: llhttp parses nothing after the head; the message ends here and so does
            # the connection (the caller refuses the upgrade)
            if self._head is not None and self.in_message:
                self._head.keep_alive = False
                self.events.append(("end", self._head))
                self.in_message = False
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, HeaderTooLarge):
                raise HeaderTooLarge() from None
            raise BadMessage(str(exc)) from None
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, HeaderTooLarge):
                raise HeaderTooLarge() from None
            raise BadMessage(str(exc)) from None
        events, self.events = self.events, []
        return events


def _regex(value: str, where: str) -> re.Pattern[str] | None:
    if not value:
        return None
    try:
        return re.compile(value)
    except re.error as exc:
        raise ValidationError(where, f"invalid regular expression {value!r}: {exc}") from None


@dataclass(frozen=True)
class HTTPRuleMatcher:
    """One compiled HTTP rule."""

    method: re.Pattern[str] | None
    path: re.Pattern[str] | None
    host: re.Pattern[str] | None
    headers: tuple[tuple[str, str | None], ...]  # (lowercase name, exact value or None = present)
    header_matches: tuple[tuple[str, str, str], ...]  # (lowercase name, value, mismatch action)

    @classmethod
    def compile(cls, rule: HTTPRule, where: str = "http") -> HTTPRuleMatcher:
        headers = []
        for h in rule.headers:
            name, sep, value = h.partition(":")
            headers.append((name.strip().lower(), value.strip() if sep else None))
        return cls(_regex(rule.method, f"{where}.method"), _regex(rule.path, f"{where}.path"),
                   _regex(rule.host, f"{where}.host"), tuple(headers),
                   tuple((m.name.lower(), m.value if m.secret is None else "\0secret", m.mismatch)
                         for m in rule.header_matches))

    def matches(self, head: Head) -> bool:
        if self.method and not self.method.fullmatch(head.method):
            return False
        if self.path and not self.path.fullmatch(head.url):
            return False
        if self.host and not self.host.fullmatch(head.host):
            return False
        for name, value in self.headers:
            got = head.header(name)
            if got is None or (value is not None and got != value):
                return False
        for name, value, mismatch in self.header_matches:
            if head.header(name) != value and mismatch != "LOG":
                return False
        return True


def compile_rules(rules: Iterable[HTTPRule]) -> tuple[HTTPRuleMatcher, ...]:
    return tuple(HTTPRuleMatcher.compile(r, f"http[{i}]") for i, r in enumerate(rules))


def allowed(matchers: Iterable[HTTPRuleMatcher], head: Head) -> bool:
    return any(m.matches(head) for m in matchers)


def local_response(status: int, reason: str, body: bytes, *, close: bool) -> bytes:
    """A response the proxy itself answers (Envoy's shape: `server: envoy`)."""
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-length: {len(body)}\r\ncontent-type: text/plain\r\n"
            f"server: envoy\r\n{'connection: close' + chr(13) + chr(10) if close else ''}\r\n").encode() + body


def denied_response(*, close: bool) -> bytes:
    return local_response(403, "Forbidden", ACCESS_DENIED, close=close)
