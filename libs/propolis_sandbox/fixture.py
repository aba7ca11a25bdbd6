"""A sandbox for tests: unique name, `up` on enter, `down` on exit (even on failure), leftovers asserted.

Why here: every integration test of the suite stands on a sandbox, and each
must be able to run beside other tests on the same machine. Use

    with running_sandbox(nodes=2, services="none") as state:
        ...  # state.kubeconfig, state.nats_url, state.apiserver_url

or wrap it in a pytest fixture of the scope you need.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from propolis_sandbox import cgroups, cluster, netns
from propolis_sandbox.config import BPF_ROOT, RUN_ROOT, SANDBOX_ENV, SandboxState

#: Set to "wireguard" to run the full-suite test sandboxes with transparent encryption ("wireguard-strict": and
#: encryption.strictMode, so any pod traffic that would leave a node unencrypted is dropped and fails its test).
TEST_ENCRYPTION_ENV = "PROPOLIS_TEST_ENCRYPTION"
STRICT_SUFFIX = "-strict"
#: A directory: every test sandbox's logs are copied into <dir>/<sandbox name>/ before it is torn down (to read
#: the services' side of a failure after the run dir is gone).
KEEP_LOGS_ENV = "PROPOLIS_TEST_KEEP_LOGS"


def unique_name(prefix: str = "t") -> str:
    return prefix + uuid.uuid4().hex[:7]


def leftovers(name: str) -> dict[str, list[str]]:
    """What of sandbox `name` still exists: namespaces, pins, run dir, processes, cgroups (empty lists = clean)."""
    return {
        "namespaces": cluster.owned_netns(name),
        "pins": [str(p) for p in cluster.owned_pin_dirs(name)],
        "run_dir": [str(RUN_ROOT / name)] if (RUN_ROOT / name).exists() else [],
        "processes": [str(p) for p in netns.pids_with_env(SANDBOX_ENV, name)],
        "cgroups": [str(cgroups.sandbox_cgroup(name))] if cgroups.sandbox_cgroup_exists(name) else [],
    }


@contextmanager
def running_sandbox(*, nodes: int = 2, services: str = "none", name: str | None = None,
                    cluster_cidr: str | None = None, encryption: str | None = None,
                    cluster_id: int = 0, encryption_strict_mode: bool = False,
                    encryption_node_encryption: bool = False, nats_replicas: int = 1,
                    nats_relays: int = 0) -> Iterator[SandboxState]:
    """``encryption=None``: a full-suite sandbox (services "all") follows $PROPOLIS_TEST_ENCRYPTION, so CI can
    run every cross-node packet test both ways (`PROPOLIS_TEST_ENCRYPTION=wireguard pytest integration`)."""
    name = name or unique_name()
    if encryption is None:
        encryption = os.environ.get(TEST_ENCRYPTION_ENV, "") if services == "all" else ""
        if encryption.endswith(STRICT_SUFFIX):
            encryption, encryption_strict_mode = encryption.removesuffix(STRICT_SUFFIX), True
    try:
        yield cluster.up(name, nodes=nodes, services=services, cluster_cidr=cluster_cidr, encryption=encryption,
                         cluster_id=cluster_id, encryption_strict_mode=encryption_strict_mode,
                         encryption_node_encryption=encryption_node_encryption, nats_replicas=nats_replicas,
                         nats_relays=nats_relays)
    finally:
        keep = os.environ.get(KEEP_LOGS_ENV)
        if keep and (RUN_ROOT / name / "logs").is_dir():
            shutil.copytree(RUN_ROOT / name / "logs", Path(keep) / name, dirs_exist_ok=True)
        cluster.down(name)
        left = leftovers(name)
        assert not any(left.values()), f"sandbox {name} left {left}"


__all__ = ["running_sandbox", "unique_name", "leftovers", "BPF_ROOT"]
