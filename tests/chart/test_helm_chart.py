"""The Helm chart: lint, renders, Kubernetes schemas, values schema, generated parts, per-service wiring."""

from __future__ import annotations

import argparse
import importlib
import json
import shutil

import kubernetes_validate
import pytest
from chart_render import ALL_FEATURES, CHART, helm, load_generator, render, workloads

from propolis import suite
from propolis.maps import conntrack, lb, policy
from propolis.runtime import settings as settings_mod

K8S_VERSION = "1.33.0"  # validated against this release's schemas (kubernetes-validate ships them offline)


def test_generated_parts_are_current_and_every_service_has_a_subchart() -> None:
    assert load_generator().problems() == []


def test_a_service_without_subchart_is_reported(tmp_path) -> None:
    gen = load_generator()
    copy = tmp_path / "propolis"
    shutil.copytree(CHART, copy)
    shutil.rmtree(copy / "charts" / "hubble-relay")
    gen.CHART, gen.PERMISSIONS_FILE = copy, copy / "files" / "nats-permissions.json"
    assert any("service hubble-relay" in p and "no subchart" in p for p in gen.problems())


@pytest.mark.parametrize("sets", [[], ALL_FEATURES], ids=["defaults", "all-features"])
def test_helm_lint(sets: list[str]) -> None:
    args = ["lint", str(CHART), "--strict"]
    for s in sets:
        args += ["--set", s]
    helm(*args)


@pytest.mark.parametrize("sets", [[], ALL_FEATURES], ids=["defaults", "all-features"])
def test_every_rendered_object_is_valid_kubernetes(sets: list[str]) -> None:
    docs = render(*sets)
    assert len(docs) > 10
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']} {doc['metadata']['name']}: {exc.message} at {list(exc.path)}")


def test_all_features_renders_every_service_of_the_suite() -> None:
    rendered = workloads(render(*ALL_FEATURES))
    for service in suite.SUITE_SERVICES:
        kind = "DaemonSet" if service.scope == "node" else "Deployment"
        assert rendered[service.name]["kind"] == kind, service.name
        pod = rendered[service.name]["spec"]["template"]["spec"]
        # per-node services and what the datapath waits for run in the host's network (templates/nats.yaml)
        wanted = service.scope == "node" or service.name in ("k8s-watcher", "identity-allocator")
        assert pod.get("hostNetwork", False) == wanted, service.name
        nats_url = next(e["value"] for e in pod["containers"][0]["env"] if e["name"] == "PROPOLIS_NATS_URL")
        assert nats_url == "tls://$(PROPOLIS_NATS_SERVICE_HOST):4222"  # no cluster DNS needed
        assert pod["containers"][0]["command"] == [service.argv[0]]
    assert rendered["k8s-watcher"]["spec"]["replicas"] == 2
    assert rendered["identity-allocator"]["spec"]["replicas"] == 2


def test_services_whose_features_are_off_are_not_rendered() -> None:
    names = set(workloads(render()))
    assert "hubble-relay" not in names and "wireguard-keymgr" not in names
    assert "hubble" not in workloads(render("hubble.enabled=false"))
    assert {"k8s-watcher", "identity-allocator", "datapath-writer", "hubble"} <= names


def expected_rules(service: suite.SuiteService) -> list[dict[str, object]]:
    """What a service may do on the Kubernetes API, derived from what its code reads and writes."""
    source = (CHART.parents[1] / "services" / service.name.replace("-", "_") / "main.py").read_text()
    rules: dict[tuple[str, str], set[str]] = {}
    if "Reflector(" in source:  # one list+watch per mirrored kind, Valid conditions on cilium.io policies
        from propolis.k8s.kinds import KINDS, POLICY_KINDS
        for kind in KINDS.values():
            group = kind.group_version[0]
            rules.setdefault((group, "list,watch"), set()).add(kind.plural)
            if "patch_policy_status" in source and group == "cilium.io" and kind.plural in POLICY_KINDS:
                rules.setdefault((group, "patch"), set()).add(f"{kind.plural}/status")
    if service.serves_datapath_socket:  # its install-cni step reads the Node's podCIDR
        rules.setdefault(("", "get"), set()).add("nodes")
    return [{"apiGroups": [g], "resources": sorted(r), "verbs": v.split(",")} for (g, v), r in sorted(rules.items())]


