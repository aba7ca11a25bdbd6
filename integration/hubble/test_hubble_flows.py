"""Real packets -> BPF ring buffer -> propolis-hubble -> NATS -> propolis-hubble-relay -> `propolis observe`.

Tests run in order on one node (module fixture): probes first, then filters over what they
recorded, follow, metrics, and last the overload that fills the BPF ring and evicts the
observer's ring buffer.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import datetime
from pathlib import Path

import orjson
import pytest
from datapath_topology import tcp_probe, udp_probe
from hubble_node import EXPORT_MB, NS, POD_NAMES, RING, Hub
from prometheus_client.parser import text_string_to_metric_families
from pyroute2.netns import create_socket

from propolis.datapath import DatapathSettings, PolicyEntry
from propolis.maps import events as ev
from propolis_sandbox.testing.tools import required_tool

pytestmark = pytest.mark.root

CLIENT, SERVER, INTRUDER = (f"{NS}/{POD_NAMES[k]}" for k in ("a", "b", "c"))


def observe(hub: Hub, *args: str, output: str = "json", server: str | None = None) -> tuple[int, str, str]:
    proc = subprocess.run([sys.executable, "-m", "propolis.cli.main", "observe", "--server", server or hub.relay_url,
                           "-o", output, *args], capture_output=True, text=True, timeout=30, env=hub.env())
    return proc.returncode, proc.stdout, proc.stderr


def flows(hub: Hub, *args: str) -> list[dict]:
    code, out, err = observe(hub, *args)
    assert code == 0, err
    return [orjson.loads(line) for line in out.splitlines()]


def pod(f: dict, side: str) -> str:
    ep = f.get(side) or {}
    return f"{ep.get('namespace', '')}/{ep.get('pod_name', '')}"


def port(f: dict, side: str) -> int | None:
    l4 = f.get("l4") or {}
    for proto in ("TCP", "UDP"):
        if proto in l4:
            return l4[proto][f"{side}_port"]
    return None


def metrics(hub: Hub) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"{hub.hubble_http}/metrics", timeout=5).read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric_sum(m: dict, name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in m.items() if n == name and all((k, val) in ls for k, val in labels.items()))


def wait_for(check, timeout: float = 10.0, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(interval)


def test_allowed_and_denied_probes_are_forwarded_and_dropped_flows(hub: Hub):
    dp, a, b, c = hub.node.dp, hub.node.pods["a"], hub.node.pods["b"], hub.node.pods["c"]
    dp.set_policy(b.endpoint_id, [PolicyEntry("ingress", identity=a.identity, protocol=6, port=8080)])
    dp.set_enforcement(b.endpoint_id, ingress=True, egress=False)
    assert tcp_probe(a, b.ip, 8080)
    assert not tcp_probe(a, b.ip, 9000)
    assert not tcp_probe(c, b.ip, 8080)
    assert not udp_probe(a, b.ip, 5353)

    def recorded():
        got = flows(hub, "--last", "500", "--to-pod", SERVER)
        return got if any(f["verdict"] == "DROPPED" and f["source"].get("pod_name") == POD_NAMES["c"]
                          for f in got) else None

    got = wait_for(recorded)
    assert got, "no flows to the server recorded"
    ok = [f for f in got if f["verdict"] == "FORWARDED" and port(f, "destination") == 8080
          and pod(f, "source") == CLIENT]
    assert ok, "the allowed connection is a FORWARDED flow"
    f = ok[0]
    assert f["source"]["identity"] == a.identity and f["destination"]["identity"] == b.identity
    assert f["destination"]["pod_name"] == POD_NAMES["b"] and "k8s:app=server" in f["destination"]["labels"]
    assert f["destination"]["workloads"] == [{"name": "server", "kind": "StatefulSet"}]
    assert f["source"]["workloads"] == [{"name": "client", "kind": "Deployment"}]
    assert f["destination_service"] == {"name": "server", "namespace": NS}
    assert f["node_name"] == hub.name and f["Type"] == "L3_L4" and f["IP"]["destination"] == b.ip
    drops = [f for f in got if f["verdict"] == "DROPPED" and f["event_type"]["type"] == 1]
    denied_port = [f for f in drops if port(f, "destination") == 9000 and pod(f, "source") == CLIENT]
    assert denied_port and denied_port[0]["drop_reason_desc"] == "POLICY_DENIED"
    assert denied_port[0]["l4"]["TCP"]["flags"] == {"SYN": True}
    assert denied_port[0]["traffic_direction"] == "INGRESS" and denied_port[0]["Summary"] == "TCP Flags: SYN"
    intruder = [f for f in drops if pod(f, "source") == INTRUDER]
    assert intruder and intruder[0]["source"]["identity"] == c.identity
    assert any("UDP" in f["l4"] for f in drops)


FILTERS = [
    (["--from-pod", f"{NS}/client"], lambda f: pod(f, "source").startswith(f"{NS}/client")),
    (["--to-pod", SERVER], lambda f: pod(f, "destination") == SERVER),
    (["--pod", f"{NS}/intruder"], lambda f: INTRUDER in (pod(f, "source"), pod(f, "destination"))),
    (["--namespace", NS], lambda f: NS in (f["source"].get("namespace"), f["destination"].get("namespace"))),
    (["--from-namespace", NS], lambda f: f["source"].get("namespace") == NS),
    (["--to-namespace", NS], lambda f: f["destination"].get("namespace") == NS),
    (["--label", "app=intruder"], lambda f: "k8s:app=intruder" in f["source"].get("labels", [])
     + f["destination"].get("labels", [])),
    (["--from-label", "app=client"], lambda f: "k8s:app=client" in f["source"]["labels"]),
    (["--to-label", "k8s:app in (server)"], lambda f: "k8s:app=server" in f["destination"]["labels"]),
    (["--identity", "41003"], lambda f: 41003 in (f["source"]["identity"], f["destination"]["identity"])),
    (["--from-identity", "41001"], lambda f: f["source"]["identity"] == 41001),
    (["--to-identity", "41002"], lambda f: f["destination"]["identity"] == 41002),
    (["--verdict", "DROPPED"], lambda f: f["verdict"] == "DROPPED"),
    (["--verdict", "FORWARDED"], lambda f: f["verdict"] == "FORWARDED"),
    (["--not", "--verdict", "FORWARDED"], lambda f: f["verdict"] != "FORWARDED"),
    (["--type", "drop"], lambda f: f["event_type"]["type"] == 1),
    (["--type", "trace"], lambda f: f["event_type"]["type"] == 4),
    (["--type", "policy-verdict"], lambda f: f["event_type"]["type"] == 5),
    (["--protocol", "udp"], lambda f: "UDP" in f["l4"]),
    (["--protocol", "TCP"], lambda f: "TCP" in f["l4"]),
    (["--port", "9000"], lambda f: 9000 in (port(f, "source"), port(f, "destination"))),
    (["--to-port", "8080", "--to-port", "9000"], lambda f: port(f, "destination") in (8080, 9000)),
    (["--from-port", "8080"], lambda f: port(f, "source") == 8080 and f["is_reply"]),
    (["--service", f"{NS}/server"], lambda f: f.get("destination_service", {}).get("name") == "server"
     or f.get("source_service", {}).get("name") == "server"),
    (["--to-service", f"{NS}/server"], lambda f: f["destination_service"]["name"] == "server"),
    (["--node-name", "pphub-*"], lambda f: f["node_name"].startswith("pphub-")),
    (["--from-pod", f"{NS}/client", "--verdict", "DROPPED"],
     lambda f: pod(f, "source").startswith(f"{NS}/client") and f["verdict"] == "DROPPED"),
    (["--from-workload", "client"], lambda f: f["source"]["workloads"][0]["name"] == "client"),
    (["--workload", "StatefulSet/server"], lambda f: {"name": "server", "kind": "StatefulSet"} in
     f["source"].get("workloads", []) + f["destination"].get("workloads", [])),
    (["--traffic-direction", "egress"], lambda f: f["traffic_direction"] == "EGRESS"),
    (["--tcp-flags", "SYN"], lambda f: f["l4"]["TCP"]["flags"].get("SYN")),
    (["--drop-reason-desc", "POLICY_DENIED"], lambda f: f["drop_reason_desc"] == "POLICY_DENIED"),
]


@pytest.mark.parametrize("args, pred", FILTERS, ids=[" ".join(a) for a, _ in FILTERS])
def test_every_filter_on_recorded_flows(hub: Hub, args, pred):
    got = flows(hub, "--last", "1000", *args)
    assert got, f"{args} matched nothing"
    bad = [f for f in got if not pred(f)]
    assert not bad, f"{args} let through {bad[0]}"


def test_since_and_until_split_the_recorded_flows(hub: Hub):
    """An RFC 3339 instant between two recorded flows: --since keeps only the later, --until only the earlier;
    a duration ago older than every flow keeps all of them (--since) or none (--until)."""
    recorded = flows(hub, "--last", "1000")
    times = sorted({f["time"] for f in recorded})
    assert len(times) >= 2, "the probes recorded flows at two instants at least"
    at = [datetime.fromisoformat(t[:26].rstrip("Z")) for t in times]  # microseconds: as precise as the CLI parses
    gap = max(range(1, len(at)), key=lambda i: at[i] - at[i - 1])  # the widest gap: far from rounding
    pivot = (at[gap - 1] + (at[gap] - at[gap - 1]) / 2).isoformat() + "Z"
    since, until = flows(hub, "--last", "1000", "--since", pivot), flows(hub, "--last", "1000", "--until", pivot)
    assert since and min(f["time"] for f in since) == times[gap], (pivot, times[gap], since[:1])
    assert until and max(f["time"] for f in until) == times[gap - 1], (pivot, times[gap - 1], until[-1:])
    assert len(flows(hub, "--last", "1000", "--since", "1h", "--until", "0s")) >= len(recorded)
    assert flows(hub, "--last", "1000", "--until", "1h") == []


def test_ip_filters_first_last_and_l7_flags(hub: Hub):
    a, b, c = (hub.node.pods[k] for k in "abc")
    for args, pred in (
            (["--ip", c.ip], lambda f: c.ip in (f["IP"]["source"], f["IP"]["destination"])),
            (["--from-ip", a.ip], lambda f: f["IP"]["source"] == a.ip),
            (["--to-ip", f"{b.ip}/32"], lambda f: f["IP"]["destination"] == b.ip)):
        got = flows(hub, *args, "--last", "99")
        assert got, f"{args} matched nothing"
        assert all(pred(f) for f in got), (args, [f for f in got if not pred(f)][:1])
    first, last = flows(hub, "--first", "3"), flows(hub, "--last", "3")
    assert len(first) == 3 and len(last) == 3 and first[-1]["time"] <= last[0]["time"]
    assert len(flows(hub)) == 20  # hubble observe's default
    for l7 in (["--http-status", "200"], ["--http-method", "GET"], ["--http-path", "/api"], ["--protocol", "DNS"],
               ["--fqdn", "*.example.com"], ["--to-fqdn", "example.com"]):
        assert flows(hub, "--last", "1000", *l7) == []  # accepted; no L7 flows yet
    code, _, err = observe(hub, "--ip", "not-an-ip")
    assert code == 2 and "invalid filter" in err


def test_output_formats_and_direct_nats(hub: Hub):
    for fmt, marker in (("compact", f"[{hub.name}]: "), ("table", "TIMESTAMP"), ("dict", "  TIMESTAMP:"),
                        ("jsonpb", '"node_name"')):
        code, out, err = observe(hub, "--last", "5", "--to-pod", SERVER, "--print-node-name", output=fmt)
        assert code == 0 and marker in out, (fmt, out, err)
    code, out, _ = observe(hub, "--last", "5", "--to-pod", SERVER, output="compact")
    assert code == 0 and f"-> {SERVER}:" in out
    via_nats = flows_direct = observe(hub, "--last", "7", server="nats")
    assert via_nats[0] == 0 and len(flows_direct[1].splitlines()) == 7


def test_follow_sees_new_flows(hub: Hub):
    a, b = hub.node.pods["a"], hub.node.pods["b"]
    proc = subprocess.Popen([sys.executable, "-m", "propolis.cli.main", "observe", "--server", hub.relay_url,
                             "--follow", "-o", "json", "--from-pod", f"{NS}/client", "--to-port", "8080",
                             "--type", "trace", "--timeout", "20"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=hub.env())
    try:
        os.set_blocking(proc.stdout.fileno(), False)
        line, delays = b"", []
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not line:
            sent = time.time()
            assert tcp_probe(a, b.ip, 8080)
            probe_end = time.monotonic() + 1.0
            while time.monotonic() < probe_end:
                chunk = proc.stdout.readline()
                if chunk:
                    line = chunk
                    delays.append(time.time() - sent)
                    break
                time.sleep(0.01)
        assert line, proc.stderr.read() if proc.poll() is not None else "no flow while following"
        f = orjson.loads(line)
        assert pod(f, "source") == CLIENT and port(f, "destination") == 8080
        print(f"\n[hubble] follow: probe -> printed flow {delays[-1] * 1000:.0f} ms")
    finally:
        proc.terminate()
        proc.wait(5)


def test_metrics_counters_move(hub: Hub):
    a, b = hub.node.pods["a"], hub.node.pods["b"]
    before = metrics(hub)
    assert not tcp_probe(a, b.ip, 9000)
    assert tcp_probe(a, b.ip, 8080)

    def moved():
        after = metrics(hub)
        drop = (metric_sum(after, "hubble_drop_total", source=CLIENT, destination=SERVER, reason="POLICY_DENIED",
                           protocol="TCP")
                - metric_sum(before, "hubble_drop_total", source=CLIENT, destination=SERVER, reason="POLICY_DENIED",
                             protocol="TCP"))
        return after if drop >= 1 else None

    after = wait_for(moved)
    assert after, "hubble_drop_total did not move"
    for name, labels in (("hubble_flows_processed_total", {"type": "Drop", "verdict": "DROPPED"}),
                         ("hubble_flows_processed_total", {"type": "Trace", "subtype": "to-endpoint"}),
                         ("hubble_tcp_flags_total", {"flag": "SYN", "family": "IPv4"}),
                         ("hubble_port_distribution_total", {"protocol": "TCP", "port": "8080"}),
                         ("hubble_policy_verdicts_total", {"direction": "ingress", "action": "forwarded"}),
                         ("hubble_policy_verdicts_total", {"direction": "ingress", "action": "dropped"})):
        assert metric_sum(after, name, **labels) > metric_sum(before, name, **labels), (name, labels)


def test_service_map_page_in_a_headless_browser(hub: Hub):
    """The relay's page, rendered by a real browser: workloads as nodes, edges with counts, drops red."""
    artifacts = Path(os.environ.get("PROPOLIS_TEST_ARTIFACTS", "/tmp/propolis-test-artifacts")) / "hubble"
    artifacts.mkdir(parents=True, exist_ok=True)
    browser = [required_tool("chromium"), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               f"--user-data-dir={hub.work / 'chromium'}", "--virtual-time-budget=5000", "--window-size=1280,900"]
    dom = subprocess.run([*browser, "--dump-dom", f"{hub.relay_url}/"], capture_output=True, text=True,
                         timeout=90).stdout
    nodes = set(re.findall(r'class="node [^"]*" data-id="([^"]+)"', dom))
    assert {f"{NS}/client", f"{NS}/server", f"{NS}/intruder"} <= nodes, dom[-2000:]
    edges = re.findall(r'<g class="edge( drops)?" data-source="([^"]+)" data-destination="([^"]+)" '
                       r'data-forwarded="(\d+)" data-dropped="(\d+)"', dom)
    by_pair = {(src, dst): (bool(drops), int(fwd), int(dropped)) for drops, src, dst, fwd, dropped in edges}
    red, forwarded, dropped = by_pair[(f"{NS}/client", f"{NS}/server")]
    assert red and forwarded >= 1 and dropped >= 1  # allowed 8080 and denied 9000: drops make it red
    assert "TCP/8080: " in dom and "TCP/9000: 0 ok" in dom
    red, _, dropped = by_pair[(f"{NS}/intruder", f"{NS}/server")]
    assert red and dropped >= 1
    assert re.search(r"<tr class=\"(FORWARDED|DROPPED)\">", dom), "the live flow table shows flows"
    shot = artifacts / "service-map.png"
    subprocess.run([*browser, f"--screenshot={shot}", f"{hub.relay_url}/"], capture_output=True, timeout=90)
    assert shot.exists() and shot.stat().st_size > 10_000
    print(f"\n[hubble] service map screenshot: {shot}")


