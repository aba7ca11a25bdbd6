"""`propolis bench services`: the same N services as eBPF maps and as kube-proxy's iptables
chains, side by side in one run, in private namespaces.

Why both in one run: the claim is relative (a hash lookup vs a linear walk of
KUBE-SERVICES), so both sides must meet the same kernel, CPU and load. Two identical
worlds are built: node namespace + client pod + server pod; in one the pods' veths carry
bpf_lxc and the services are in the cilium_lb4_* maps, in the other the veths are plain
and the node's nat table has kube-proxy's layout (KUBE-SERVICES -> KUBE-SVC-… ->
KUBE-SEP-… with statistic-mode random), installed with iptables-restore.

For each N: TCP_CRR-style connection setup (a new connection per request) to the LAST
service of the table; the per-packet cost of cil_from_container through
BPF_PROG_TEST_RUN; the time to add and remove one service when N exist (Service +
EndpointSlice -> desired entries -> map written, vs iptables-restore --noflush as
kube-proxy does it). At the largest N: a full resync after a writer restart (batch map
operations), with an established connection checked before and after.
Every namespace, pin and process is removed at the end, even on failure.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import tempfile
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from propolis_sandbox.bench.common import percentile, report

BACKENDS_PER_SERVICE = 4
SERVICE_PORT = 80
SERVER_PORT_BASE = 8000
NODE_NAME = "bench-node"

_SERVER = r"""
import asyncio, sys
async def handle(r, w):
    try:
        while await r.read(1):
            w.write(b"y"); await w.drain()
    except Exception:
        pass
    finally:
        w.close()
async def main():
    ip, ports = sys.argv[1], [int(p) for p in sys.argv[2:]]
    for p in ports:
        await asyncio.start_server(handle, ip, p, backlog=4096, reuse_address=True)
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""

_CLIENT = r"""
import json, socket, struct, sys, time
ip, port, count, warmup = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
linger = struct.pack("ii", 1, 0)  # close with RST: no TIME_WAIT pile-up in a long loop
lat, fails, started = [], 0, None
for i in range(warmup + count):
    if i == warmup:
        started = time.perf_counter()
    t0 = time.perf_counter()
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
    s.settimeout(2)
    try:
        s.connect((ip, port)); s.sendall(b"x")
        if s.recv(1) != b"y":
            fails += 1
    except OSError:
        fails += 1
    finally:
        s.close()
    if i >= warmup:
        lat.append((time.perf_counter() - t0) * 1e6)
print(json.dumps({"lat_us": lat, "fails": fails, "elapsed": time.perf_counter() - started}))
"""

