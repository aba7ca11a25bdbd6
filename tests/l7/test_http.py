"""The L7 proxy's HTTP/1.1 parsing and Cilium's HTTP rule semantics; the parser fuzzed with hypothesis."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from propolis.errors import ValidationError
from propolis.l7 import http
from propolis.policy.proxy_ports import PROXY_PORTS, proxy_port_for
from propolis.policy.rules import HeaderMatch, HTTPRule


def parse(data: bytes, *, response: bool = False) -> list[tuple[str, object]]:
    return http.MessageStream(response=response).feed(data)


def heads(data: bytes) -> list[http.Head]:
    return [v for k, v in parse(data) if k == "head"]


def test_pipelined_requests_are_separate_messages_with_their_bodies():
    data = (b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
            b"GET /b?q=1 HTTP/1.1\r\nHost: y\r\n\r\n"
            b"PUT /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n")
    events = parse(data)
    assert [k for k, _ in events] == ["head", "body", "end", "head", "end", "head", "body", "end"]
    a, b, c = heads(data)
    assert (a.method, a.url, a.host, b.url, b.host, c.chunked) == ("POST", "/a", "x", "/b?q=1", "y", True)
    assert http.body_bytes(c, b"hi") + http.end_bytes(c) == b"2\r\nhi\r\n0\r\n\r\n"


def test_a_request_split_anywhere_gives_the_same_events():
    data = b"GET /api/v1/users HTTP/1.1\r\nHost: api\r\nX-A: 1\r\n\r\n"
    whole = [(k, getattr(v, "url", v)) for k, v in parse(data)]
    for cut in range(1, len(data)):
        stream = http.MessageStream()
        events = stream.feed(data[:cut]) + stream.feed(data[cut:])
        assert [(k, getattr(v, "url", v)) for k, v in events] == whole


def test_header_block_over_60_kib_is_refused():
    stream = http.MessageStream()
    with pytest.raises(http.HeaderTooLarge):
        stream.feed(b"GET / HTTP/1.1\r\nX-Big: " + b"a" * (61 * 1024) + b"\r\n\r\n")


@pytest.mark.parametrize("data", [
    b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",  # bad chunk size
    b"GET / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",  # absurd length
    b"GET / HTTP/1.1\r\nBad Header\x01: x\r\n\r\n",  # invalid header bytes
    b"\x16\x03\x01\x00\xa5\x01\x00\x00",  # TLS, not HTTP
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",  # HTTP/2 prior knowledge: not HTTP/1.1
])
def test_malformed_requests_are_bad_messages(data):
    with pytest.raises(http.BadMessage):
        parse(data)


@pytest.mark.parametrize("data", [
    b"GET /chat HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nframes",
    b"CONNECT db:5432 HTTP/1.1\r\nHost: db:5432\r\n\r\nbytes",
])
def test_upgrades_end_the_message_and_the_connection(data):
    events = parse(data)
    assert [k for k, _ in events] == ["head", "end"]
    head = events[0][1]
    assert head.upgrade and not head.keep_alive


def test_responses_parse_status_and_keep_alive():
    (head,) = [v for k, v in parse(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                                   response=True) if k == "head"]
    assert (head.status, head.reason, head.keep_alive) == (404, "Not Found", False)
    assert head.serialize().startswith(b"HTTP/1.1 404 Not Found\r\n")


@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=8))
def test_fuzz_the_request_parser_never_fails_otherwise(chunks):
    stream = http.MessageStream()
    for chunk in chunks:
        try:
            events = stream.feed(chunk)
        except (http.BadMessage, http.HeaderTooLarge):
            return
        for kind, value in events:  # whatever parsed is a message event the proxy knows
            assert (kind, type(value)) in (("head", http.Head), ("body", bytes), ("end", http.Head)), (kind, value)


_token = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=12)


@settings(max_examples=300, deadline=None)
@given(method=st.sampled_from(["GET", "POST", "DELETE", "PUT"]),
       path=st.text(alphabet="abc/._-?=%", min_size=0, max_size=40),
       headers=st.lists(st.tuples(_token, st.text(alphabet="abc 123;=", max_size=20)), max_size=5),
       cut=st.integers(min_value=0, max_value=400))
def test_fuzz_well_formed_requests_roundtrip_whatever_the_split(method, path, headers, cut):
    head = http.Head(method=method, url="/" + path, headers=[(k, v.strip()) for k, v in headers])
    data = head.serialize()
    stream = http.MessageStream()
    events = stream.feed(data[:cut]) + stream.feed(data[cut:])
    (got,) = [v for k, v in events if k == "head"]
    assert (got.method, got.url) == (method, "/" + path)
    assert got.headers == head.headers


def matcher(**kw):
    return http.HTTPRuleMatcher.compile(HTTPRule(**kw))


def req(method="GET", url="/", headers=()):
    return http.Head(method=method, url=url, headers=list(headers))


def test_path_and_method_are_anchored_full_matches():
    m = matcher(method="GET", path="/api/v1/users")
    assert m.matches(req("GET", "/api/v1/users"))
    assert not m.matches(req("GET", "/api/v1/users/1"))
    assert not m.matches(req("GET", "/x/api/v1/users"))
    assert not m.matches(req("GETX", "/api/v1/users"))
    assert not m.matches(req("GET", "/api/v1/users?x=1"))  # Envoy's :path carries the query
    assert matcher(path="/api/v1/.*").matches(req("DELETE", "/api/v1/users/1"))
    assert matcher(method="GET|POST").matches(req("POST", "/"))


def test_host_headers_and_header_matches():
    assert matcher(host="api\\.example\\.com").matches(req(headers=[("Host", "api.example.com")]))
    assert not matcher(host="api").matches(req(headers=[("Host", "api.example.com")]))
    present = matcher(headers=("X-Token",))
    assert present.matches(req(headers=[("x-token", "")])) and not present.matches(req())
    exact = matcher(headers=("X-Env: prod",))
    assert exact.matches(req(headers=[("X-Env", "prod")])) and not exact.matches(req(headers=[("X-Env", "dev")]))
    deny = matcher(header_matches=(HeaderMatch("X-Env", "prod"),))
    log_only = matcher(header_matches=(HeaderMatch("X-Env", "prod", mismatch="LOG"),))
    assert not deny.matches(req(headers=[("X-Env", "dev")])) and log_only.matches(req(headers=[("X-Env", "dev")]))
    secret = matcher(header_matches=(HeaderMatch("X-Key", "", secret=("ns", "s")),))
    assert not secret.matches(req(headers=[("X-Key", "")]))  # secrets are not read: fail closed


def test_empty_rule_allows_everything_and_no_rule_allows_nothing():
    assert http.allowed([matcher()], req("DELETE", "/anything"))
    assert not http.allowed([], req())


def test_invalid_regex_names_the_field():
    with pytest.raises(ValidationError) as err:
        http.HTTPRuleMatcher.compile(HTTPRule(path="/a("), "http[3]")
    assert err.value.field == "http[3].path"


def test_denied_response_is_envoys():
    data = http.denied_response(close=False)
    assert data.startswith(b"HTTP/1.1 403 Forbidden\r\n") and data.endswith(b"\r\n\r\nAccess denied\r\n")
    assert b"content-length: 15\r\n" in data


def test_proxy_ports_per_family_and_direction():
    assert proxy_port_for({"http"}, "ingress") == PROXY_PORTS[("http", "ingress")]
    assert proxy_port_for({"http"}, "egress") == PROXY_PORTS[("http", "egress")]
    assert proxy_port_for({"kafka"}, "ingress") == PROXY_PORTS[("kafka", "ingress")]
    assert proxy_port_for({"http", "kafka"}, "ingress") == 0
