"""clustermesh-apiserver (per cluster): exports this cluster to remote clusters and caches theirs.

Wiring only; the components are `propolis.clustermesh`. See README.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from propolis.clustermesh import SERVICE
from propolis.clustermesh.export import ExportComponent
from propolis.clustermesh.kvstoremesh import KvStoreMeshComponent
from propolis.clustermesh.remotes import validate_cluster_name
from propolis.runtime.component import Component
from propolis.runtime.service import run_service
from propolis.runtime.settings import CommonSettings, setting


@dataclass
class Settings(CommonSettings):
    clustermesh_config: str = setting("", "directory of remote cluster configs, one <cluster>.json each "
                                          "(empty = <run-dir>/clustermesh, else /var/lib/propolis/clustermesh)")
    run_dir: str = setting("", "sandbox run directory (PROPOLIS_RUN_DIR)")
    clustermesh_cache_ttl: float = setting(0.0, "clustermesh.cacheTTL: how long an unreachable remote's cached "
                                                "state is kept (0 = until it is back or disconnected)", unit="s")

    def __post_init__(self) -> None:
        super().__post_init__()
        validate_cluster_name(self.cluster_name)  # an id of 0 exports, but no remote accepts it

    def remotes_dir(self) -> Path:
        if self.clustermesh_config:
            return Path(self.clustermesh_config)
        if self.run_dir:
            return Path(self.run_dir) / "clustermesh"
        return Path("/var/lib/propolis/clustermesh")


def build(settings: Settings) -> list[Component]:
    return [ExportComponent(cluster_name=settings.cluster_name, cluster_id=settings.cluster_id),
            KvStoreMeshComponent(cluster_name=settings.cluster_name, cluster_id=settings.cluster_id,
                                 remotes_dir=settings.remotes_dir(), cache_ttl=settings.clustermesh_cache_ttl)]


def main(argv: list[str] | None = None) -> int:
    return run_service(SERVICE, Settings, build, argv)


if __name__ == "__main__":
    raise SystemExit(main())