def test_rbac_is_exactly_what_each_service_uses() -> None:
    docs = render(*ALL_FEATURES)
    roles = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ClusterRole"}
    accounts = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ServiceAccount"}
    for service in suite.SUITE_SERVICES:
        name = f"propolis-{service.name}"
        want = expected_rules(service)
        got = roles[name]["rules"] if name in roles else []
        normalized = sorted(({"apiGroups": r["apiGroups"], "resources": sorted(r["resources"]),
                              "verbs": sorted(r["verbs"])} for r in got), key=json.dumps)
        assert normalized == sorted(({**r, "verbs": sorted(r["verbs"])} for r in want), key=json.dumps), service.name
        assert accounts[name]["automountServiceAccountToken"] == bool(want), service.name
    assert not [d for d in docs if d["kind"] in ("Role", "RoleBinding")]


def settings_class(service: str) -> type:
    return importlib.import_module(f"services.{service.replace('-', '_')}.main").Settings  # type: ignore[no-any-return]


@pytest.mark.parametrize("sets", [[], ALL_FEATURES], ids=["defaults", "all-features"])
def test_every_flag_and_env_var_is_one_the_service_accepts(sets: list[str]) -> None:
    for name, workload in workloads(render(*sets)).items():
        cls = settings_class(name)
        container = workload["spec"]["template"]["spec"]["containers"][0]
        flags = {settings_mod.flag_name(f) for f in cls.__dataclass_fields__}
        envs = {settings_mod.env_name(f) for f in cls.__dataclass_fields__}
        args = container.get("args", [])
        unknown = [a for a in args if a.split("=", 1)[0] not in flags]
        assert not unknown, f"{name}: flags its Settings do not have: {unknown}"
        env = {}
        for e in container["env"]:
            if e["name"].startswith("PROPOLIS_"):
                assert e["name"] in envs, f"{name}: env {e['name']} is not a setting"
                env[e["name"]] = e.get("value", "from-a-secret-or-the-node")
        parser = argparse.ArgumentParser()
        settings_mod.add_arguments(parser, cls)
        loaded = settings_mod.load(cls, parser.parse_args(args), env)  # converts and validates every value
        assert loaded.nats_user == name


def test_values_schema_rejects_unknown_keys_and_wrong_types() -> None:
    cases = [("hubbel.enabled=true", "additional properties 'hubbel' not allowed"),
             ("hubble.relay.enabled=yes", "/hubble/relay/enabled"),
             ("nats.replicas=2", "/nats/replicas"),
             ("bpf.policyMapMax=1024", "value must be 16384"),
             ("policyEnforcementMode=strict", "/policyEnforcementMode")]
    args = ["template", "propolis", str(CHART)]
    for sets, _ in cases:
        args += ["--set", sets]
    proc = helm(*args, check=False)  # helm reports every violation at once
    assert proc.returncode != 0
    for sets, message in cases:
        assert message in proc.stderr, (sets, proc.stderr)


def test_bpf_map_values_are_the_datapath_sizes() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())["properties"]["bpf"]["properties"]
    assert schema["lbMapMax"]["const"] == lb.SERVICES_SPEC.max_entries
    assert schema["policyMapMax"]["const"] == policy.INNER_SPEC.max_entries
    assert schema["ctTcpMax"]["const"] == conntrack.TCP_SPEC.max_entries
    assert schema["ctAnyMax"]["const"] == conntrack.ANY_SPEC.max_entries