# The same client and server in C, built with the machine's cc when it has one: the
# Python loop costs ~150 us per connection, which would hide most of what is measured.
_CRR_C = r"""
/* TCP_CRR client and server for `propolis bench services` (built at run time, removed after).
 * client IP PORT COUNT WARMUP -> JSON {"lat_us":[...],"fails":N,"elapsed":s}
 * server IP PORT... -> prints "ready", answers every byte with 'y' on every connection */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }

static int client(const char *ip, int port, int count, int warmup) {
	struct sockaddr_in a = {0}; struct linger lg = {1, 0}; struct timeval tv = {2, 0};
	double *lat = calloc(count, sizeof(double)), start = 0; int fails = 0; char c;
	a.sin_family = AF_INET; a.sin_port = htons(port); inet_pton(AF_INET, ip, &a.sin_addr);
	for (int i = 0; i < warmup + count; i++) {
		if (i == warmup) start = now();
		double t0 = now();
		int s = socket(AF_INET, SOCK_STREAM, 0);
		setsockopt(s, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
		setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
		setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
		if (connect(s, (struct sockaddr *)&a, sizeof(a)) < 0 || write(s, "x", 1) != 1 || read(s, &c, 1) != 1 || c != 'y')
			fails++;
		close(s);
		if (i >= warmup) lat[i - warmup] = (now() - t0) * 1e6;
	}
	double elapsed = now() - start;
	printf("{\"lat_us\":[");
	for (int i = 0; i < count; i++) printf("%s%.1f", i ? "," : "", lat[i]);
	printf("],\"fails\":%d,\"elapsed\":%.6f}\n", fails, elapsed);
	return 0;
}

#define MAXFD 1024
static int server(const char *ip, char **ports, int n) {
	struct pollfd fds[MAXFD]; int nl = 0, nf = 0, one = 1; char buf[256];
	for (int i = 0; i < n && i < 64; i++) {
		struct sockaddr_in a = {0};
		int s = socket(AF_INET, SOCK_STREAM, 0);
		setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
		a.sin_family = AF_INET; a.sin_port = htons(atoi(ports[i])); inet_pton(AF_INET, ip, &a.sin_addr);
		if (bind(s, (struct sockaddr *)&a, sizeof(a)) < 0 || listen(s, 4096) < 0) { perror("bind"); return 1; }
		fds[nf].fd = s; fds[nf++].events = POLLIN; nl++;
	}
	printf("ready\n"); fflush(stdout);
	for (;;) {
		if (poll(fds, nf, -1) < 0) continue;
		for (int i = 0; i < nf; i++) {
			if (!fds[i].revents) continue;
			if (i < nl) {
				int c = accept(fds[i].fd, NULL, NULL);
				if (c >= 0 && nf < MAXFD) { fds[nf].fd = c; fds[nf].events = POLLIN; fds[nf++].revents = 0; }
				else if (c >= 0) close(c);
				continue;
			}
			ssize_t r = read(fds[i].fd, buf, sizeof(buf));
			if (r > 0) { memset(buf, 'y', r); if (write(fds[i].fd, buf, r) == r) continue; }
			close(fds[i].fd); fds[i] = fds[--nf]; i--;
		}
	}
}

int main(int argc, char **argv) {
	if (argc >= 6 && !strcmp(argv[1], "client")) return client(argv[2], atoi(argv[3]), atoi(argv[4]), atoi(argv[5]));
	if (argc >= 4 && !strcmp(argv[1], "server")) return server(argv[2], argv + 3, argc - 3);
	fprintf(stderr, "usage: crr client IP PORT COUNT WARMUP | crr server IP PORT...\n");
	return 2;
}
"""

_KEEPALIVE = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2)
for line in sys.stdin:
    try:
        s.sendall(b"x"); ok = s.recv(1) == b"y"
    except OSError:
        ok = False
    print("ok" if ok else "broken", flush=True)
"""


class Tools:
    """How the CRR client and server run: the C build (if cc works) or Python."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="ppbs-crr-")
        self.binary: str | None = os.path.join(self.dir, "crr")
        src = os.path.join(self.dir, "crr.c")
        with open(src, "w") as f:
            f.write(_CRR_C)
        cc = shutil.which("cc") or shutil.which("gcc")
        if cc is None or subprocess.run([cc, "-O2", "-o", self.binary, src], capture_output=True).returncode:
            self.binary = None
        self.kind = "C" if self.binary else "Python"

    def server(self, ip: str, ports: list[str]) -> list[str]:
        if self.binary:
            return [self.binary, "server", ip, *ports]
        return [sys.executable, "-c", _SERVER, ip, *ports]

    def client(self, ip: str, port: int, count: int, warmup: int) -> list[str]:
        args = [ip, str(port), str(count), str(warmup)]
        if self.binary:
            return [self.binary, "client", *args]
        return [sys.executable, "-c", _CLIENT, *args]

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def sh(*args: str, stdin: str | None = None) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True, input=stdin).stdout


def vip(i: int) -> str:
    return f"10.96.{i // 250}.{i % 250 + 1}"


def fake_backend(i: int, j: int) -> str:
    k = i * BACKENDS_PER_SERVICE + j
    return f"10.245.{(k // 250) % 250}.{k % 250 + 1}"


@dataclass
class World:
    """Node namespace + client and server pods; `bpf` says whether the datapath is attached."""

    name: str
    node_ns: str
    client_ns: str
    server_ns: str
    client_ip: str
    server_ip: str
    client_lxc: str = ""
    server_lxc: str = ""
    procs: list[subprocess.Popen[str]] = field(default_factory=list)


