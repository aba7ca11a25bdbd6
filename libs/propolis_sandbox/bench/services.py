"""`propolis bench services`: the same N services as eBPF maps and as kube-proxy's iptables
chains, side by side in one run, in private namespaces.

Why both in one run: the claim is relative (a hash lookup vs a linear walk of
KUBE-SERVICES), so both sides must meet the same kernel, CPU and load. Two identical
worlds are built: node namespace + client pod + server pod; in one the pods' veths carry
bpf_lxc and the services are in the cilium_lb4_* maps, in the other the veths are plain
and the node's nat table has kube-proxy's layout (KUBE-SERVICES -> KUBE-SVC-… ->
KUBE-SEP-… with statistic-mode random), installed with iptables-restore.

For each N: TCP_CRR-style connection setup (a new connection per request) to the FIRST, MIDDLE and
LAST service of the table (the last is iptables' worst case), eBPF and iptables in alternating batches
(e, i, i, e, …) so machine noise hits both alike; failed connections are counted per point and a point
with failures is marked FAILED, its latency not reported. Then the per-packet cost of cil_from_container
through BPF_PROG_TEST_RUN; the writer's map write alone for one Service added / removed when N exist
(`writer.targets.ServicesTarget`, the datapath-writer's own incremental write), vs iptables-restore
--noflush as kube-proxy does it. At the largest N: a full resync after a writer restart (batch map
operations), with an established connection checked before and after.

The product path (`product_samples` > 0, at the largest N): a one-node sandbox running the k8s-watcher,
identity-allocator and datapath-writer holds N Services with their EndpointSlices; each sample is an API
write of one more Service and its EndpointSlice -> its frontend, with every backend, in the node's pinned
LB map (polled), then the same for deleting it.
Every namespace, pin, sandbox and process is removed at the end, even on failure.
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
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from propolis_sandbox.bench.common import (
    P99_MIN_SAMPLES,
    percentile,
    print_table,
    report,
    spread,
)

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


def probe_points(n: int) -> list[tuple[str, int]]:
    """(position, index) of the Services connections are timed to: first, middle and last of the table."""
    points: dict[int, str] = {}
    for position, i in (("first", 0), ("middle", n // 2), ("last", n - 1)):
        points.setdefault(i, position)
    return [(position, i) for i, position in points.items()]


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


def crr(w: World, tools: Tools, ip: str, count: int, warmup: int) -> dict[str, Any]:
    """New TCP connection per request from the client pod: {"lat_us": [...], "fails": n, "elapsed": s}."""
    out: dict[str, Any] = json.loads(sh("ip", "netns", "exec", w.client_ns, *tools.client(ip, SERVICE_PORT, count,
                                                                                        warmup)))
    return out


def latency_point(lat_us: Sequence[float], fails: int, seconds: float) -> dict[str, Any]:
    """One latency point: p50/p99 (max under 100 samples) and rate, or, with failed connections, the count
    and FAILED instead of figures (a point that lost connections is not averaged with good ones)."""
    if fails:
        return {"n": len(lat_us), "fails": fails, "mark": "FAILED"}
    figures = spread(lat_us)
    return {**figures, "fails": 0, "mark": "", "conn_s": len(lat_us) / seconds if seconds else float("nan")}


def interleaved_crr(worlds: dict[str, World], tools: Tools, n: int, connections: int, warmup: int,
                    rounds: int) -> list[dict[str, Any]]:
    """Per probe point, eBPF and iptables in alternating batches (round r: e,i when r is even, i,e when odd),
    `connections` per side and point split over the rounds. One row per point."""
    lat: dict[tuple[str, str], list[float]] = {}
    fails: dict[tuple[str, str], int] = {}
    elapsed: dict[tuple[str, str], float] = {}
    per_batch = max(1, connections // rounds)
    for r in range(rounds):
        for side in ("ebpf", "ipt") if r % 2 == 0 else ("ipt", "ebpf"):
            for position, i in probe_points(n):
                out = crr(worlds[side], tools, vip(i), per_batch, warmup if r < 2 else 0)
                lat.setdefault((side, position), []).extend(out["lat_us"])
                fails[(side, position)] = fails.get((side, position), 0) + out["fails"]
                elapsed[(side, position)] = elapsed.get((side, position), 0.0) + out["elapsed"]
    rows = []
    for position, i in probe_points(n):
        row: dict[str, Any] = {"services": n, "probe": f"{position} ({vip(i)})"}
        for side in ("ebpf", "ipt"):
            point = latency_point(lat[(side, position)], fails[(side, position)], elapsed[(side, position)])
            row.update({f"{side}_{k}{'_us' if k in ('p50', 'p99', 'max') else ''}": v for k, v in point.items()})
        rows.append(row)
    return rows


# ------------------------------------------------------------------ iptables (kube-proxy layout)
def _chain(prefix: str, text: str) -> str:
    return prefix + base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()[:16]


class KubeProxyTables:
    """kube-proxy's iptables mode nat rules for services 0..n-1 (the probed ones are real)."""

    def __init__(self, w: World) -> None:
        self.w = w

    def backends(self, i: int, n: int) -> list[tuple[str, int]]:
        if i in {j for _, j in probe_points(n)}:
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
    real = {j for _, j in probe_points(n)}
    for i in range(n):
        if i in real:
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


