"""The part of kubernetes-asyncio the k8s-watcher uses, imported without the generated API and models.

Why: ``import kubernetes_asyncio.client`` runs a package ``__init__`` that imports
every generated API class and ~900 model classes (~37 MB of RSS). The watcher
needs none of them: the reflector calls ``ApiClient.call_api`` and reads raw JSON,
and the kubeconfig loader needs only ``ApiClient``/``Configuration``.

How: before anything else imports kubernetes-asyncio, the packages
``kubernetes_asyncio``, ``kubernetes_asyncio.client`` and
``kubernetes_asyncio.client.models`` are put in ``sys.modules`` *unexecuted* (their
real spec and ``__path__``, so submodules import normally); the few submodules we
need are imported directly. A deferred package runs its real ``__init__`` the first
time someone asks it for a name it does not have yet (``from kubernetes_asyncio.client
import CoreV1Api``, ``client.models.V1Pod``), so other code in the same process
keeps working, it just pays the full import then. If kubernetes-asyncio was
already imported, nothing is deferred.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType
from typing import Any


def _deferred_package(name: str) -> ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.loader is not None, name
    module = importlib.util.module_from_spec(spec)
    loader = spec.loader
    executed = False

    def __getattr__(attr: str) -> Any:
        nonlocal executed
        if executed or attr.startswith("__"):
            raise AttributeError(f"module {name!r} has no attribute {attr!r}")
        executed = True
        loader.exec_module(module)  # the real __init__, once
        return getattr(module, attr)

    vars(module)["__getattr__"] = __getattr__  # PEP 562: the module's attribute fallback
    sys.modules[name] = module
    return module


def _load() -> None:
    package = _deferred_package("kubernetes_asyncio")
    client = _deferred_package("kubernetes_asyncio.client")
    # submodules bound on their packages by hand, as the import system would
    vars(package)["client"] = client
    vars(client)["models"] = _deferred_package("kubernetes_asyncio.client.models")
    # submodules bound on the package before api_client does `from kubernetes_asyncio.client import rest`
    importlib.import_module("kubernetes_asyncio.client.exceptions")
    importlib.import_module("kubernetes_asyncio.client.rest")
    configuration = importlib.import_module("kubernetes_asyncio.client.configuration")
    api_client = importlib.import_module("kubernetes_asyncio.client.api_client")
    if "ApiClient" not in vars(client):  # what kube_config imports from the package (no __getattr__)
        vars(client).update(ApiClient=api_client.ApiClient, Configuration=configuration.Configuration)


_load()

from kubernetes_asyncio.client.api_client import ApiClient  # noqa: E402
from kubernetes_asyncio.client.configuration import Configuration  # noqa: E402
from kubernetes_asyncio.client.exceptions import ApiException  # noqa: E402
from kubernetes_asyncio.config.config_exception import ConfigException  # noqa: E402
from kubernetes_asyncio.config.incluster_config import load_incluster_config  # noqa: E402
from kubernetes_asyncio.config.kube_config import load_kube_config  # noqa: E402

__all__ = ["ApiClient", "ApiException", "ConfigException", "Configuration", "load_incluster_config",
           "load_kube_config"]