def _make_world(tag: str, suffix: str, octet: int, tools: Tools) -> World:
    w = World(tag, f"ppbs-{tag}-node-{suffix}", f"ppbs-{tag}-cli-{suffix}", f"ppbs-{tag}-srv-{suffix}",
              f"10.252.{octet}.10", f"10.252.{octet}.20", f"lx{tag[:2]}c{suffix}", f"lx{tag[:2]}s{suffix}")
    sh("ip", "netns", "add", w.node_ns)
    sh("ip", "netns", "exec", w.node_ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    sh("ip", "-n", w.node_ns, "link", "set", "lo", "up")
    for ns, ip, lxc in ((w.client_ns, w.client_ip, w.client_lxc), (w.server_ns, w.server_ip, w.server_lxc)):
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", w.node_ns, "link", "add", lxc, "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "-n", w.node_ns, "link", "set", lxc, "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "addr", "add", f"{ip}/32", "dev", "eth0")
        mac = sh("ip", "netns", "exec", w.node_ns, "cat", f"/sys/class/net/{lxc}/address").strip()
        sh("ip", "-n", ns, "neigh", "add", "169.254.1.1", "lladdr", mac, "dev", "eth0", "nud", "permanent")
        sh("ip", "-n", ns, "route", "add", "169.254.1.1", "dev", "eth0", "scope", "link")
        sh("ip", "-n", ns, "route", "add", "default", "via", "169.254.1.1", "dev", "eth0", "onlink")
        sh("ip", "-n", w.node_ns, "route", "add", f"{ip}/32", "dev", lxc)
    ports = [str(SERVER_PORT_BASE + j) for j in range(BACKENDS_PER_SERVICE)]
    server = subprocess.Popen(["ip", "netns", "exec", w.server_ns, *tools.server(w.server_ip, ports)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    w.procs.append(server)
    assert server.stdout is not None
    if server.stdout.readline().strip() != "ready":
        raise RuntimeError(f"server in {w.server_ns} did not start")
    return w


def _destroy_world(w: World) -> None:
    for p in w.procs:
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout=3)
            except subprocess.TimeoutExpired:
                p.kill()
    for ns in (w.client_ns, w.server_ns, w.node_ns):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def crr(w: World, tools: Tools, ip: str, count: int, warmup: int) -> dict[str, float]:
    """New TCP connection per request from the client pod; latency percentiles and rate."""
    out = sh("ip", "netns", "exec", w.client_ns, *tools.client(ip, SERVICE_PORT, count, warmup))
    data = json.loads(out)
    lat = data["lat_us"]
    return {"p50_us": percentile(lat, 50), "p99_us": percentile(lat, 99),
            "conn_per_s": count / data["elapsed"], "fails": data["fails"]}


# ------------------------------------------------------------------ iptables (kube-proxy layout)
def _chain(prefix: str, text: str) -> str:
    return prefix + base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()[:16]


class KubeProxyTables:
    """kube-proxy's iptables mode nat rules for services 0..n-1 (the last one is real)."""

    def __init__(self, w: World) -> None:
        self.w = w

    def backends(self, i: int, n: int) -> list[tuple[str, int]]:
        if i == n - 1:
            return [(self.w.server_ip, SERVER_PORT_BASE + j) for j in range(BACKENDS_PER_SERVICE)]
        return [(fake_backend(i, j), SERVER_PORT_BASE) for j in range(BACKENDS_PER_SERVICE)]

    @staticmethod
    def service_rule(i: int) -> str:
        return (f"-A KUBE-SERVICES -d {vip(i)}/32 -p tcp -m comment --comment \"bench/svc-{i}:http cluster IP\" "
                f"-m tcp --dport {SERVICE_PORT} -j {_chain('KUBE-SVC-', f'svc-{i}')}")

    def chains(self, i: int, n: int) -> tuple[list[str], list[str]]:
        """(chain declarations, rules) of service i's KUBE-SVC and KUBE-SEP chains."""
        svc = _chain("KUBE-SVC-", f"svc-{i}")
        decl, rules = [f":{svc} - [0:0]"], []
        backends = self.backends(i, n)
        for j, (ip, port) in enumerate(backends):
            sep = _chain("KUBE-SEP-", f"svc-{i}-{ip}:{port}")
            decl.append(f":{sep} - [0:0]")
            left = len(backends) - j
            if left > 1:
                rules.append(f"-A {svc} -m comment --comment bench/svc-{i}:http -m statistic --mode random "
                             f"--probability {1 / left:.11f} -j {sep}")
            else:
                rules.append(f"-A {svc} -m comment --comment bench/svc-{i}:http -j {sep}")
            rules.append(f"-A {sep} -s {ip}/32 -j KUBE-MARK-MASQ")
            rules.append(f"-A {sep} -p tcp -m tcp -j DNAT --to-destination {ip}:{port}")
        return decl, rules

    def full(self, n: int) -> str:
        lines = ["*nat", ":PREROUTING ACCEPT [0:0]", ":KUBE-SERVICES - [0:0]", ":KUBE-MARK-MASQ - [0:0]"]
        rules = ["-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
                 "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000"]
        for i in range(n):
            decl, r = self.chains(i, n)
            lines.extend(decl)
            rules.append(self.service_rule(i))
            rules.extend(r)
        return "\n".join(lines + rules + ["COMMIT", ""])

    def restore(self, text: str, noflush: bool) -> float:
        args = ["ip", "netns", "exec", self.w.node_ns, "iptables-restore", "-w"] + (["--noflush"] if noflush else [])
        started = time.perf_counter()
        sh(*args, stdin=text)
        return time.perf_counter() - started

    def add_one(self, n: int, extra: int) -> float:
        """kube-proxy's partial sync for one new service: KUBE-SERVICES rewritten, new chains added."""
        decl, rules = self.chains(extra, n + 1)
        services = [self.service_rule(i) for i in range(n)] + [self.service_rule(extra)]
        text = "\n".join(["*nat", ":KUBE-SERVICES - [0:0]", *decl, *services, *rules, "COMMIT", ""])
        return self.restore(text, noflush=True)

    def remove_one(self, n: int, extra: int) -> float:
        decl, _ = self.chains(extra, n + 1)
        services = [self.service_rule(i) for i in range(n)]
        deletes = [f"-X {d[1:].split()[0]}" for d in decl]
        text = "\n".join(["*nat", ":KUBE-SERVICES - [0:0]", *decl, *services, *deletes, "COMMIT", ""])
        return self.restore(text, noflush=True)


# ------------------------------------------------------------------ eBPF side
def _lb_services(n: int, server_ip: str) -> list[Any]:
    from propolis.lb import Backend, LBService

    out = []
    for i in range(n):
        if i == n - 1:
            backends = tuple(Backend(server_ip, SERVER_PORT_BASE + j, node_name=NODE_NAME)
                             for j in range(BACKENDS_PER_SERVICE))
        else:
            backends = tuple(Backend(fake_backend(i, j), SERVER_PORT_BASE, node_name=NODE_NAME)
                             for j in range(BACKENDS_PER_SERVICE))
        out.append(LBService("bench", f"svc-{i}", "http", "ClusterIP", vip(i), SERVICE_PORT, "TCP", backends))
    return out


def _k8s_pair(i: int) -> tuple[Any, Any]:
    """The Service and EndpointSlice records of service i, as the bus carries them."""
    from propolis.bus.messages import K8sObject

    service = K8sObject(kind="Service", namespace="bench", name=f"svc-{i}", uid=f"u{i}", resource_version="1",
                        fields={"clusterIP": vip(i), "ports": [{"name": "http", "port": SERVICE_PORT, "protocol": "TCP"}]})
    endpoints = [{"addresses": [fake_backend(i, j)], "conditions": {"ready": True}, "nodeName": NODE_NAME}
                 for j in range(BACKENDS_PER_SERVICE)]
    eps = K8sObject(kind="EndpointSlice", namespace="bench", name=f"svc-{i}-x", uid=f"s{i}", resource_version="1",
                    labels={"kubernetes.io/service-name": f"svc-{i}"},
                    fields={"addressType": "IPv4", "endpoints": endpoints,
                          "ports": [{"name": "http", "port": SERVER_PORT_BASE, "protocol": "TCP"}]})
    return service, eps


def _prog_cost(dp: Any, n: int, repeat: int) -> dict[str, float]:
    """ns per packet of cil_from_container for a packet to the last service (BPF_PROG_TEST_RUN)."""
    from propolis.datapath import packets as pk
    from propolis.maps import bpf

    client = "10.252.255.1"
    fd = dp.programs.from_container_fd
    syn = pk.tcp(client, 1000, vip(n - 1), SERVICE_PORT)
    bpf.prog_test_run(fd, syn)
    _, established_ns, _ = bpf.prog_test_run(fd, pk.tcp(client, 1000, vip(n - 1), SERVICE_PORT, pk.TCP_ACK),
                                             repeat=repeat)
    new_ns = [bpf.prog_test_run(fd, pk.tcp(client, 2000 + k, vip(n - 1), SERVICE_PORT))[1] for k in range(500)]
    return {"prog_ns_established": float(established_ns), "prog_ns_new": percentile(new_ns, 50)}


def _ebpf_add_remove(dp: Any, n: int, samples: int) -> dict[str, float]:
    """Service + EndpointSlice of one new service -> desired entries -> maps, then removed."""
    from propolis.lb import desired_services

    add, remove = [], []
    for k in range(samples):
        service, eps = _k8s_pair(n + k)
        started = time.perf_counter()
        entries = desired_services([service], [eps], node_name=NODE_NAME)
        dp.update_services(entries)
        add.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        dp.update_services([], removed=[e.frontend for e in entries])
        remove.append((time.perf_counter() - started) * 1000)
    return {"ebpf_add_p50_ms": percentile(add, 50), "ebpf_add_p99_ms": percentile(add, 99),
            "ebpf_remove_p50_ms": percentile(remove, 50), "ebpf_remove_p99_ms": percentile(remove, 99)}


class _KeepAlive:
    """An established connection from the client pod, checked on demand."""

    def __init__(self, w: World, ip: str) -> None:
        self.proc = subprocess.Popen(["ip", "netns", "exec", w.client_ns, sys.executable, "-c", _KEEPALIVE, ip,
                                      str(SERVICE_PORT)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)
        w.procs.append(self.proc)

    def check(self) -> bool:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write("?\n")
            self.proc.stdin.flush()
            return self.proc.stdout.readline().strip() == "ok"
        except OSError:
            return False


async def _attach(dp: Any, w: World) -> None:
    for eid, ip, lxc, ident in ((1, w.client_ip, w.client_lxc, 60001), (2, w.server_ip, w.server_lxc, 60002)):
        await dp.attach_endpoint(endpoint_id=eid, ip=ip, identity=ident, ifname=lxc,
                                 ingress_enforced=False, egress_enforced=False)
    await dp._tc.close()


def run(counts: Sequence[int], connections: int = 2000, warmup: int = 200, update_samples: int = 200,
        iptables_samples: int = 5, repeat: int = 100_000) -> int:
    from propolis.datapath import Datapath
    from propolis.maps import lb as lbmaps

    if os.geteuid() != 0:
        print("propolis bench services: needs root (namespaces, BPF, iptables)", file=sys.stderr)
        return 1
    counts = sorted(set(counts))
    if not counts or counts[0] < 1 or counts[-1] > 12_000:
        print("propolis bench services: counts must be in 1..12000 (map sizes)", file=sys.stderr)
        return 2
    suffix = secrets.token_hex(3)
    octet = int(suffix[:2], 16) % 200 + 20
    node = f"ppbs-{os.getpid()}-{suffix}"
    worlds: list[World] = []
    dp: Datapath | None = None
    tools = Tools()
    rows: list[dict[str, Any]] = []
    resync: dict[str, Any] = {}
    try:
        ebpf_w = _make_world("ebpf", suffix, octet, tools)
        worlds.append(ebpf_w)
        ipt_w = _make_world("ipt", suffix, (octet + 1) % 250, tools)
        worlds.append(ipt_w)
        dp = Datapath(node, netns=ebpf_w.node_ns)
        dp.load_sync()
        asyncio.run(_attach(dp, ebpf_w))
        dp.upsert_endpoint(endpoint_id=3, ip="10.252.255.1", identity=60003, ifindex=1,
                           ingress_enforced=False, egress_enforced=False)  # the PROG_TEST_RUN sender
        kp = KubeProxyTables(ipt_w)
        for n in counts:
            row: dict[str, Any] = {"services": n, "backends": n * BACKENDS_PER_SERVICE}
            services = _lb_services(n, ebpf_w.server_ip)
            sync = dp.set_services(services)
            row["ebpf_sync_ms"] = sync.seconds * 1000
            e = crr(ebpf_w, tools, vip(n - 1), connections, warmup)
            row.update({"ebpf_p50_us": e["p50_us"], "ebpf_p99_us": e["p99_us"], "ebpf_conn_s": e["conn_per_s"],
                        "ebpf_fails": e["fails"]})
            row.update(_prog_cost(dp, n, repeat))
            row.update(_ebpf_add_remove(dp, n, update_samples))

            row["ipt_restore_s"] = kp.restore(kp.full(n), noflush=False)
            i = crr(ipt_w, tools, vip(n - 1), connections, warmup)
            row.update({"ipt_p50_us": i["p50_us"], "ipt_p99_us": i["p99_us"], "ipt_conn_s": i["conn_per_s"],
                        "ipt_fails": i["fails"]})
            adds, removes = [], []
            for k in range(iptables_samples):
                adds.append(kp.add_one(n, n + k) * 1000)
                removes.append(kp.remove_one(n, n + k) * 1000)
            row["ipt_add_p50_ms"] = percentile(adds, 50)
            row["ipt_remove_p50_ms"] = percentile(removes, 50)
            rows.append(row)
            print(f"[bench services] N={n} done", file=sys.stderr, flush=True)

        # full resync at the largest N: cold (every entry written with batch ops), then a
        # restart (maps adopted, read back, diffed: nothing to write) under an established flow
        n = counts[-1]
        services = _lb_services(n, ebpf_w.server_ip)
        for spec in lbmaps.SPECS:
            dp._map(spec.pin_name).clear()
        dp._services = None
        cold = dp.set_services(services)
        keep = _KeepAlive(ebpf_w, vip(n - 1))
        before = keep.check()
        asyncio.run(dp.close())
        restarted = Datapath(node, netns=ebpf_w.node_ns)
        started = time.perf_counter()
        restarted.load_sync()
        load_s = time.perf_counter() - started
        warm = restarted.set_services(services)
        dp = restarted
        resync = {"services": n, "backends": n * BACKENDS_PER_SERVICE,
                  "cold_write_ms": cold.seconds * 1000, "cold_entries_written": cold.entries_written,
                  "restart_load_ms": load_s * 1000, "restart_resync_ms": warm.seconds * 1000,
                  "restart_entries_written": warm.entries_written,
                  "established_ok_before": before, "established_ok_after": keep.check()}
    finally:
        if dp is not None:
            try:
                asyncio.run(dp.remove_all())
            except Exception as exc:  # keep cleaning
                print(f"cleanup: {exc}", file=sys.stderr)
        for w in worlds:
            _destroy_world(w)
        tools.remove()

    columns = ["services", "ebpf_p50_us", "ebpf_p99_us", "ebpf_conn_s", "ipt_p50_us", "ipt_p99_us", "ipt_conn_s",
               "prog_ns_established", "prog_ns_new", "ebpf_add_p99_ms", "ebpf_remove_p99_ms",
               "ipt_add_p50_ms", "ipt_remove_p50_ms", "ipt_restore_s", "ebpf_sync_ms"]
    print("resync:", json.dumps(resync))
    ipt_version = subprocess.run(["iptables", "--version"], capture_output=True, text=True).stdout.strip()
    report("services", rows, columns, extra={
        "resync": resync, "iptables": ipt_version, "backends_per_service": BACKENDS_PER_SERVICE,
        "connections_per_point": connections, "crr_client": tools.kind,
        "command": "propolis bench services --counts " + ",".join(str(c) for c in counts)})
    return 0
