"""Pod bandwidth annotations: Kubernetes quantities, the kubelet's bounds, errors naming the annotation."""

from __future__ import annotations

import pytest

from propolis.bandwidth.annotations import (
    EGRESS_BANDWIDTH,
    INGRESS_BANDWIDTH,
    BandwidthLimits,
    parse_quantity,
    pod_limits,
)
from propolis.bandwidth.shaper import select_mode
from propolis.bus.messages import K8sObject
from propolis.errors import ValidationError
from propolis.k8s.kinds import KINDS
from propolis.kernel_probe import KernelFeature
from propolis.writer.bandwidth import PodBandwidth, desired_bandwidth
from propolis.writer.endpoints import LocalEndpoint


@pytest.mark.parametrize("value, bits", [
    ("10M", 10_000_000), ("100M", 100_000_000), ("1G", 10**9), ("1.5M", 1_500_000), ("512Ki", 512 * 1024),
    ("1Mi", 2**20), ("1000000", 10**6), ("10e6", 10**7), ("2E3", 2_000), ("1k", 1_000), ("1P", 10**15),
    (" 10M ", 10**7), ("+5M", 5 * 10**6), ("1500000000m", 1_500_000)])
def test_quantities(value, bits):
    assert parse_quantity(value, annotation=EGRESS_BANDWIDTH) == bits


@pytest.mark.parametrize("value, words", [
    ("10Mbit", "not a Kubernetes quantity"), ("ten", "not a Kubernetes quantity"), ("", "not a Kubernetes quantity"),
    ("-10M", "not a Kubernetes quantity"), ("10 M", "not a Kubernetes quantity"), ("10m", "unreasonably small"),
    ("999", "unreasonably small"), ("2P", "unreasonably large")])
def test_bad_quantities_name_the_annotation(value, words):
    with pytest.raises(ValidationError) as err:
        parse_quantity(value, annotation=INGRESS_BANDWIDTH)
    assert err.value.field == INGRESS_BANDWIDTH and words in str(err.value) and repr(value) in str(err.value)


def test_pod_limits_per_direction():
    assert pod_limits({EGRESS_BANDWIDTH: "10M"}) == BandwidthLimits(egress=10**7)
    assert pod_limits({INGRESS_BANDWIDTH: "100M", EGRESS_BANDWIDTH: "1G"}) == BandwidthLimits(egress=10**9,
                                                                                             ingress=10**8)
    assert not pod_limits({"other": "10M"})


def pod(name: str, annotations: dict[str, str]) -> dict:
    return {"metadata": {"name": name, "namespace": "ns", "annotations": annotations}, "spec": {"nodeName": "n1"}}


def test_the_watcher_mirrors_the_bandwidth_annotations_and_not_others():
    record = KINDS["pods"].to_record(pod("p", {EGRESS_BANDWIDTH: "10M", INGRESS_BANDWIDTH: "1G", "team": "x"}))
    assert record.fields["annotations"] == {EGRESS_BANDWIDTH: "10M", INGRESS_BANDWIDTH: "1G"}


def endpoint(pod_name: str, n: int) -> LocalEndpoint:
    return LocalEndpoint(endpoint_id=n, container_id=f"c{n}", namespace="ns", pod=pod_name, ip=f"10.244.1.{n}",
                         ifindex=10 + n, host_ifname=f"lxc{n:011x}", netns=f"/var/run/netns/p{n}")


def test_desired_shapers_only_for_annotated_pods_and_a_bad_value_is_an_error_naming_pod_and_annotation():
    pods = {("ns", name): KINDS["pods"].to_record(pod(name, ann)) for name, ann in (
        ("limited", {EGRESS_BANDWIDTH: "10M"}), ("plain", {}), ("typo", {INGRESS_BANDWIDTH: "10Q"}))}
    eps = [endpoint("limited", 1), endpoint("plain", 2), endpoint("typo", 3), endpoint("not-mirrored-yet", 4)]
    desired = desired_bandwidth(pods, eps)
    assert desired == {
        eps[0].host_ifname: PodBandwidth("ns/limited", eps[0].netns, "eth0", BandwidthLimits(egress=10**7)),
        eps[2].host_ifname: PodBandwidth("ns/typo", eps[2].netns, "eth0", error=(
            f"pod ns/typo: {INGRESS_BANDWIDTH}: '10Q' is not a Kubernetes quantity (e.g. 10M, 100M, 1G)"))}


def test_k8s_object_without_annotations_is_unlimited():
    bare = K8sObject(kind="Pod", namespace="ns", name="plain", uid="u", resource_version="1")
    assert desired_bandwidth({("ns", "plain"): bare}, [endpoint("plain", 1)]) == {}


def test_the_mode_says_tbf_and_why():
    no_fq = select_mode([KernelFeature("sch_fq", False, "sch_fq missing (Error: Specified qdisc kind is unknown.)")])
    assert no_fq.name == "tbf" and "no EDT: sch_fq missing" in no_fq.detail
    with_fq = select_mode([KernelFeature("sch_fq", True, "fq qdisc available")])
    assert with_fq.name == "tbf" and "EDT with fq not built yet" in with_fq.detail
