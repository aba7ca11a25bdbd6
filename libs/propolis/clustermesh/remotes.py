"""Remote cluster configs: one file per connected cluster, like Cilium's `clustermesh` secret mounted
at /var/lib/cilium/clustermesh/<cluster>: where the remote's NATS is and the read-only user to read its
export with. `clustermesh connect` writes them, `disconnect` removes them, the clustermesh-apiserver
follows the directory."""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from propolis.errors import ValidationError

#: Cilium's rule for cluster.name: a DNS label of at most 32 characters.
_CLUSTER_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,30}[a-z0-9])?$")


def validate_cluster_name(name: str) -> None:
    if not _CLUSTER_NAME_RE.match(name):
        raise ValidationError("cluster.name", f"{name!r} is not a DNS label of at most 32 characters")


def validate_cluster(name: str, cluster_id: int) -> None:
    validate_cluster_name(name)
    if not 1 <= cluster_id <= 255:
        raise ValidationError("cluster.id", f"cluster {name!r}: id must be 1-255, got {cluster_id}")


@dataclass(frozen=True)
class RemoteCluster:
    name: str
    id: int
    nats_url: str
    user: str
    password: str


def remote_path(directory: Path, name: str) -> Path:
    return directory / f"{name}.json"


def save_remote(directory: Path, remote: RemoteCluster) -> None:
    """Root-only (0600 from creation on): the file holds the remote's password."""
    validate_cluster(remote.name, remote.id)
    directory.mkdir(parents=True, exist_ok=True)
    path = remote_path(directory, remote.name)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(asdict(remote), f)
    os.replace(tmp, path)


def load_remotes(directory: Path) -> dict[str, RemoteCluster]:
    """Every readable remote config; a malformed file is skipped (its cluster is not connected)."""
    out: dict[str, RemoteCluster] = {}
    if not directory.is_dir():
        return out
    for path in sorted(directory.glob("*.json")):
        try:
            remote = RemoteCluster(**json.loads(path.read_text()))
            validate_cluster(remote.name, remote.id)
        except (OSError, ValueError, TypeError):
            continue
        out[remote.name] = remote
    return out


def remove_remote(directory: Path, name: str) -> bool:
    try:
        remote_path(directory, name).unlink()
        return True
    except FileNotFoundError:
        return False
