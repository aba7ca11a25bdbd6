"""`propolis-cni`: a CNI 1.0 plugin (ADD/DEL/CHECK/VERSION), run by the container runtime in the node namespace.

Why a real executable: the sandbox's kubelet calls it exactly as containerd
would (env CNI_COMMAND/CNI_CONTAINERID/CNI_NETNS/CNI_IFNAME/CNI_PATH/CNI_ARGS,
network config JSON on stdin, result or error JSON on stdout), so what runs
here is what would run on a real node.

What ADD does (Cilium's veth mode, native routing):
  * IPAM is delegated to the `host-local` plugin found on CNI_PATH (config `ipam`);
  * a veth pair: `lxc<11 hex>` in the node namespace, CNI_IFNAME (eth0) in the pod;
  * pod: the address as /32, default route via 169.254.1.1 onlink, a permanent
    neighbour entry for 169.254.1.1 -> the lxc MAC;
  * node: /32 route to the pod via the lxc, proxy-ARP on the lxc;
  * if the config names `datapathSocket`, the endpoint is announced there (one
    JSON line request, one JSON line answer, see `announce`). No answer => ADD
    fails with CNI error 11 and everything is rolled back (fail closed).
DEL is idempotent; its announcement is best effort (the datapath reconciles
against the lxc links it finds anyway). CHECK verifies veth, addresses, routes.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

SUPPORTED_VERSIONS = ["0.3.0", "0.3.1", "0.4.0", "1.0.0"]
POD_GATEWAY = "169.254.1.1"
ANNOUNCE_TIMEOUT_S = 5.0
CLONE_NEWNET = 0x40000000

# CNI spec error codes
ERR_INCOMPATIBLE_VERSION = 1
ERR_UNSUPPORTED_FIELD = 2
ERR_CONTAINER_UNKNOWN = 3
ERR_INVALID_ENV = 4
ERR_IO = 5
ERR_DECODE = 6
ERR_INVALID_CONFIG = 7
ERR_TRY_AGAIN_LATER = 11
ERR_PLUGIN = 100  # plugin-specific: veth / address / route failure


class CniError(Exception):
    """A failure reported to the runtime as CNI error JSON on stdout with a non-zero exit."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_json(self, version: str) -> dict[str, Any]:
        return {"cniVersion": version, "code": self.code, "msg": self.msg, "details": self.details}


def host_ifname(container_id: str) -> str:
    """Host side of a pod's veth, in the node namespace: `lxc` + 11 hex digits of the container id.

    The plugin owns this name (15-byte IFNAMSIZ limit); the sandbox's kubelet and
    tests ask here for it rather than re-deriving it.
    """
    return "lxc" + hashlib.sha256(container_id.encode()).hexdigest()[:11]


@dataclass
class Invocation:
    """The runtime's request: env vars plus the network configuration."""

    command: str
    container_id: str
    netns: str
    ifname: str
    cni_path: list[str]
    args: dict[str, str]
    config: dict[str, Any]

    @property
    def version(self) -> str:
        return str(self.config.get("cniVersion", "1.0.0"))

    @property
    def pod_namespace(self) -> str:
        return self.args.get("K8S_POD_NAMESPACE", "")

    @property
    def pod_name(self) -> str:
        return self.args.get("K8S_POD_NAME", "")


def parse_invocation(environ: dict[str, str], stdin_text: str) -> Invocation:
    command = environ.get("CNI_COMMAND", "")
    if not command:
        raise CniError(ERR_INVALID_ENV, "CNI_COMMAND is not set")
    config: dict[str, Any] = {}
    if command != "VERSION" or stdin_text.strip():
        try:
            config = json.loads(stdin_text) if stdin_text.strip() else {}
        except ValueError as exc:
            raise CniError(ERR_DECODE, "network configuration on stdin is not JSON", str(exc)) from exc
        if not isinstance(config, dict):
            raise CniError(ERR_DECODE, "network configuration must be a JSON object")
    args: dict[str, str] = {}
    for pair in filter(None, environ.get("CNI_ARGS", "").split(";")):
        k, _, v = pair.partition("=")
        args[k] = v
    inv = Invocation(command=command, container_id=environ.get("CNI_CONTAINERID", ""),
                     netns=environ.get("CNI_NETNS", ""), ifname=environ.get("CNI_IFNAME", ""),
                     cni_path=[p for p in environ.get("CNI_PATH", "/usr/lib/cni").split(":") if p],
                     args=args, config=config)
    if command in ("ADD", "DEL", "CHECK"):
        if inv.version not in SUPPORTED_VERSIONS:
            raise CniError(ERR_INCOMPATIBLE_VERSION, f"cniVersion {inv.version} not supported",
                           f"supported: {', '.join(SUPPORTED_VERSIONS)}")
        for var, value in (("CNI_CONTAINERID", inv.container_id), ("CNI_IFNAME", inv.ifname)):
            if not value:
                raise CniError(ERR_INVALID_ENV, f"{var} is not set")
        if command != "DEL" and not inv.netns:
            raise CniError(ERR_INVALID_ENV, "CNI_NETNS is not set")
        ipam = config.get("ipam")
        if not isinstance(ipam, dict) or not ipam.get("type"):
            raise CniError(ERR_INVALID_CONFIG, "network configuration needs ipam.type (e.g. host-local)")
    return inv


