"""Cluster Mesh in the chart: `clustermesh.config.clusters` (Cilium's values shape) becomes the remote cluster
configs the clustermesh-apiserver reads, through a Secret mounted at its `--clustermesh-config`."""

from __future__ import annotations

import base64
import importlib

import kubernetes_validate
import pytest
from chart_render import CHART, helm, render, workloads

from propolis.bus import subjects
from propolis.clustermesh.remotes import RemoteCluster, load_remotes

MESH = ["clustermesh.useAPIServer=true", "clustermesh.config.enabled=true", "cluster.name=c1", "cluster.id=1"]
REMOTES = ["clustermesh.config.clusters[0].name=c2", "clustermesh.config.clusters[0].id=2",
           "clustermesh.config.clusters[0].address=nats.c2.example.com",
           "clustermesh.config.clusters[0].password=secret-2",
           "clustermesh.config.clusters[1].name=c3", "clustermesh.config.clusters[1].id=3",
           "clustermesh.config.clusters[1].address=tls://10.3.0.10:7422",
           "clustermesh.config.clusters[1].user=mesh-reader", "clustermesh.config.clusters[1].password=secret-3"]


def test_remote_clusters_reach_the_clustermesh_apiserver_as_the_configs_it_loads(tmp_path) -> None:
    docs = render(*MESH, *REMOTES)
    secret = next(d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == "propolis-clustermesh")
    kubernetes_validate.validate(secret, "1.33.0", strict=True)
    for key, value in secret["data"].items():
        (tmp_path / key).write_bytes(base64.b64decode(value))
    assert load_remotes(tmp_path) == {
        "c2": RemoteCluster("c2", 2, "nats://nats.c2.example.com:4222", subjects.CLUSTERMESH_REMOTE_USER, "secret-2"),
        "c3": RemoteCluster("c3", 3, "tls://10.3.0.10:7422", "mesh-reader", "secret-3")}

    pod = workloads(docs)["clustermesh-apiserver"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "clustermesh-config")
    volume = next(v for v in pod["volumes"] if v["name"] == "clustermesh-config")
    assert volume["secret"]["secretName"] == "propolis-clustermesh" and mount["readOnly"]
    settings_cls = importlib.import_module("propolis_services.clustermesh_apiserver.main").Settings
    flag = next(a for a in container["args"] if a.startswith("--clustermesh-config="))
    configured = settings_cls(nats_url="nats://x:4222", cluster_name="c1", cluster_id=1,
                              clustermesh_config=flag.split("=", 1)[1])
    assert str(configured.remotes_dir()) == mount["mountPath"]


def test_without_remote_clusters_the_secret_is_not_required() -> None:
    docs = render("clustermesh.useAPIServer=true", "cluster.name=c1", "cluster.id=1")
    assert not [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == "propolis-clustermesh"]
    pod = workloads(docs)["clustermesh-apiserver"]["spec"]["template"]["spec"]
    assert next(v for v in pod["volumes"] if v["name"] == "clustermesh-config")["secret"]["optional"] is True


@pytest.mark.parametrize("sets,message", [
    (["clustermesh.config.clusters[0].name=c1", "clustermesh.config.clusters[0].id=2"],
     '"c1" is already the name or id of this cluster'),
    (["clustermesh.config.clusters[0].name=c2", "clustermesh.config.clusters[0].id=1"],
     '"1" is already the name or id of this cluster'),
    (["clustermesh.config.clusters[0].name=c2", "clustermesh.config.clusters[0].id=2",
      "clustermesh.config.clusters[1].name=c3", "clustermesh.config.clusters[1].id=2",
      "clustermesh.config.clusters[1].address=n3", "clustermesh.config.clusters[1].password=p"],
     '"2" is already the name or id of cluster c2'),
    (["clustermesh.config.clusters[0].name=c2", "clustermesh.config.clusters[0].id=256"],
     "/clustermesh/config/clusters/0/id"),
    (["clustermesh.config.clusters[0].name=c2", "clustermesh.config.clusters[0].id=2",
      "clustermesh.config.clusters[0].tls.caCert=x"], "additional properties 'tls' not allowed"),
])
def test_a_clash_or_a_field_without_meaning_here_is_refused(sets: list[str], message: str) -> None:
    complete = ["clustermesh.config.clusters[0].address=n2", "clustermesh.config.clusters[0].password=p"]
    args = ["template", "propolis", str(CHART)]
    for s in [*MESH, *complete, *sets]:
        args += ["--set", s]
    proc = helm(*args, check=False)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr
