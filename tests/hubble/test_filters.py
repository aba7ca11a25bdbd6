"""Filter semantics as Hubble's: fields AND, values OR, allow list OR, deny list wins."""

from __future__ import annotations

import argparse

import pytest
from hubble_helpers import A_IP, B_IP, WORLD_IP, flow

from propolis.errors import ValidationError
from propolis.hubble.filters import FlowMatcher, compile_filter, compile_selector
from propolis.hubble.observe_args import add_filter_flags, build_filters
from propolis.maps import events as ev

FWD = flow()
DROP = flow(type=ev.CILIUM_NOTIFY_DROP, subtype=133, verdict=2, drop_reason=133, dst_port=9000)
WORLD = flow(src_ip=WORLD_IP, src_identity=2, protocol=17, dst_port=53)
HTTP = {**flow(), "Type": "L7", "event_type": {"type": 129, "sub_type": 0},
        "l7": {"type": "RESPONSE", "http": {"code": 503, "method": "GET", "url": "http://b/api/v1/x"}}}
DNS = {**flow(protocol=17, dst_port=53), "l7": {"type": "REQUEST", "dns": {"query": "example.com.", "qtypes": ["A"]}}}


def m(**spec):
    return compile_filter(spec)


@pytest.mark.parametrize("spec, yes, no", [
    ({"source_ip": [A_IP]}, FWD, WORLD),
    ({"destination_ip": ["10.244.2.0/24"]}, FWD, flow(dst_ip="10.0.0.1")),
    ({"source_pod": ["shop/frontend"]}, FWD, WORLD),
    ({"source_pod": ["shop/"]}, FWD, WORLD),
    ({"source_pod": ["/front"]}, FWD, flow(src_ip="10.9.9.9")),
    ({"destination_pod": ["backend"]}, {**FWD, "destination": {**FWD["destination"], "namespace": "default"}}, FWD),
    ({"source_label": ["app=frontend"]}, FWD, WORLD),
    ({"source_label": ["k8s:app in (frontend, x)"]}, FWD, WORLD),
    ({"source_label": ["reserved:world"]}, WORLD, FWD),
    ({"destination_label": ["app!=frontend"]}, FWD, flow(dst_ip=A_IP)),
    ({"destination_identity": [40002]}, FWD, flow(dst_identity=9)),
    ({"destination_service": ["shop/backend"]}, FWD, DROP),
    ({"source_workload": ["Deployment/frontend"]}, FWD, WORLD),
    ({"destination_port": ["8080"]}, FWD, DROP),
    ({"source_port": [43210]}, FWD, flow(src_port=1)),
    ({"verdict": ["DROPPED"]}, DROP, FWD),
    ({"event_type": ["trace"]}, FWD, DROP),
    ({"event_type": ["drop:133"]}, DROP, flow(type=1, subtype=181, verdict=2, drop_reason=181)),
    ({"protocol": ["udp"]}, WORLD, FWD),
    ({"protocol": ["icmp"]}, flow(protocol=1), FWD),
    ({"node_name": ["n*"]}, FWD, flow(node="other")),
    ({"traffic_direction": ["INGRESS"]}, FWD, flow(direction=2)),
    ({"reply": [True]}, flow(flags=1), FWD),
    ({"tcp_flags": ["SYN"]}, FWD, flow(tcp_flags=0x10)),
    ({"drop_reason_desc": ["POLICY_DENIED"]}, DROP, FWD),
    ({"http_status_code": ["5+"]}, HTTP, FWD),
    ({"http_method": ["get"]}, HTTP, FWD),
    ({"http_path": ["^http://b/api"]}, HTTP, FWD),
    ({"protocol": ["dns"]}, DNS, WORLD),
    ({"dns_query": ["example"]}, DNS, FWD),
    ({"destination_fqdn": ["*.example.com"]}, {**FWD, "destination_names": ["api.example.com"]}, FWD),
])
def test_each_field(spec, yes, no):
    pred = compile_filter(spec)
    assert pred(yes) and not pred(no)


