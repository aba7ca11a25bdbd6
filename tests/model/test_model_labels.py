"""Labels, label sets, identity ranges and pod security labels (Cilium's derivation)."""

import pytest

from propolis.errors import ValidationError
from propolis.model import identity as idm
from propolis.model.labels import Label, LabelSet, parse_label, parse_select_label


@pytest.mark.parametrize("text, expected", [
    ("k8s:app=web", Label("k8s", "app", "web")),
    ("app=web", Label("unspec", "app", "web")),
    ("reserved:host", Label("reserved", "host", "")),
    ("$host", Label("reserved", "host", "")),
    ("k8s:io.kubernetes.pod.namespace=prod", Label("k8s", "io.kubernetes.pod.namespace", "prod")),
    ("k8s:app.kubernetes.io/name=x", Label("k8s", "app.kubernetes.io/name", "x")),
    ("cidr:10.0.0.0/8", Label("cidr", "10.0.0.0/8", "")),
    ("cidr:fd00::/8", Label("cidr", "fd00::/8", "")),
    ("k8s:a=b=c", Label("k8s", "a", "b=c")),
    ("key=va:lue", Label("unspec", "key", "va:lue")),
    ("example.com/x:y=1", Label("unspec", "example.com/x:y", "1")),
])
def test_parse_label(text, expected):
    assert parse_label(text) == expected


@pytest.mark.parametrize("label, text", [
    (Label("k8s", "app", "web"), "k8s:app=web"),
    (Label("reserved", "world"), "reserved:world"),
])
def test_label_str_round_trips(label, text):
    assert str(label) == text
    assert parse_label(text) == label


def test_select_label_defaults_to_any():
    assert parse_select_label("app=web") == Label("any", "app", "web")
    assert parse_select_label("k8s:app=web").source == "k8s"


@pytest.mark.parametrize("bad", ["", "k8s:", "=x"])
def test_parse_label_refuses(bad):
    with pytest.raises(ValidationError):
        parse_label(bad)


def test_labelset_is_canonical_and_hashable():
    a = LabelSet(["k8s:b=2", "k8s:a=1", "reserved:host"])
    b = LabelSet.from_strings(["reserved:host", "k8s:a=1", "k8s:b=2"])
    assert a == b and hash(a) == hash(b)
    assert str(a) == "k8s:a=1;k8s:b=2;reserved:host"
    assert a.strings() == ["k8s:a=1", "k8s:b=2", "reserved:host"]
    assert "k8s:a=1" in a and "k8s:a=2" not in a
    assert len({a, b}) == 1
    assert LabelSet(["k8s:a=1"]) != LabelSet(["any:a=1"])


def test_labelset_one_label_per_source_and_key():
    ls = LabelSet(["k8s:a=1", "k8s:a=2"])
    assert ls.strings() == ["k8s:a=2"]


def test_labelset_get_any_source():
    ls = LabelSet(["k8s:app=x", "container:app=y"])
    assert {lbl.value for lbl in ls.get("any", "app")} == {"x", "y"}
    assert [lbl.value for lbl in ls.get("k8s", "app")] == ["x"]


@pytest.mark.parametrize("number, labels", [
    (1, ["reserved:host"]), (2, ["reserved:world"]), (3, ["reserved:unmanaged"]), (4, ["reserved:health"]),
    (5, ["reserved:init"]), (6, ["reserved:remote-node"]), (7, ["reserved:kube-apiserver", "reserved:remote-node"]),
    (8, ["reserved:ingress"]), (9, ["reserved:world-ipv4"]), (10, ["reserved:world-ipv6"]),
])
def test_reserved_identities(number, labels):
    assert idm.reserved_identity_labels()[number] == sorted(labels)
    assert idm.is_reserved(number)


