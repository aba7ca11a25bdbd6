"""Install propolis-cni and this node's CNI network configuration (the datapath-writer's init step).

Cilium's install-cni, for Propolis: copies the self-contained plugin binary (built into the image by the
Dockerfile's cni stage) into the node's /opt/cni/bin and writes /etc/cni/net.d/05-propolis.conf naming the
node's podCIDR (host-local IPAM, read from the Node object) and the datapath-writer's socket (fail closed:
ADD fails while nothing answers there). Standard library only; atomic writes so the runtime never reads
half a file.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import sys
import urllib.request

PLUGIN_SOURCE = "/opt/propolis/cni/propolis-cni"
HOST_BIN_DIR = "/host/opt/cni/bin"
HOST_CONF_DIR = "/host/etc/cni/net.d"
CONF_NAME = "05-propolis.conf"
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


def network_config(node: str, pod_cidr: str, datapath_socket: str) -> dict[str, object]:
    """The same shape as the sandbox's (libs/propolis_sandbox/daemon.py `cni_config`)."""
    return {
        "cniVersion": "1.0.0",
        "name": "propolis",
        "type": "propolis-cni",
        "node": node,
        "mtu": 1500,
        "ipam": {"type": "host-local", "ranges": [[{"subnet": pod_cidr}]]},
        "datapathSocket": datapath_socket,
    }


def node_pod_cidr(node: str) -> str:
    host = os.environ["KUBERNETES_SERVICE_HOST"]
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    with open(f"{SA_DIR}/token") as f:
        token = f.read().strip()
    ctx = ssl.create_default_context(cafile=f"{SA_DIR}/ca.crt")
    req = urllib.request.Request(f"https://{host}:{port}/api/v1/nodes/{node}",
                                 headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
        spec = json.load(resp).get("spec") or {}
    cidr = spec.get("podCIDR") or ""
    if not cidr:
        raise SystemExit(f"install-cni: Node {node} has no spec.podCIDR (the controller-manager allocates "
                         "them with --allocate-node-cidrs)")
    return str(cidr)


def write_atomic(path: str, data: bytes, mode: int) -> None:
    tmp = f"{path}.propolis-tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def main() -> int:
    node = os.environ["NODE_NAME"]
    socket_path = os.environ.get("DATAPATH_SOCKET", "/var/run/propolis/datapath.sock")
    with open(PLUGIN_SOURCE, "rb") as f:
        write_atomic(os.path.join(HOST_BIN_DIR, "propolis-cni"), f.read(), 0o755)
    conf = network_config(node, node_pod_cidr(node), socket_path)
    write_atomic(os.path.join(HOST_CONF_DIR, CONF_NAME), json.dumps(conf, indent=2).encode(), 0o644)
    print(f"install-cni: propolis-cni and {CONF_NAME} installed for {node} ({conf['ipam']})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    shutil.disk_usage(HOST_BIN_DIR)  # the hostPath mounts are there, or fail here naming the path
    raise SystemExit(main())
