"""`propolis.k8s.kubeclient` loads kubernetes-asyncio without its generated APIs and models (~33 MB),
and the rest of the package still works in the same process when someone asks for it."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys
import propolis_services.k8s_watcher.main  # the watcher's imports, as its process runs them
light = sorted(m for m in sys.modules if m.startswith("kubernetes_asyncio"))
assert not any(".models." in m or ".api." in m for m in light), light
from kubernetes_asyncio.client import CoreV1Api, V1Pod  # deferred packages load on demand
from kubernetes_asyncio import watch
from propolis.k8s import kubeclient
import kubernetes_asyncio.client as client
assert client.ApiClient is kubeclient.ApiClient and CoreV1Api and V1Pod and watch.Watch
print(len(light))
"""


def test_watcher_imports_no_generated_models_and_the_rest_still_loads():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) < 40
