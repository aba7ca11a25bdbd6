"""Socket-level load-balancing maps (Cilium's socketLB), mirroring bpf/lib/sock.h.

cilium_lb4_reverse_sk: {socket cookie, backend address, port} -> the Service frontend a
socket was translated from, so a UDP reply (recvmsg4) and getpeername() report the
frontend. cilium_lb_sock_config (Propolis): the node's network namespace cookie; the
cgroup programs translate only sockets of that namespace (socketLB.hostNamespaceOnly).
"""

from __future__ import annotations

import ctypes
import socket

from propolis.maps import bpf
from propolis.maps.spec import MapSpec

#: getsockopt(SOL_SOCKET, SO_NETNS_COOKIE) (Linux 5.14): the cookie bpf_get_netns_cookie() returns
SO_NETNS_COOKIE = 71


class Ipv4RevnatTuple(ctypes.Structure):
    C_STRUCT = "ipv4_revnat_tuple"
    _fields_ = [("cookie", ctypes.c_uint64), ("address", ctypes.c_uint32), ("port", ctypes.c_uint16),
                ("pad", ctypes.c_uint16)]


class Ipv4RevnatEntry(ctypes.Structure):
    C_STRUCT = "ipv4_revnat_entry"
    _fields_ = [("address", ctypes.c_uint32), ("port", ctypes.c_uint16), ("rev_nat_index", ctypes.c_uint16)]


class SockLbConfig(ctypes.Structure):
    C_STRUCT = "sock_lb_config"
    _fields_ = [("host_netns_cookie", ctypes.c_uint64), ("flags", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


REVERSE_SK_SPEC = MapSpec(
    pin_name="cilium_lb4_reverse_sk", c_name="lb4_reverse_sk", map_type=bpf.BPF_MAP_TYPE_LRU_HASH,
    key_type=Ipv4RevnatTuple, value_type=Ipv4RevnatEntry, max_entries=65536,
    why_size="one entry per translated socket and backend of the node's own processes; LRU: a closed "
             "socket's entries age out",
    size_define="LB4_REVERSE_NAT_SK_MAP_SIZE", c_key_struct="ipv4_revnat_tuple", c_value_struct="ipv4_revnat_entry")
CONFIG_SPEC = MapSpec(
    pin_name="cilium_lb_sock_config", c_name="sock_lb_config", map_type=bpf.BPF_MAP_TYPE_ARRAY,
    key_type=ctypes.c_uint32, value_type=SockLbConfig, max_entries=1, why_size="one record per node",
    c_value_struct="sock_lb_config")
SPECS: tuple[MapSpec, ...] = (REVERSE_SK_SPEC, CONFIG_SPEC)


def netns_cookie(sock: socket.socket) -> int:
    """The cookie of the network namespace `sock` was created in (what bpf_get_netns_cookie sees)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
    return int.from_bytes(raw, "little")


def config_value(host_netns_cookie: int) -> SockLbConfig:
    return SockLbConfig(host_netns_cookie=host_netns_cookie)