def test_identity_ranges():
    assert idm.cluster_identity(256) == 256
    assert idm.cluster_identity(300, cluster_id=3) == (3 << 16) | 300
    assert idm.cluster_id_of(idm.cluster_identity(300, cluster_id=3)) == 3
    assert idm.MIN_LOCAL_IDENTITY == (1 << 24) + 1
    assert idm.is_local(idm.MIN_LOCAL_IDENTITY) and not idm.is_local(65535)
    assert idm.is_cluster_identity(256) and idm.is_cluster_identity((5 << 16) | 256)
    assert not idm.is_cluster_identity(5) and not idm.is_cluster_identity(idm.MIN_LOCAL_IDENTITY)
    for bad in (255, 65536):
        with pytest.raises(ValueError):
            idm.cluster_identity(bad)
    with pytest.raises(ValueError):
        idm.cluster_identity(300, cluster_id=256)


def test_pod_security_labels_like_cilium():
    labels = idm.pod_security_labels(
        pod_labels={"app": "web", "pod-template-hash": "abc123", "controller-revision-hash": "r1",
                    "pod-template-generation": "2", "statefulset.kubernetes.io/pod-name": "web-0",
                    "batch.kubernetes.io/job-name": "j", "batch.kubernetes.io/controller-uid": "u",
                    "controller-uid": "u", "job-name": "j", "apps.kubernetes.io/pod-index": "0",
                    "io.kubernetes.container.name": "c", "topology.k8s.io/zone": "z",
                    "app.kubernetes.io/name": "web", "team": "a"},
        namespace="prod", namespace_labels={"env": "production"}, service_account="web-sa", cluster="c1")
    assert labels.strings() == sorted([
        "k8s:app=web", "k8s:team=a", "k8s:app.kubernetes.io/name=web",
        "k8s:io.kubernetes.pod.namespace=prod",
        "k8s:io.cilium.k8s.namespace.labels.env=production",
        "k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name=prod",
        "k8s:io.cilium.k8s.policy.serviceaccount=web-sa",
        "k8s:io.cilium.k8s.policy.cluster=c1",
    ])


def test_pod_security_labels_same_set_same_key():
    a = idm.pod_security_labels(pod_labels={"app": "x", "pod-template-hash": "1"}, namespace="n")
    b = idm.pod_security_labels(pod_labels={"pod-template-hash": "2", "app": "x"}, namespace="n")
    assert a.key == b.key
    c = idm.pod_security_labels(pod_labels={"app": "x"}, namespace="other")
    assert a.key != c.key


def test_namespace_label_kept_when_set():
    ls = idm.pod_security_labels(pod_labels={}, namespace="n",
                                 namespace_labels={"kubernetes.io/metadata.name": "n"}, service_account=None)
    assert ls.strings() == ["k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name=n",
                            "k8s:io.kubernetes.pod.namespace=n"]
    assert idm.namespace_of(ls) == "n"


def test_identity_labels_reserved_override():
    assert idm.identity_labels(1, ["whatever"]).strings() == ["reserved:host"]
    assert idm.identity_labels(300, ["k8s:a=b"]).strings() == ["k8s:a=b"]


# --- Kubernetes metadata.labels (the rules the sandbox API and the k8s-watcher share) ----------------
def test_a_long_label_value_names_the_limit_without_echoing_it():
    from propolis.model.labels import kubernetes_label_errors
    errors = kubernetes_label_errors({"app": "a" * 10_000})
    assert [e.field for e in errors] == ["metadata.labels"]
    assert "must be no more than 63 characters" in errors[0].reason
    assert "(10000 characters)" in errors[0].reason and len(errors[0].reason) < 200


@pytest.mark.parametrize("labels, problem", [
    ({"app": "a" * 63}, None),
    ({"app": ""}, None),
    ({"example.com/app": "x"}, None),
    ({"app": "has space"}, "a valid label must be an empty string"),
    ({"app": "-x"}, "a valid label must be an empty string"),
    ({"a" * 64: "x"}, "name part must be no more than 63 characters"),
    ({"/app": "x"}, "prefix part must be non-empty"),
    ({"Bad_Prefix/app": "x"}, "prefix part a lowercase RFC 1123 subdomain"),
    ({"app": 3}, "must be a map of strings"),
])
def test_kubernetes_label_rules(labels, problem):
    from propolis.model.labels import kubernetes_label_errors
    errors = kubernetes_label_errors(labels)
    if problem is None:
        assert errors == []
    else:
        assert errors and problem in errors[0].reason