def _datapath_lost(hub: Hub) -> int:
    """Events the ring had no room for (ring_full over every event type, all CPUs)."""
    lost_map = ev.LOST_BY_TYPE_SPEC.open(hub.node.dp.pin_dir)
    try:
        return sum(v.ring_full for i in range(ev.LOST_BY_TYPE_SPEC.max_entries)
                   for v in lost_map.lookup(ctypes.c_uint32(i)) or [])
    finally:
        lost_map.close()


def test_overload_counts_lost_events_evicts_ring_and_rotates_export(hub: Hub):
    dp, a, b = hub.node.dp, hub.node.pods["a"], hub.node.pods["b"]
    dp.set_enforcement(b.endpoint_id, ingress=False, egress=False)
    dp.apply_settings(DatapathSettings(monitor_aggregation="none"))  # an event per packet
    follower = subprocess.Popen([sys.executable, "-m", "propolis.cli.main", "observe", "--server", hub.relay_url,
                                 "--follow", "-o", "jsonpb", "--verdict", "DROPPED", "--timeout", "40"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=hub.env())
    hubble = hub.procs["hubble"]
    try:
        time.sleep(1.5)  # the follower subscribes
        lost_before = _datapath_lost(hub)
        metric_before = metric_sum(metrics(hub), "hubble_lost_events_total", source="PERF_EVENT_RING_BUFFER")
        hubble.send_signal(signal.SIGSTOP)  # the observer stops reading: the BPF ring fills up
        overflow = 2 * ev.SPEC.max_entries // ctypes.sizeof(ev.FlowEventRecord)  # twice a ring of packets, 2+ events each
        s = create_socket(a.netns, socket.AF_INET, socket.SOCK_DGRAM, flags=0)
        try:
            for _ in range(overflow):
                s.sendto(b"x", (b.ip, 5353))
        finally:
            s.close()
        time.sleep(1.0)  # the echo server's replies are events too: let them land (and be lost)
        assert _datapath_lost(hub) - lost_before > 0, f"{overflow} packets x 2+ events must overflow the ring"
        hubble.send_signal(signal.SIGCONT)

        def counted():  # every event the datapath lost, counted once by hubble
            lost = _datapath_lost(hub) - lost_before
            seen = metric_sum(metrics(hub), "hubble_lost_events_total", source="PERF_EVENT_RING_BUFFER")
            return lost if seen - metric_before == lost else None
        lost = wait_for(counted, 15)
        assert lost, "hubble_lost_events_total must equal the datapath's cilium_events_lost delta"

        # the follower is told, with the number lost
        deadline, notices = time.monotonic() + 10, []
        os.set_blocking(follower.stdout.fileno(), False)
        while time.monotonic() < deadline and sum(n for n in notices) < lost:
            line = follower.stdout.readline()
            if not line:
                time.sleep(0.05)
                continue
            doc = orjson.loads(line)
            if "lost_events" in doc and doc["lost_events"]["source"] == "PERF_EVENT_RING_BUFFER":
                notices.append(doc["lost_events"]["num_events_lost"])
        assert sum(notices) == lost, (notices, lost)

        # the ring holds the newest RING flows, oldest first
        def full():
            got = flows(hub, "--all")
            return got if len(got) == RING else None
        held = wait_for(full)
        assert held, "ring not full"
        # arrival order: events of the two CPUs' perf rings may interleave by microseconds, never more
        stamps = [datetime.fromisoformat(f["time"][:26].rstrip("Z")) for f in held]
        worst = max((a - b).total_seconds() for a, b in zip(stamps, stamps[1:]))
        assert worst < 0.01, f"a flow {worst:.6f}s older than the one before it"
        assert flows(hub, "--all", "--to-port", "9000") == []  # the first probes were evicted
        assert sum(1 for f in held if port(f, "destination") == 5353 or port(f, "source") == 5353) > RING * 0.9

        # the exporter rotated by size, keeping two backups
        hub.procs["hubble"].send_signal(signal.SIGCONT)
        export = hub.export_file
        assert wait_for(lambda: (export.parent / "flows.json.2").exists(), 10)
        # (rotation renames, then creates the new file: wait out that instant instead of racing it)
        assert wait_for(lambda: sorted(p.name for p in export.parent.iterdir()) ==
                        ["flows.json", "flows.json.1", "flows.json.2"], 10)
        for p in export.parent.iterdir():
            assert p.stat().st_size <= EXPORT_MB * 1024 * 1024
        first = orjson.loads((export.parent / "flows.json.1").read_bytes().splitlines()[0])
        assert first["node_name"] == hub.name and ("flow" in first or "lost_events" in first)
    finally:
        hubble.send_signal(signal.SIGCONT)
        follower.terminate()
        follower.wait(5)
        dp.apply_settings(DatapathSettings())
