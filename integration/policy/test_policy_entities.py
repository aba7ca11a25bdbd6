"""Policy peers resolved through cluster objects, with real packets, and fields accepted but not enforced
named on the object's status — in a sandbox running the whole suite.

* ``toEntities: kube-apiserver``: the API server's addresses are the ``default/kubernetes`` Service's
  EndpointSlices (as kube-apiserver publishes them and Cilium reads them). The sandbox's own API server
  listens on the root namespace's loopback, which no pod can reach, so the test plays a hostNetwork API
  server the way kind runs one on its control-plane node: a listener on node 2's InternalIP:6443, and the
  ``kubernetes`` Service + EndpointSlice naming it. Before the EndpointSlice exists node 2 is just a remote
  node and the egress policy drops; with it, the address carries identity 7 and the policy allows it.
* ``toServices``: the backends of the named Service are the peer, and follow its EndpointSlices.
* A CNP with L7 rules: accepted (Valid), and its status carries the NotEnforced condition naming the field;
  `propolis endpoint list` shows the selected endpoint's enforcement and state.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import socket
import subprocess
import time

import pytest
from policy_workload import NO, OK, PodDef, Workload, cnp, sel

from propolis.cli.main import build_parser
from propolis_sandbox import cluster, probe
from propolis_sandbox import netns as netns_mod
from propolis_sandbox.fixture import running_sandbox
from propolis_sandbox.resources import KINDS

pytestmark = pytest.mark.root
API_PORT = 6443


@pytest.fixture(scope="module")
def sandbox():
    with running_sandbox(nodes=2, services="all") as state:
        asyncio.run(cluster.wait(state, timeout=60))
        yield state


def workload(sandbox, prefix: str) -> Workload:
    return Workload(sandbox, prefix, {"a": {"team": "a"}}, [
        PodDef("a/client", 1, {"app": "client"}, server=True),
        PodDef("a/other", 1, {"app": "other"}, server=True),
        PodDef("a/server", 1, {"app": "server"}, server=True),
        PodDef("a/far", 2, {"app": "far"}, server=True)])


async def serve_on_node(netns: str, ip: str, port: int) -> asyncio.base_events.Server:
    """A TCP listener in a node's own namespace (a hostNetwork server), answering `apiserver`."""
    sock = netns_mod.socket_in(netns, socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((ip, port))

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"apiserver\n")
        await writer.drain()
        writer.close()

    return await asyncio.start_server(answer, sock=sock)


async def probe_node(w: Workload, source: str, ip: str, port: int) -> bool:
    (res,) = await probe.probe_all([probe.ProbeSpec(w.netns(source), ip, port, "TCP", source, ip)], timeout=1.5)
    return res.connected


def kubernetes_service(ip: str) -> list[dict]:
    return [{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "kubernetes", "namespace": "default"},
             "spec": {"ports": [{"name": "https", "port": 443, "targetPort": API_PORT, "protocol": "TCP"}]}},
            {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
             "metadata": {"name": "kubernetes", "namespace": "default",
                          "labels": {"kubernetes.io/service-name": "kubernetes"}},
             "addressType": "IPv4", "ports": [{"name": "https", "port": API_PORT, "protocol": "TCP"}],
             "endpoints": [{"addresses": [ip], "conditions": {"ready": True}}]}]


async def test_to_entities_kube_apiserver_with_packets(sandbox):
    node2 = sandbox.nodes[1]
    server = await serve_on_node(node2["netns"], node2["internal_ip"], API_PORT)
    api_objects = kubernetes_service(node2["internal_ip"])
    try:
        async with workload(sandbox, "kapi") as w:
            await w.apply([
                cnp("to-apiserver", {"endpointSelector": sel(app="client"), "egress": [
                    {"toEntities": ["kube-apiserver"], "toPorts": [{"ports": [{"port": str(API_PORT), "protocol": "TCP"}]}]}]}),
                cnp("to-pods-only", {"endpointSelector": sel(app="other"), "egress": [{"toEndpoints": [{}]}]})])
            # Without the kubernetes EndpointSlice, node 2's address is a remote node: both are dropped.
            assert not await probe_node(w, "a/client", node2["internal_ip"], API_PORT)
            assert not await probe_node(w, "a/other", node2["internal_ip"], API_PORT)
            assert await probe_node(w, "node:1", node2["internal_ip"], API_PORT)  # the listener answers

            await cluster.apply_documents(sandbox, w.documents(api_objects, "kubernetes service"))
            await cluster.wait(sandbox, timeout=60)
            assert await probe_node(w, "a/client", node2["internal_ip"], API_PORT)
            assert not await probe_node(w, "a/other", node2["internal_ip"], API_PORT)
            assert await w.verify("pods only", [("a/other", "a/server", 8080, "TCP", OK),
                                                ("a/client", "a/server", 8080, "TCP", NO)]) == []

            # endpoint list: the client's egress is enforced and its policy is in the kernel
            rows = await endpoint_list(sandbox)
            client = rows[(w.ns("a"), "client")]
            assert client["policyEnforcement"] == {"ingress": "Disabled", "egress": "Enabled"}, client
            assert client["state"] == "ready" and client["endpointID"], client
            assert client["ipv4"] == [w.ip("a/client")] and client["identity"] > 255

            # The EndpointSlice goes: node 2 is a remote node again, the client is dropped again.
            await cluster.delete_documents(sandbox, w.documents(api_objects[1:], "kubernetes slice"))
            await cluster.wait(sandbox, timeout=60)
            assert not await probe_node(w, "a/client", node2["internal_ip"], API_PORT)
    finally:
        server.close()
        await delete_quietly(sandbox, api_objects)