async def _writer_map_writes(dp: Any, services: list[Any], samples: int) -> dict[str, Any]:
    """The datapath-writer's own map write (`ServicesTarget.update` over its frontend table) for one Service
    added, then removed, with `services` in the maps: what the writer spends in the kernel per change."""
    from propolis.lb import desired_services
    from propolis.lb.frontends import FrontendTable, service_owner
    from propolis.writer.targets import ServicesTarget

    table = FrontendTable()
    target = ServicesTarget(dp, table)
    table.replace_all({service_owner(s.namespace, s.name): [s] for s in services})
    await target.update(NODE_NAME, 0)  # the full write after a start (nothing to write: the maps hold them)
    add, remove = [], []
    for k in range(samples):
        service, eps = _k8s_pair(len(services) + k)
        owner = service_owner(service.namespace, service.name)
        table.assign(owner, desired_services([service], [eps], node_name=NODE_NAME))
        started = time.perf_counter()
        await target.update(NODE_NAME, 2 * k + 1)
        add.append((time.perf_counter() - started) * 1000)
        table.assign(owner, [])
        started = time.perf_counter()
        await target.update(NODE_NAME, 2 * k + 2)
        remove.append((time.perf_counter() - started) * 1000)
    return {"add_ms": spread(add), "remove_ms": spread(remove)}


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


# ------------------------------------------------------------------ the product path (sandbox)
PRODUCT_SERVICES = "k8s-watcher,identity-allocator,datapath-writer"
PRODUCT_NAMESPACE = "bench-lb"


def _api_service(i: int) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": f"svc-{i}", "namespace": PRODUCT_NAMESPACE},
            "spec": {"ports": [{"name": "http", "port": SERVICE_PORT, "protocol": "TCP"}]}}


def _api_slice(i: int) -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"svc-{i}-x", "namespace": PRODUCT_NAMESPACE,
                         "labels": {"kubernetes.io/service-name": f"svc-{i}"}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": SERVER_PORT_BASE, "protocol": "TCP"}],
            "endpoints": [{"addresses": [fake_backend(i, j)], "conditions": {"ready": True}}
                          for j in range(BACKENDS_PER_SERVICE)]}


async def _until_frontend(services_map: Any, ip: str, present: bool, deadline: float) -> float | None:
    """Poll the pinned services map (one lookup per 0.5 ms) until the frontend's master entry is there with
    every backend (`present`) or gone; the time it was seen, None past `deadline`."""
    from propolis.maps import lb as lbmaps

    key = lbmaps.service_key(ip, SERVICE_PORT, lbmaps.PROTO_NUMBERS["TCP"])
    while time.perf_counter() < deadline:
        value = services_map.lookup(key)
        if (value is not None and value.count == BACKENDS_PER_SERVICE) if present else value is None:
            return time.perf_counter()
        await asyncio.sleep(0.0005)
    return None