def test_rendered_objects_the_sandbox_api_serves_are_accepted_by_it() -> None:
    from propolis_sandbox.api_controllers import ServiceAllocator
    from propolis_sandbox.api_resources import BY_KIND
    from propolis_sandbox.api_store import Store

    store = Store(history_limit=50)
    store.admissions.append(ServiceAllocator(store, "10.96.0.0/16"))
    store.create(BY_KIND["Namespace"], None, {"metadata": {"name": "kube-system"}})
    served = [d for d in render(*ALL_FEATURES) if d["kind"] in BY_KIND]
    assert {d["kind"] for d in served} == {"Service"}
    for doc in served:
        resource = BY_KIND[doc["kind"]]
        created = store.create(resource, doc["metadata"].get("namespace") if resource.namespaced else None, doc)
        assert created["metadata"]["resourceVersion"]


def test_host_network_pods_do_not_share_a_port() -> None:
    """Every per-node service and NATS listen in the host namespace: one port each."""
    owners: dict[int, str] = {}
    for doc in render(*ALL_FEATURES):
        pod = doc.get("spec", {}).get("template", {}).get("spec", {})
        if not pod.get("hostNetwork") or doc["kind"] == "Job":
            continue
        for container in pod["containers"]:
            for port in container.get("ports", []):
                number = port["containerPort"]
                assert number not in owners, f"{doc['metadata']['name']} and {owners[number]} both use {number}"
                owners[number] = doc["metadata"]["name"]
    assert len(owners) >= 6


def test_install_notes_name_what_was_asked_for_but_not_deployed() -> None:
    proc = helm("install", "propolis", str(CHART), "--dry-run=client", "--set", "clustermesh.useAPIServer=true",
                "--set", "l7Proxy=true", "--set", "hostFirewall.enabled=true", "--set", "policyAuditMode=true",
                "--set", "encryption.enabled=true", "--set", "encryption.type=ipsec")
    notes = proc.stdout.split("NOTES:", 1)[1]
    unbuilt = [s for s in ("dns-proxy", "l7-proxy") if not (CHART / "charts" / s).is_dir()]
    if unbuilt:
        assert f"nothing was deployed for them): {', '.join(unbuilt)}." in notes
    assert "clustermesh-apiserver" not in notes  # built: deployed, not named as missing
    assert "not built yet (ignored): encryption.type=ipsec." in notes  # hostFirewall, policyAuditMode: built
    quiet = helm("install", "propolis", str(CHART), "--dry-run=client", "--set", "l7Proxy=false").stdout
    assert "Requested but not" not in quiet and "not built yet" not in quiet
    transparent = helm("install", "propolis", str(CHART), "--dry-run=client",
                       "--set", "dnsProxy.enableTransparentMode=true").stdout
    assert "not built yet (ignored): dnsProxy.enableTransparentMode=true." in transparent


def test_host_network_pods_schedule_on_nodes_without_a_pod_network() -> None:
    """Until the datapath-writer serves the CNI plugin every node is NotReady (node.kubernetes.io/not-ready
    taint) and no pod (cluster DNS included) has a network: what it waits for must tolerate the taint and
    resolve names with the node's resolver, or nothing ever starts."""
    host_network = {doc["metadata"]["name"]: pod for doc in render(*ALL_FEATURES)
                    if (pod := doc.get("spec", {}).get("template", {}).get("spec", {})).get("hostNetwork")}
    assert host_network, "the datapath-writer and the other node agents run in the host network"
    for name, pod in host_network.items():
        tolerations = pod.get("tolerations", [])
        assert any(t.get("operator") == "Exists" and "key" not in t for t in tolerations) or any(
            t.get("key") == "node.kubernetes.io/not-ready" for t in tolerations), name
        if name != "propolis-nats":  # its routes use cluster DNS (docs/architecture.md)
            assert pod["dnsPolicy"] == "Default", name