async def delete_quietly(sandbox, objects: list[dict]) -> None:
    """Delete what a test created in shared namespaces (`default`), whether or not it still exists."""
    async with cluster.Api(sandbox.apiserver_url) as api:
        for obj in objects:
            kind = KINDS[obj["kind"]]
            try:
                await api.request("DELETE", kind.path(obj["metadata"]["namespace"], obj["metadata"]["name"]))
            except cluster.ApiError as exc:
                if exc.status != 404:
                    raise


async def endpoint_list(sandbox) -> dict[tuple[str, str], dict]:
    """`propolis endpoint list -o json` once every row has a state from its writer."""
    deadline = time.monotonic() + 15
    while True:
        args = build_parser().parse_args(["endpoint", "list", "-o", "json", "--name", sandbox.config["name"]])
        out = await capture(args)
        rows = {(r["namespace"], r["pod"]): r for r in json.loads(out)}
        if all(r["state"] == "ready" for r in rows.values()) or time.monotonic() > deadline:
            return rows
        await asyncio.sleep(0.5)


async def capture(args) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        await args.func(args)
    return buf.getvalue()


async def test_to_services_follows_the_services_endpoints(sandbox):
    async with workload(sandbox, "tosvc") as w:
        backend = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "backend", "namespace": "a"},
                   "spec": {"selector": {"app": "server"}, "ports": [{"port": 80, "targetPort": 8080}]}}
        failures = await w.step("toServices: backend = server", [
            ("a/client", "a/server", 8080, "TCP", OK), ("a/client", "a/far", 8080, "TCP", NO),
            ("a/client", "a/other", 8080, "TCP", NO), ("a/other", "a/far", 8080, "TCP", OK)], apply=[
            backend, cnp("to-backend", {"endpointSelector": sel(app="client"), "egress": [
                {"toServices": [{"k8sService": {"serviceName": "backend", "namespace": "{ns:a}"}}]}]})])
        # The Service now selects the pod on the other node: the allowed peer moves with its EndpointSlice.
        backend["spec"]["selector"] = {"app": "far"}
        failures += await w.step("toServices: backend = far", [
            ("a/client", "a/far", 8080, "TCP", OK), ("a/client", "a/server", 8080, "TCP", NO)], apply=[backend])
        assert not failures, "\n" + "\n".join(failures)


async def test_l7_rules_are_accepted_and_named_not_enforced_on_the_object(sandbox):
    """Generic (l7proto) rules: no proxy enforces them (HTTP and Kafka rules are: integration/l7)."""
    async with workload(sandbox, "l7") as w:
        policy = cnp("l7", {"endpointSelector": sel(app="server"), "ingress": [
            {"fromEndpoints": [sel(app="client")], "toPorts": [
                {"ports": [{"port": "8080", "protocol": "TCP"}], "rules": {"l7proto": "r2d2", "l7": [{"cmd": "READ"}]}}]}]})
        # the L4 port is open (to every request, which is what the condition says)
        failures = await w.step("L7 rules", [("a/client", "a/server", 8080, "TCP", OK),
                                             ("a/other", "a/server", 8080, "TCP", NO)], apply=[policy])
        assert not failures, failures
        deadline = time.monotonic() + 15
        async with cluster.Api(sandbox.apiserver_url) as api:
            while True:
                obj = await api.request("GET", KINDS["CiliumNetworkPolicy"].path(w.ns("a"), "l7"))
                conditions = (obj.get("status") or {}).get("conditions") or []
                if len(conditions) == 2 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
        valid, warning = conditions
        assert valid["type"] == "Valid" and valid["status"] == "True"
        assert warning["type"] == "NotEnforced" and warning["status"] == "True"
        assert warning["reason"] == "FieldsNotEnforced"
        assert "spec.ingress[0].toPorts[0].rules: no L7 proxy enforces this rule family yet" in warning["message"]

        # Without the L7 section the warning goes (the whole conditions list is rewritten).
        del policy["spec"]["ingress"][0]["toPorts"][0]["rules"]
        await w.apply([policy])
        deadline = time.monotonic() + 15
        async with cluster.Api(sandbox.apiserver_url) as api:
            while True:
                obj = await api.request("GET", KINDS["CiliumNetworkPolicy"].path(w.ns("a"), "l7"))
                types = [c["type"] for c in (obj.get("status") or {}).get("conditions") or []]
                if types == ["Valid"] or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
        assert types == ["Valid"]