async def product_path(n: int, samples: int, concurrency: int = 16) -> dict[str, Any]:
    """API write of one Service + EndpointSlice at `n` existing -> its frontend in the pinned LB map (and the
    delete), through the real k8s-watcher, identity-allocator and datapath-writer of a one-node sandbox."""
    from propolis.maps import lb as lbmaps
    from propolis_sandbox import cluster, fixture
    from propolis_sandbox.resources import KINDS

    name = "bs" + secrets.token_hex(4)
    out: dict[str, Any] = {"services": n, "samples": samples, "suite": PRODUCT_SERVICES}
    print(f"[bench services] product path: sandbox {name} up, {n} Services", file=sys.stderr, flush=True)
    try:
        state = await asyncio.to_thread(cluster.up, name, nodes=1, services=PRODUCT_SERVICES)
        await cluster.wait(state, timeout=60)
        async with cluster.Api(state.apiserver_url) as api:
            await api.request("POST", KINDS["Namespace"].path(None),
                              body={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": PRODUCT_NAMESPACE}})
            svc_path, slice_path = KINDS["Service"].path(PRODUCT_NAMESPACE), KINDS["EndpointSlice"].path(PRODUCT_NAMESPACE)
            todo = iter(range(n))
            started = time.perf_counter()

            async def create() -> None:
                for i in todo:
                    await api.request("POST", svc_path, body=_api_service(i))
                    await api.request("POST", slice_path, body=_api_slice(i))
            await asyncio.gather(*[create() for _ in range(concurrency)])
            out["populate_s"] = time.perf_counter() - started
            await cluster.wait(state, timeout=max(120.0, n / 20))
            out["populate_to_synced_s"] = time.perf_counter() - started
            adds: list[float] = []
            deletes: list[float] = []
            missed = 0
            with lbmaps.SERVICES_SPEC.open(state.nodes[0]["pin_dir"]) as services_map:
                out["frontends_in_map_before"] = sum(1 for k, _ in lbmaps.items_batch(services_map)
                                                     if k.backend_slot == 0)
                for k in range(samples):
                    i = n + k
                    written = time.perf_counter()
                    created = await api.request("POST", svc_path, body=_api_service(i))
                    await api.request("POST", slice_path, body=_api_slice(i))
                    ip = created["spec"]["clusterIP"]
                    seen = await _until_frontend(services_map, ip, True, written + 10.0)
                    if seen is None:
                        missed += 1
                        continue
                    adds.append((seen - written) * 1000)
                    written = time.perf_counter()
                    await api.request("DELETE", f"{slice_path}/svc-{i}-x")
                    await api.request("DELETE", f"{svc_path}/svc-{i}")
                    seen = await _until_frontend(services_map, ip, False, written + 10.0)
                    if seen is None:
                        missed += 1
                    else:
                        deletes.append((seen - written) * 1000)
            out.update({"add_ms": spread(adds), "delete_ms": spread(deletes), "missed_within_10s": missed})
    finally:
        await asyncio.to_thread(cluster.down, name)
        left = fixture.leftovers(name)
        out["sandbox_leftovers"] = {k: v for k, v in left.items() if v}
    return out


def run(counts: Sequence[int], connections: int = 2000, warmup: int = 200, update_samples: int = 100,
        iptables_samples: int = 5, repeat: int = 100_000, rounds: int = 2, product_samples: int = 100,
        product_count: int | None = None) -> int:
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
    changes: list[dict[str, Any]] = []
    resync: dict[str, Any] = {}
    product: dict[str, Any] = {}
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
            services = _lb_services(n, ebpf_w.server_ip)
            change: dict[str, Any] = {"services": n, "backends": n * BACKENDS_PER_SERVICE,
                                      "ebpf_sync_ms": dp.set_services(services).seconds * 1000,
                                      "ipt_restore_s": kp.restore(kp.full(n), noflush=False)}
            rows.extend(interleaved_crr({"ebpf": ebpf_w, "ipt": ipt_w}, tools, n, connections, warmup, rounds))
            change.update(_prog_cost(dp, n, repeat))
            writes = asyncio.run(_writer_map_writes(dp, services, update_samples))
            for what in ("add", "remove"):
                figures = writes[f"{what}_ms"]
                change[f"writer_{what}_p50_ms"] = figures["p50"]
                change[f"writer_{what}_{'p99' if 'p99' in figures else 'max'}_ms"] = figures.get("p99",
                                                                                               figures.get("max"))
            adds, removes = [], []
            for k in range(iptables_samples):
                adds.append(kp.add_one(n, n + k) * 1000)
                removes.append(kp.remove_one(n, n + k) * 1000)
            change["ipt_add_p50_ms"] = percentile(adds, 50)
            change["ipt_remove_p50_ms"] = percentile(removes, 50)
            changes.append(change)
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
            except Exception as exc:  # noqa: BLE001 - keep cleaning
                print(f"cleanup: {exc}", file=sys.stderr)
        for w in worlds:
            _destroy_world(w)
        tools.remove()
    if product_samples:  # after the worlds are gone: the sandbox gets the machine to itself
        product = asyncio.run(product_path(product_count or counts[-1], product_samples))

    tail = "p99" if connections >= P99_MIN_SAMPLES else "max"
    columns = ["services", "probe", "ebpf_p50_us", f"ebpf_{tail}_us", "ebpf_conn_s", "ebpf_fails", "ebpf_mark",
               "ipt_p50_us", f"ipt_{tail}_us", "ipt_conn_s", "ipt_fails", "ipt_mark"]
    change_columns = ["services", "writer_add_p50_ms", f"writer_add_{'p99' if update_samples >= P99_MIN_SAMPLES else 'max'}_ms",
                      "writer_remove_p50_ms",
                      f"writer_remove_{'p99' if update_samples >= P99_MIN_SAMPLES else 'max'}_ms",
                      "ipt_add_p50_ms", "ipt_remove_p50_ms", "prog_ns_established", "prog_ns_new", "ebpf_sync_ms",
                      "ipt_restore_s"]
    print_table(changes, change_columns)
    if product:
        print_table([{"path": f"API write -> frontend in pinned LB map, {product['services']} Services", "op": op,
                      **product[f"{op}_ms"]} for op in ("add", "delete")], ["path", "op", "n", "p50", "p99", "max"])
    ipt_version = subprocess.run(["iptables", "--version"], capture_output=True, text=True).stdout.strip()
    report("services", rows, columns, extra={
        "changes": changes, "product_path": product, "resync": resync, "iptables": ipt_version,
        "backends_per_service": BACKENDS_PER_SERVICE, "connections_per_point": connections, "rounds": rounds,
        "crr_client": tools.kind,
        "targets": {"product_path_p99_ms": 10, "writer_map_write_p99_ms": 2}})
    return 0
