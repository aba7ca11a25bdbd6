"""wireguard-keymgr (per node): the node's WireGuard key pair, `cilium_wg0` and its peers.

Wiring only; the components are `propolis.encryption.keymgr`. See README.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from propolis.encryption.backend import LISTEN_PORT
from propolis.encryption.keymgr import SERVICE, DeviceComponent, PeersComponent, PublisherComponent
from propolis.encryption.targets import WIREGUARD_ENCRYPTED_MARK
from propolis.errors import ValidationError
from propolis.runtime.component import Component
from propolis.runtime.service import run_service
from propolis.runtime.settings import CommonSettings, setting


@dataclass
class Settings(CommonSettings):
    encryption_type: str = setting("wireguard", "encryption.type (ipsec: this kernel has no ESP, refused)",
                                   choices=("wireguard", "ipsec"))
    encryption_node_encryption: bool = setting(False, "encryption.nodeEncryption: node-to-node and node-to-pod "
                                                      "traffic between nodes through cilium_wg0 too")
    encryption_wireguard_persistent_keepalive: int = setting(0, "encryption.wireguard.persistentKeepalive "
                                                                "(0 = off)", unit="s")
    wireguard_listen_port: int = setting(LISTEN_PORT, "UDP port of cilium_wg0 (Cilium: 51871)")
    wireguard_backend: str = setting("auto", "auto = kernel module when loaded, else wireguard-go",
                                     choices=("auto", "kernel", "wireguard-go"))
    wireguard_state_dir: str = setting("", "root-only directory of the private key and the wireguard-go socket "
                                           "(empty = <run-dir>/<node>/wireguard, else /var/lib/propolis/wireguard)")
    node_netns: str = setting("", "network namespace of the node (empty = this one)")
    run_dir: str = setting("", "sandbox run directory (PROPOLIS_RUN_DIR)")
    kubeconfig: str = setting("", "kubeconfig for the Node annotation (empty = no annotation)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.encryption_type == "ipsec":
            raise ValidationError("encryption_type", "ipsec needs kernel ESP (XFRM), which this kernel lacks; "
                                                     "use wireguard")
        if not 0 < self.wireguard_listen_port < 65536:
            raise ValidationError("wireguard_listen_port", f"{self.wireguard_listen_port} is not a UDP port")

    def state_dir(self) -> Path:
        if self.wireguard_state_dir:
            return Path(self.wireguard_state_dir)
        if self.run_dir:
            return Path(self.run_dir) / self.node_name / "wireguard"
        return Path("/var/lib/propolis/wireguard")


def build(settings: Settings) -> list[Component]:
    device = DeviceComponent(node=settings.node_name, netns=settings.node_netns or None,
                             state_dir=settings.state_dir(), listen_port=settings.wireguard_listen_port,
                             backend=settings.wireguard_backend,
                             fwmark=WIREGUARD_ENCRYPTED_MARK if settings.encryption_node_encryption else 0)
    return [device,
            PublisherComponent(device, kubeconfig=settings.kubeconfig),
            PeersComponent(device, persistent_keepalive=settings.encryption_wireguard_persistent_keepalive,
                           node_encryption=settings.encryption_node_encryption)]


def main(argv: list[str] | None = None) -> int:
    return run_service(SERVICE, Settings, build, argv)


if __name__ == "__main__":
    raise SystemExit(main())
