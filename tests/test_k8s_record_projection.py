"""The k8s bucket holds projections, not Kubernetes objects: `Kind.to_record` keeps the fields some consumer
reads and drops the rest, so each delivery to every node is a fraction of the API object (issue 21)."""

import orjson

from propolis.bus import codec
from propolis.k8s.kinds import KINDS

#: A Deployment's pod as the API serves it (fields a real kubelet and controller-manager fill in).
API_POD = {
    "apiVersion": "v1", "kind": "Pod",
    "metadata": {
        "name": "frontend-7d9c8b6f5-x2k4q", "namespace": "production", "uid": "6f1c1c2e-3b0a-4a57-9a65-1d2f3e4b5c6d",
        "resourceVersion": "123456", "creationTimestamp": "2026-12-01T10:00:00Z",
        "labels": {"app": "frontend", "pod-template-hash": "7d9c8b6f5", "tier": "web"},
        "annotations": {"kubectl.kubernetes.io/restartedAt": "2026-12-01T10:00:00Z",
                        "kubernetes.io/egress-bandwidth": "10M"},
        "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "frontend-7d9c8b6f5",
                             "uid": "a1b2c3d4-0000-1111-2222-333344445555", "controller": True}],
        "managedFields": [{"manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1",
                           "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {"f:labels": {"f:app": {}}}}}]},
    "spec": {
        "nodeName": "worker-17", "serviceAccountName": "frontend",
        "containers": [{"name": "web", "image": "registry.example.com/frontend:2.4.1",
                        "ports": [{"containerPort": 8080, "protocol": "TCP", "name": "http"}],
                        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}},
                        "env": [{"name": "LOG_LEVEL", "value": "info"}],
                        "volumeMounts": [{"name": "kube-api-access", "mountPath": "/var/run/secrets/sa"}]}],
        "volumes": [{"name": "kube-api-access", "projected": {"sources": [{"serviceAccountToken": {"path": "token"}}]}}],
        "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute"}]},
    "status": {
        "phase": "Running", "hostIP": "172.30.1.17", "podIP": "10.244.17.23", "podIPs": [{"ip": "10.244.17.23"}],
        "conditions": [{"type": "Ready", "status": "True"}, {"type": "PodScheduled", "status": "True"}],
        "containerStatuses": [{"name": "web", "ready": True, "restartCount": 0, "image": "registry.example.com/x",
                               "imageID": "registry.example.com/x@sha256:" + "a" * 64,
                               "containerID": "containerd://" + "b" * 64,
                               "state": {"running": {"startedAt": "2026-12-01T10:00:04Z"}}}]},
}


def test_a_pod_record_keeps_what_consumers_read():
    rec = KINDS["pods"].to_record(API_POD)
    assert (rec.namespace, rec.name, rec.labels["app"]) == ("production", "frontend-7d9c8b6f5-x2k4q", "frontend")
    assert rec.fields["nodeName"] == "worker-17"  # the key's node and hostPort's owner
    assert rec.fields["containers"][0]["ports"][0]["containerPort"] == 8080
    assert rec.fields["annotations"] == {"kubernetes.io/egress-bandwidth": "10M"}  # bandwidth manager
    assert rec.status["podIPs"] == ["10.244.17.23"] and rec.status["ready"] is True


def test_a_pod_record_is_a_fraction_of_the_api_object():
    rec = KINDS["pods"].to_record(API_POD)
    encoded = codec.encode(rec)
    for dropped in (b"managedFields", b"containerStatuses", b"sha256", b"registry.example.com", b"LOG_LEVEL",
                    b"restartedAt"):
        assert dropped not in encoded
    assert len(encoded) * 4 < len(orjson.dumps(API_POD)), (len(encoded), len(orjson.dumps(API_POD)))