def test_values_or_fields_and_lists():
    assert m(verdict=["DROPPED", "FORWARDED"])(FWD)
    assert not m(verdict=["FORWARDED"], destination_port=[9000])(DROP)
    matcher = FlowMatcher([{"verdict": ["DROPPED"]}, {"destination_port": [53]}], [{"source_label": ["reserved:world"]}])
    assert matcher(DROP) and not matcher(WORLD) and not matcher(FWD)
    assert FlowMatcher()(FWD) and not FlowMatcher(deny=[{}])(FWD)


def test_selector_terms_and_errors():
    sel = compile_selector("app=frontend,!debug,k8s:io.kubernetes.pod.namespace in (shop)")
    assert sel(FWD["source"]["labels"]) and not sel(FWD["source"]["labels"] + ["k8s:debug=1"])
    with pytest.raises(ValidationError):
        compile_filter({"source_ip": ["nope"]})
    with pytest.raises(ValidationError):
        compile_filter({"bogus": [1]})
    with pytest.raises(ValidationError):
        compile_filter({"event_type": ["nonsense"]})


def parse(*argv):
    p = argparse.ArgumentParser()
    add_filter_flags(p)
    return build_filters(p.parse_args(list(argv)).filter_ops)


def test_flags_build_filters_like_hubble():
    assert parse() == ([], [])
    # either-end flag: two filters, every other flag in both
    allow, deny = parse("--pod", "shop/frontend", "--verdict", "dropped")
    assert allow == [{"verdict": ["DROPPED"], "source_pod": ["shop/frontend"]},
                     {"verdict": ["DROPPED"], "destination_pod": ["shop/frontend"]}] and deny == []
    # one-end flags AND, repeats OR
    allow, _ = parse("--from-pod", "a", "--to-pod", "b", "--to-port", "80", "--to-port", "443")
    assert allow == [{"source_pod": ["a"], "destination_pod": ["b"], "destination_port": ["80", "443"]}]
    allow, _ = parse("-n", "shop")
    assert allow == [{"source_pod": ["shop/"]}, {"destination_pod": ["shop/"]}]
    # --not negates only the next flag
    allow, deny = parse("--not", "--verdict", "FORWARDED", "--protocol", "tcp")
    assert allow == [{"protocol": ["tcp"]}] and deny == [{"verdict": ["FORWARDED"]}]


def test_flags_select_the_expected_flows():
    flows = [FWD, DROP, WORLD]
    allow, deny = parse("--namespace", "shop", "--not", "--verdict", "DROPPED")
    assert [f for f in flows if FlowMatcher(allow, deny)(f)] == [FWD, WORLD]  # world -> shop/backend-0
    allow, deny = parse("--from-namespace", "shop")
    assert [f for f in flows if FlowMatcher(allow, deny)(f)] == [FWD, DROP]
    allow, deny = parse("--ip", WORLD_IP, "--ip", B_IP)
    assert [f for f in flows if FlowMatcher(allow, deny)(f)] == [FWD, DROP, WORLD]
    allow, deny = parse("--from-label", "app=frontend", "--to-port", "9000")
    assert [f for f in flows if FlowMatcher(allow, deny)(f)] == [DROP]
    allow, deny = parse("--http-status", "200", "--fqdn", "*.example.com")  # accepted; nothing L7 matches
    assert [f for f in flows if FlowMatcher(allow, deny)(f)] == []


def test_observe_request_defaults():
    from propolis.cli.main import build_parser
    from propolis.cli.observe_cmd import ALL, request_doc
    from propolis.errors import CliError

    def doc(*argv):
        return request_doc(build_parser().parse_args(["observe", *argv]))

    assert doc()["number"] == 20 and not doc()["follow"]
    assert doc("--follow")["number"] == 0  # follow alone: only new flows
    assert doc("--follow", "--last", "5")["number"] == 5
    assert doc("--first", "3")["first"] and doc("--all")["number"] == ALL
    assert doc("--since", "5m")["number"] == 0 and doc("--since", "5m")["since"].endswith("Z")
    d = doc("-n", "shop", "--not", "--type", "trace")
    assert d["whitelist"] == [{"source_pod": ["shop/"]}, {"destination_pod": ["shop/"]}]
    assert d["blacklist"] == [{"event_type": ["trace"]}]
    for bad in (["--first", "1", "--last", "1"], ["--ip", "nope"], ["--since", "whenever"]):
        with pytest.raises(CliError):
            doc(*bad)
