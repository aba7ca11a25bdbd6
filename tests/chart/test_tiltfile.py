"""tilt/Tiltfile, executed by a Starlark interpreter against recording stand-ins for Tilt's built-ins
(tilt and kind cannot run here). `helm(...)` is the real helm rendering the real chart."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from functools import lru_cache
from typing import Any

import starlark
import yaml
from chart_render import ROOT, StrictLoader, tool

TILT = ROOT / "tilt"


class FakeTilt:
    """Tilt's built-ins the Tiltfile uses; each call is recorded (paths resolve from tilt/ as Tilt does)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        self.rendered: list[dict[str, Any]] = []

    def record(self, name: str) -> Any:
        def builtin(*args: Any, **kwargs: Any) -> Any:
            self.calls.append((name, args, kwargs))
            return {"builtin": name, "args": list(args), **kwargs}
        return builtin

    def helm(self, path: str, name: str = "chart", namespace: str = "default", values: Any = ()) -> str:
        self.calls.append(("helm", (path,), {"name": name, "namespace": namespace, "values": list(values)}))
        args = [tool("helm"), "template", name, str((TILT / path).resolve()), "--namespace", namespace]
        for v in values:
            args += ["--values", str((TILT / v).resolve())]
        proc = subprocess.run(args, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"the chart does not render with the Tiltfile's values:\n{proc.stderr}"
        self.rendered = [d for d in yaml.load_all(proc.stdout, Loader=StrictLoader) if d]
        return proc.stdout

    def decode_yaml_stream(self, text: str) -> list[Any]:
        return [d for d in yaml.safe_load_all(text) if d]

    def named(self, builtin: str) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
        return [(a, k) for n, a, k in self.calls if n == builtin]


@lru_cache(maxsize=1)
def run_tiltfile() -> FakeTilt:
    tilt = FakeTilt()
    module = starlark.Module()
    for name in ("allow_k8s_contexts", "docker_build", "sync", "run", "fall_back_on", "k8s_yaml", "k8s_resource"):
        module.add_callable(name, tilt.record(name))
    module.add_callable("helm", tilt.helm)
    module.add_callable("decode_yaml_stream", tilt.decode_yaml_stream)
    dialect = starlark.Dialect.extended()
    dialect.enable_top_level_stmt = True  # as Tilt's Starlark allows
    ast = starlark.parse("Tiltfile", (TILT / "Tiltfile").read_text(), dialect=dialect)
    starlark.eval(module, ast, starlark.Globals.standard())
    return tilt


def images(objects: list[dict[str, Any]]) -> set[str]:
    found = set()
    for obj in objects:
        spec = obj.get("spec", {})
        pod = spec.get("template", {}).get("spec", {}) if "template" in spec else {}
        for c in pod.get("containers", []) + pod.get("initContainers", []):
            found.add(c["image"])
    return found


def test_tiltfile_renders_the_chart_with_development_values_on_kind() -> None:
    tilt = run_tiltfile()
    ((contexts,), _), = tilt.named("allow_k8s_contexts")
    kind = yaml.safe_load((TILT / "kind.yaml").read_text())
    assert contexts == f"kind-{kind['name']}"
    assert kind["networking"]["disableDefaultCNI"] is True and kind["networking"]["kubeProxyMode"] == "none"
    assert [n["role"] for n in kind["nodes"]].count("worker") == 2
    (_, helm_kwargs), = tilt.named("helm")
    assert helm_kwargs["values"] == ["values-kind.yaml", "values-dev.yaml"]
    dev = yaml.safe_load((TILT / "values-kind.yaml").read_text()) | yaml.safe_load((TILT / "values-dev.yaml").read_text())
    assert dev["dev"]["liveUpdate"] is True and dev["nats"]["replicas"] == 1
    # on kind without kube-proxy, services reach NATS by the control-plane node's name, where it runs
    control_plane = f"{kind['name']}-control-plane"
    sts = next(o for o in tilt.rendered if o["kind"] == "StatefulSet")
    assert sts["spec"]["template"]["spec"]["nodeSelector"] == {"kubernetes.io/hostname": control_plane}
    for obj in tilt.rendered:
        for c in obj.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            for e in c.get("env", []):
                if e["name"] == "PROPOLIS_NATS_URL":
                    assert e["value"] == f"nats://{control_plane}:4222", obj["metadata"]["name"]
    assert dev["k8sServiceHost"] == control_plane
    (yaml_args, _), = tilt.named("k8s_yaml")
    assert isinstance(yaml_args[0], str) and "kind: StatefulSet" in yaml_args[0]


def test_every_image_of_the_chart_is_built_and_live_updated() -> None:
    tilt = run_tiltfile()
    built = {args[0]: kwargs for args, kwargs in tilt.named("docker_build")}
    dev = yaml.safe_load((TILT / "values-dev.yaml").read_text())
    nats_image = "nats:" + yaml.safe_load((ROOT / "helm/propolis/values.yaml").read_text())["nats"]["image"]["tag"]
    for image in images(tilt.rendered) - {nats_image}:  # NATS is upstream's image, pulled
        repository = image.rsplit(":", 1)[0]
        assert repository == dev["image"]["repository"] and repository in built, image
        steps = built[repository]["live_update"]
        by_kind = {s["builtin"]: s for s in steps}
        syncs = {tuple(s["args"]) for s in steps if s["builtin"] == "sync"}
        src = "/opt/propolis/src"
        assert ("../libs", f"{src}/libs") in syncs and ("../services", f"{src}/services") in syncs
        assert "/tmp/.restart-proc" in by_kind["run"]["args"][0]
        # the chart's wrapper watches that file, and every service runs under it in development
        wrapper = (ROOT / "helm/propolis/files/restart-on-sync.sh").read_text()
        assert "TRIGGER=${RESTART_TRIGGER:-/tmp/.restart-proc}" in wrapper
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "WORKDIR /opt/propolis/src" in dockerfile and "--editable /opt/propolis/src" in dockerfile
    for obj in tilt.rendered:
        if obj["kind"] in ("Deployment", "DaemonSet"):
            command = obj["spec"]["template"]["spec"]["containers"][0]["command"]
            assert command[:2] == ["sh", "/etc/propolis/dev/restart-on-sync.sh"], obj["metadata"]["name"]


def test_nats_comes_first_then_the_bootstrap_then_every_service() -> None:
    tilt = run_tiltfile()
    resources = {args[0]: kwargs for args, kwargs in tilt.named("k8s_resource")}
    nats = next(o["metadata"]["name"] for o in tilt.rendered if o["kind"] == "StatefulSet")
    job = next(o["metadata"]["name"] for o in tilt.rendered if o["kind"] == "Job")
    assert nats in resources and "resource_deps" not in resources[nats]
    assert resources[job]["resource_deps"] == [nats]
    workloads = [o["metadata"]["name"] for o in tilt.rendered if o["kind"] in ("Deployment", "DaemonSet")]
    assert len(workloads) >= 5
    for name in workloads:
        assert resources[name]["resource_deps"] == [nats, job], name


def test_the_restart_wrapper_restarts_the_service_when_live_update_touches_the_trigger(tmp_path) -> None:
    """files/restart-on-sync.sh for real: a touch restarts the child in place; a child that exits ends it."""
    trigger, starts = tmp_path / "restart-proc", tmp_path / "starts"
    child = f"trap 'echo stopped >> {starts}; exit 0' TERM; echo started >> {starts}; while :; do sleep 0.1; done"
    env = {"RESTART_TRIGGER": str(trigger), "PATH": "/usr/bin:/bin"}
    wrapper = subprocess.Popen(["sh", str(ROOT / "helm/propolis/files/restart-on-sync.sh"), "sh", "-c", child],
                               env=env, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        def wait_starts(n: int) -> None:
            deadline = time.monotonic() + 10
            while not (starts.exists() and starts.read_text().count("started") >= n):
                assert time.monotonic() < deadline and wrapper.poll() is None, f"{n} starts expected"
                time.sleep(0.05)
        wait_starts(1)
        trigger.write_text("1")  # what the Tiltfile's run() step does after syncing
        wait_starts(2)
        trigger.write_text("2")
        wait_starts(3)
        assert wrapper.poll() is None
        wrapper.terminate()  # the kubelet stopping the container: the service gets TERM and stops
        assert wrapper.wait(timeout=10) == 0
        assert starts.read_text().count("stopped") == 3  # two restarts and the stop, each a TERM
    finally:
        if wrapper.poll() is None:
            os.killpg(wrapper.pid, signal.SIGKILL)
            wrapper.wait(timeout=10)
    stopped = subprocess.run(["sh", str(ROOT / "helm/propolis/files/restart-on-sync.sh"), "sh", "-c", "exit 3"],
                             env=env, timeout=10)
    assert stopped.returncode == 3  # the kubelet sees the service's own exit