# --- netns switching (this process is single-threaded) --------------------------------------

_ORIGINAL_NETNS = None


def _setns(fd: int) -> None:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def iproute_in_netns(path: str) -> Any:
    """An IPRoute whose socket lives in the namespace at `path`."""
    from pyroute2 import IPRoute
    here = os.open("/proc/self/ns/net", os.O_RDONLY)
    try:
        target = os.open(path, os.O_RDONLY)
    except OSError as exc:
        os.close(here)
        raise CniError(ERR_CONTAINER_UNKNOWN, f"cannot open network namespace {path}", str(exc)) from exc
    try:
        _setns(target)
        try:
            return IPRoute()
        finally:
            _setns(here)
    finally:
        os.close(target)
        os.close(here)


# --- IPAM delegation ------------------------------------------------------------------------

def find_plugin(inv: Invocation, plugin: str) -> str:
    for directory in inv.cni_path:
        candidate = os.path.join(directory, plugin)
        if os.access(candidate, os.X_OK):
            return candidate
    raise CniError(ERR_INVALID_CONFIG, f"IPAM plugin {plugin!r} not found on CNI_PATH",
                   ":".join(inv.cni_path))


def delegate_ipam(inv: Invocation, command: str, prev_result: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the IPAM plugin with the same env and config (as libcni's invoke.DelegateAdd does)."""
    ipam_type = str(inv.config["ipam"]["type"])
    conf = dict(inv.config)
    if prev_result is not None:
        conf["prevResult"] = prev_result
    cni_args = os.environ.get("CNI_ARGS", "")
    if "IgnoreUnknown=" not in cni_args:  # as containerd passes it: IPAM must not choke on K8S_POD_*
        cni_args = "IgnoreUnknown=1" + (";" + cni_args if cni_args else "")
    env = dict(os.environ, CNI_COMMAND=command, CNI_CONTAINERID=inv.container_id, CNI_NETNS=inv.netns,
               CNI_IFNAME=inv.ifname, CNI_PATH=":".join(inv.cni_path), CNI_ARGS=cni_args)
    proc = subprocess.run([find_plugin(inv, ipam_type)], input=json.dumps(conf), capture_output=True,
                          text=True, env=env)
    if proc.returncode != 0:
        try:
            err = json.loads(proc.stdout)
            raise CniError(int(err.get("code", ERR_PLUGIN)), f"IPAM {ipam_type} {command}: {err.get('msg', '')}",
                           str(err.get("details", "")))
        except ValueError:
            raise CniError(ERR_PLUGIN, f"IPAM {ipam_type} {command} exited {proc.returncode}",
                           (proc.stderr or proc.stdout).strip()) from None
    if command != "ADD":
        return {}
    try:
        result: dict[str, Any] = json.loads(proc.stdout)
    except ValueError as exc:
        raise CniError(ERR_DECODE, f"IPAM {ipam_type} returned non-JSON", proc.stdout[:200]) from exc
    return result


# --- datapath announcement ------------------------------------------------------------------

def announce(socket_path: str, message: dict[str, Any]) -> dict[str, Any]:
    """One JSON line to the node's datapath service, one JSON line back: {"ok": true} or {"ok": false, "error"}."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(ANNOUNCE_TIMEOUT_S)
            sock.connect(socket_path)
            sock.sendall(json.dumps(message).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                buf += chunk
    except OSError as exc:
        raise CniError(ERR_TRY_AGAIN_LATER, f"datapath service at {socket_path} did not answer",
                       f"{type(exc).__name__}: {exc}") from exc
    try:
        answer: dict[str, Any] = json.loads(buf)
    except ValueError as exc:
        raise CniError(ERR_TRY_AGAIN_LATER, f"datapath service at {socket_path} sent no valid answer",
                       buf[:200].decode(errors="replace")) from exc
    if not answer.get("ok"):
        raise CniError(ERR_PLUGIN, f"datapath service refused endpoint: {answer.get('error', 'no reason given')}")
    return answer


def endpoint_message(op: str, inv: Invocation, *, host_if: str, host_index: int, ip: str, mac: str,
                     host_mac: str) -> dict[str, Any]:
    return {
        "op": op, "containerID": inv.container_id, "podNamespace": inv.pod_namespace,
        "podName": inv.pod_name, "netns": inv.netns, "ifname": inv.ifname, "hostIfname": host_if,
        "hostIfindex": host_index, "ipv4": ip, "mac": mac, "hostMac": host_mac,
        "node": str(inv.config.get("node", "")),
    }


# --- commands -------------------------------------------------------------------------------

def _write_sysctl(key: str, value: str) -> None:
    with open("/proc/sys/" + key.replace(".", "/"), "w") as f:
        f.write(value)


def _link_attr(link: Any, name: str) -> Any:
    return link.get_attr(name) if hasattr(link, "get_attr") else link.get(name)


def cmd_add(inv: Invocation) -> dict[str, Any]:
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    host_if = host_ifname(inv.container_id)
    node = IPRoute()
    pod = iproute_in_netns(inv.netns)
    ipam_done = False
    try:
        if pod.link_lookup(ifname=inv.ifname):
            raise CniError(ERR_PLUGIN, f"interface {inv.ifname} already exists in {inv.netns}")
        for stale in node.link_lookup(ifname=host_if):  # leftover of an interrupted ADD
            node.link("del", index=stale)
        ipam = delegate_ipam(inv, "ADD")
        ipam_done = True
        ips = ipam.get("ips") or []
        if not ips:
            raise CniError(ERR_PLUGIN, "IPAM returned no address")
        ip = str(ipaddress.IPv4Interface(ips[0]["address"]).ip)
        mtu = int(inv.config.get("mtu", 1500))
        netns_fd = os.open(inv.netns, os.O_RDONLY)
        try:
            node.link("add", ifname=host_if, kind="veth", mtu=mtu,
                      peer={"ifname": inv.ifname, "net_ns_fd": netns_fd, "mtu": mtu})
        finally:
            os.close(netns_fd)
        host_index = node.link_lookup(ifname=host_if)[0]
        host_mac = _link_attr(node.get_links(host_index)[0], "IFLA_ADDRESS")
        pod_index = pod.link_lookup(ifname=inv.ifname)[0]
        pod_mac = _link_attr(pod.get_links(pod_index)[0], "IFLA_ADDRESS")
        lo = pod.link_lookup(ifname="lo")
        if lo:
            pod.link("set", index=lo[0], state="up")
        pod.addr("add", index=pod_index, address=ip, prefixlen=32)
        pod.link("set", index=pod_index, state="up")
        pod.neigh("replace", dst=POD_GATEWAY, lladdr=host_mac, ifindex=pod_index, state=0x80)  # NUD_PERMANENT
        pod.route("replace", dst="0.0.0.0/0", gateway=POD_GATEWAY, oif=pod_index, flags=4)  # RTNH_F_ONLINK
        node.link("set", index=host_index, state="up")
        _write_sysctl(f"net.ipv4.conf.{host_if}.proxy_arp", "1")
        _write_sysctl(f"net.ipv4.conf.{host_if}.rp_filter", "0")
        node.route("replace", dst=f"{ip}/32", oif=host_index, scope=253)  # RT_SCOPE_LINK
        socket_path = inv.config.get("datapathSocket")
        if socket_path:
            announce(str(socket_path), endpoint_message("EndpointAdd", inv, host_if=host_if, host_index=host_index,
                                                        ip=ip, mac=pod_mac, host_mac=host_mac))
        return {
            "cniVersion": inv.version,
            "interfaces": [{"name": host_if, "mac": host_mac},
                           {"name": inv.ifname, "mac": pod_mac, "sandbox": inv.netns}],
            "ips": [{"address": f"{ip}/32", "gateway": POD_GATEWAY, "interface": 1}],
            "routes": [{"dst": "0.0.0.0/0", "gw": POD_GATEWAY}],
            "dns": inv.config.get("dns", {}),
        }
    except BaseException as exc:
        # roll back: no half-wired pod, no leaked address
        for idx in node.link_lookup(ifname=host_if):
            try:
                node.link("del", index=idx)
            except NetlinkError:
                pass
        if ipam_done:
            try:
                delegate_ipam(inv, "DEL")
            except CniError:
                pass
        if isinstance(exc, NetlinkError):
            raise CniError(ERR_PLUGIN, f"netlink: {exc}") from exc
        if isinstance(exc, OSError):
            raise CniError(ERR_IO, f"{exc}") from exc
        raise
    finally:
        node.close()
        pod.close()


def cmd_del(inv: Invocation) -> dict[str, Any] | None:
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    host_if = host_ifname(inv.container_id)
    with IPRoute() as node:
        found = node.link_lookup(ifname=host_if)
        ip = ""
        host_mac = ""
        if found:
            for route in node.get_routes(oif=found[0]):
                dst = _link_attr(route, "RTA_DST")
                if dst and route["dst_len"] == 32:
                    ip = dst
            host_mac = _link_attr(node.get_links(found[0])[0], "IFLA_ADDRESS")
            try:
                node.link("del", index=found[0])
            except NetlinkError as exc:
                if exc.code != 19:  # ENODEV: gone with its namespace meanwhile
                    raise CniError(ERR_PLUGIN, f"delete {host_if}: {exc}") from exc
    delegate_ipam(inv, "DEL")
    socket_path = inv.config.get("datapathSocket")
    if socket_path and found:
        try:
            announce(str(socket_path), endpoint_message("EndpointDelete", inv, host_if=host_if,
                                                        host_index=found[0], ip=ip, mac="", host_mac=host_mac))
        except CniError as exc:
            print(f"propolis-cni: DEL announcement skipped: {exc.msg}: {exc.details}", file=sys.stderr)
    return None


def cmd_check(inv: Invocation) -> dict[str, Any] | None:
    from pyroute2 import IPRoute

    prev = inv.config.get("prevResult")
    if not isinstance(prev, dict) or not prev.get("ips"):
        raise CniError(ERR_INVALID_CONFIG, "CHECK needs prevResult with ips")
    want_ip = str(ipaddress.IPv4Interface(prev["ips"][0]["address"]).ip)
    host_if = host_ifname(inv.container_id)
    with IPRoute() as node:
        found = node.link_lookup(ifname=host_if)
        if not found:
            raise CniError(ERR_PLUGIN, f"host interface {host_if} is missing")
        host_index = found[0]
        if _link_attr(node.get_links(host_index)[0], "IFLA_OPERSTATE") not in ("UP", "UNKNOWN"):
            raise CniError(ERR_PLUGIN, f"host interface {host_if} is not up")
        routes = [r for r in node.get_routes(oif=host_index) if _link_attr(r, "RTA_DST") == want_ip]
        if not routes:
            raise CniError(ERR_PLUGIN, f"node has no /32 route to {want_ip} via {host_if}")
    pod = iproute_in_netns(inv.netns)
    try:
        found = pod.link_lookup(ifname=inv.ifname)
        if not found:
            raise CniError(ERR_PLUGIN, f"{inv.ifname} is missing in {inv.netns}")
        addrs = [_link_attr(a, "IFA_ADDRESS") for a in pod.get_addr(index=found[0])]
        if want_ip not in addrs:
            raise CniError(ERR_PLUGIN, f"{inv.ifname} in {inv.netns} lacks {want_ip} (has {addrs})")
        if not [r for r in pod.get_routes(oif=found[0]) if r["dst_len"] == 0]:
            raise CniError(ERR_PLUGIN, f"pod has no default route via {inv.ifname}")
    finally:
        pod.close()
    delegate_ipam(inv, "CHECK", prev)
    return None


def run(environ: dict[str, str], stdin_text: str) -> tuple[int, dict[str, Any] | None]:
    """Execute one invocation; returns (exit code, JSON for stdout or None)."""
    version = "1.0.0"
    try:
        inv = parse_invocation(environ, stdin_text)
        version = inv.version
        if inv.command == "VERSION":
            return 0, {"cniVersion": "1.0.0", "supportedVersions": SUPPORTED_VERSIONS}
        handlers = {"ADD": cmd_add, "DEL": cmd_del, "CHECK": cmd_check}
        handler = handlers.get(inv.command)
        if handler is None:
            raise CniError(ERR_INVALID_ENV, f"unknown CNI_COMMAND {inv.command!r}", "supported: ADD DEL CHECK VERSION")
        return 0, handler(inv)
    except CniError as exc:
        return 1, exc.to_json(version)
    except Exception as exc:  # noqa: BLE001 - the runtime must get CNI error JSON, never a traceback
        return 1, CniError(ERR_PLUGIN, f"{type(exc).__name__}: {exc}").to_json(version)


def main() -> int:
    code, out = run(dict(os.environ), "" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.read())
    if out is not None:
        sys.stdout.write(json.dumps(out) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