async def cnp_conditions(sandbox, namespace: str, name: str, done, timeout: float = 20.0) -> list[dict]:
    """The policy's status.conditions once `done(conditions)` holds (or the timeout passed)."""
    deadline = time.monotonic() + timeout
    async with cluster.Api(sandbox.apiserver_url) as api:
        while True:
            obj = await api.request("GET", KINDS["CiliumNetworkPolicy"].path(namespace, name))
            conditions = (obj.get("status") or {}).get("conditions") or []
            if done(conditions) or time.monotonic() > deadline:
                return conditions
            await asyncio.sleep(0.3)


async def test_a_policy_a_node_cannot_enforce_gets_a_failure_condition_and_the_endpoint_shows_it(sandbox):
    async with workload(sandbox, "big") as w:
        small = cnp("server", {"endpointSelector": sel(app="server"), "ingress": [
            {"fromEndpoints": [sel(app="client")], "toPorts": [{"ports": [{"port": "8080", "protocol": "TCP"}]}]}]})
        checks = [("a/client", "a/server", 8080, "TCP", OK), ("a/other", "a/server", 8080, "TCP", NO)]
        assert await w.step("small policy", checks, apply=[small]) == []
        # 425 rules x 40 ports from one peer: 17,000 rows (+ allow-localhost) for a 16,384-row map
        big = cnp("server", {"endpointSelector": sel(app="server"), "ingress": [
            {"fromEndpoints": [sel(app="client")],
             "toPorts": [{"ports": [{"port": str(10000 + 40 * i + j), "protocol": "TCP"} for j in range(40)]}]}
            for i in range(425)] + small["spec"]["ingress"]})
        assert await w.step("too large: the last enforced state stays", checks, apply=[big]) == []

        failed = await cnp_conditions(sandbox, w.ns("a"), "server", lambda cs: any(c["type"] == "Enforced" for c in cs))
        enforced = next((c for c in failed if c["type"] == "Enforced"), None)
        assert enforced is not None, failed
        node1 = sandbox.nodes[0]["name"]
        assert enforced["status"] == "False" and enforced["reason"] == "EnforcementFailed"
        assert f"node {node1}: endpoint {w.ns('a')}/server:" in enforced["message"] and "16384" in enforced["message"]
        assert failed[0]["type"] == "Valid" and failed[0]["status"] == "True"
        rows = await endpoint_list(sandbox)
        server = rows[(w.ns("a"), "server")]
        assert server["state"] == "not-ready" and "16384" in server["reason"], server
        assert rows[(w.ns("a"), "client")]["state"] == "ready"

        # Back to a policy the map holds: enforced again, the condition goes.
        assert await w.step("fits again", checks, apply=[small]) == []
        cleared = await cnp_conditions(sandbox, w.ns("a"), "server", lambda cs: [c["type"] for c in cs] == ["Valid"])
        assert [c["type"] for c in cleared] == ["Valid"], cleared
        assert (await endpoint_list(sandbox))[(w.ns("a"), "server")]["state"] == "ready"


async def test_cidr_group_ref_with_packets(sandbox):
    """A CiliumCIDRGroup applied through the sandbox API, mirrored by the watcher, turned into CIDR
    identities by the writer: the policy naming it follows the group's CIDRs. The 'outside' address is
    TEST-NET-1 192.0.2.10 on node 2's loopback, routed from node 1 (nothing leaves the sandbox)."""
    node1, node2 = sandbox.nodes[0], sandbox.nodes[1]
    outside = "192.0.2.10"
    ip("-n", node2["netns"], "addr", "add", f"{outside}/32", "dev", "lo")
    ip("-n", node1["netns"], "route", "add", f"{outside}/32", "via", node2["internal_ip"])
    server = await serve_on_node(node2["netns"], outside, 7000)
    try:
        async with workload(sandbox, "ccg") as w:
            group = {"apiVersion": "cilium.io/v2", "kind": "CiliumCIDRGroup", "metadata": {"name": "partners"},
                     "spec": {"externalCIDRs": ["192.0.2.0/24"]}}
            await w.apply([
                cnp("to-partners", {"endpointSelector": sel(app="client"),
                                    "egress": [{"toCIDRSet": [{"cidrGroupRef": f"partners-{w.suffix}"}]}]}),
                cnp("to-pods-only", {"endpointSelector": sel(app="other"), "egress": [{"toEndpoints": [{}]}]})])
            assert await probe_node(w, "node:1", outside, 7000)  # the route and the listener work
            assert not await probe_node(w, "a/client", outside, 7000)  # the group does not exist yet

            await w.apply([group])
            assert await probe_node(w, "a/client", outside, 7000)
            assert not await probe_node(w, "a/other", outside, 7000)

            group["spec"]["externalCIDRs"] = ["198.51.100.0/24"]  # the group moves away: dropped again
            await w.apply([group])
            assert not await probe_node(w, "a/client", outside, 7000)
            await w.delete([group])
    finally:
        server.close()
        ip("-n", node1["netns"], "route", "del", f"{outside}/32")
        ip("-n", node2["netns"], "addr", "del", f"{outside}/32", "dev", "lo")


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)
