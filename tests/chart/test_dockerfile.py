"""The image: no container engine here, so the Dockerfile is linted and its inputs checked."""

from __future__ import annotations

import fnmatch
import re
import subprocess
import tomllib

from chart_render import ALL_FEATURES, CHART, ROOT, render, tool, workloads

DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines = [line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^\s*(\w+)\s+(.*)$", text, re.M)]


def copied_from_context() -> list[str]:
    sources = []
    for op, args in instructions():
        if op in ("COPY", "ADD") and "--from=" not in args:
            parts = [p for p in args.split() if not p.startswith("--")]
            sources += parts[:-1]
    return sources


def dockerignored(path: str) -> bool:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    first = path.rstrip("/").split("/")[0]
    return any(fnmatch.fnmatch(path.rstrip("/"), p) or fnmatch.fnmatch(first, p) for p in patterns)


def test_hadolint_passes() -> None:
    proc = subprocess.run([tool("hadolint"), str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_copied_path_exists_and_is_in_the_build_context() -> None:
    sources = copied_from_context()
    assert {"libs/", "services/", "bpf/", "pyproject.toml"} <= set(sources)
    for source in sources:
        assert (ROOT / source).exists(), f"Dockerfile copies {source}, which does not exist"
        assert not dockerignored(source), f"Dockerfile copies {source}, which .dockerignore leaves out"


def test_the_image_has_every_command_the_chart_runs() -> None:
    scripts = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])
    docs = render(*ALL_FEATURES)
    for name, workload in workloads(docs).items():
        command = workload["spec"]["template"]["spec"]["containers"][0]["command"][0]
        assert command in scripts, f"{name} runs {command}, not a console script of pyproject.toml"
    job = next(d for d in docs if d["kind"] == "Job")
    assert job["spec"]["template"]["spec"]["containers"][0]["command"][0] in scripts
    # install-cni copies the binary the Dockerfile's cni stage builds
    install_cni = (CHART / "files" / "install-cni.py").read_text()
    plugin = re.search(r'PLUGIN_SOURCE = "([^"]+)"', install_cni)
    assert plugin and f"/out/propolis-cni {plugin.group(1)}" in " ".join(a for _, a in instructions())
    assert "libs/propolis/cni/plugin.py" in copied_from_context()


def test_unprivileged_services_run_as_the_images_user() -> None:
    (user,) = [args for op, args in instructions() if op == "USER"]
    uid = int(user.split(":")[0])
    pod_network = {name: w["spec"]["template"]["spec"] for name, w in workloads(render(*ALL_FEATURES)).items()
                   if not w["spec"]["template"]["spec"].get("hostNetwork")}
    assert pod_network, "some services run unprivileged in the pod network"
    assert {name: pod["securityContext"]["runAsUser"] for name, pod in pod_network.items()} == \
        dict.fromkeys(pod_network, uid)
