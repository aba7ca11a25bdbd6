"""Service load-balancing maps (kube-proxy replacement), Cilium's layouts and pin names.

Mirrors bpf/lib/lb.h: cilium_lb4_services_v2 (frontend + slot -> master entry or backend
id), cilium_lb4_backends_v3 (backend id -> address), cilium_lb4_reverse_nat (frontend id
-> frontend, for replies), cilium_lb4_affinity (sessionAffinity: ClientIP),
cilium_lb4_maglev (per-service Maglev table) and cilium_snat_v4_external (NodePort SNAT).
Also the batch syscalls (BPF_MAP_*_BATCH): a resync of 10,000 services writes ~100k
entries, one syscall per few thousand instead of one each.
Show them: `propolis bpf lb list`, `propolis service list`.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from propolis.errors import ValidationError
from propolis.maps import bpf
from propolis.maps.conntrack import CtTuple4
from propolis.maps.spec import MapSpec, be32_to_ip4, htons, ip4_to_be32, ntohs

# service flags (Cilium's SVC_FLAG_*), flags2
SVC_FLAG_EXTERNAL_IP = 1 << 0
SVC_FLAG_NODEPORT = 1 << 1
SVC_FLAG_EXT_LOCAL_SCOPE = 1 << 2
SVC_FLAG_HOSTPORT = 1 << 3
SVC_FLAG_AFFINITY = 1 << 4
SVC_FLAG_LOADBALANCER = 1 << 5
SVC_FLAG_ROUTABLE = 1 << 6
SVC_FLAG2_INT_LOCAL_SCOPE = 1 << 4
SVC_FLAG2_MAGLEV = 1 << 7
# Propolis, Cluster Mesh: a global Service's affinity, for `service list` to mark preferred backends (the
# datapath never reads them: the writer already slots only the side it uses)
SVC_FLAG2_CLUSTERMESH_AFFINITY_LOCAL = 1 << 5
SVC_FLAG2_CLUSTERMESH_AFFINITY_REMOTE = 1 << 6
CLUSTERMESH_AFFINITY_FLAGS = {"local": SVC_FLAG2_CLUSTERMESH_AFFINITY_LOCAL,
                              "remote": SVC_FLAG2_CLUSTERMESH_AFFINITY_REMOTE}

BE_STATE_ACTIVE = 0
BE_STATE_TERMINATING = 1
BE_STATE_NAMES = {0: "active", 1: "terminating", 2: "quarantined", 3: "maintenance"}

# M: Cilium's maglev.tableSize values (primes), default 16381 (M >= 100 x backends moves <= 1 % of
# flows when one backend changes); the C default (LB_MAGLEV_TABLE_SIZE) is the same
MAGLEV_TABLE_SIZES = (251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071)
MAGLEV_TABLE_SIZE = 16381
HAIRPIN_IP = "169.254.42.1"  # Cilium's IPV4_LOOPBACK


class Lb4Key(ctypes.Structure):
    C_STRUCT = "lb4_key"
    _fields_ = [("address", ctypes.c_uint32), ("dport", ctypes.c_uint16), ("backend_slot", ctypes.c_uint16),
                ("proto", ctypes.c_uint8), ("scope", ctypes.c_uint8), ("pad", ctypes.c_uint8 * 2)]


class Lb4Service(ctypes.Structure):
    C_STRUCT = "lb4_service"
    _fields_ = [("backend_id", ctypes.c_uint32), ("count", ctypes.c_uint16), ("rev_nat_index", ctypes.c_uint16),
                ("flags", ctypes.c_uint8), ("flags2", ctypes.c_uint8), ("pad", ctypes.c_uint8 * 2)]


class Lb4Backend(ctypes.Structure):
    C_STRUCT = "lb4_backend"
    _fields_ = [("address", ctypes.c_uint32), ("port", ctypes.c_uint16), ("proto", ctypes.c_uint8),
                ("flags", ctypes.c_uint8), ("cluster_id", ctypes.c_uint16), ("zone", ctypes.c_uint8),
                ("pad", ctypes.c_uint8)]


class Lb4ReverseNat(ctypes.Structure):
    C_STRUCT = "lb4_reverse_nat"
    _fields_ = [("address", ctypes.c_uint32), ("port", ctypes.c_uint16), ("pad", ctypes.c_uint16)]


class Lb4AffinityKey(ctypes.Structure):
    C_STRUCT = "lb4_affinity_key"
    _fields_ = [("client_ip", ctypes.c_uint32), ("client_pad", ctypes.c_uint32), ("rev_nat_id", ctypes.c_uint16),
                ("netns_cookie", ctypes.c_uint8), ("pad1", ctypes.c_uint8), ("pad2", ctypes.c_uint32)]


class LbAffinityVal(ctypes.Structure):
    C_STRUCT = "lb_affinity_val"
    _fields_ = [("last_used", ctypes.c_uint64), ("backend_id", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


class Lb4Maglev(ctypes.Structure):
    C_STRUCT = "lb4_maglev"
    _fields_ = [("backend_ids", ctypes.c_uint32 * MAGLEV_TABLE_SIZE)]


class Ipv4NatEntry(ctypes.Structure):
    C_STRUCT = "ipv4_nat_entry"
    _fields_ = [("lifetime", ctypes.c_uint32), ("flags", ctypes.c_uint16), ("pad", ctypes.c_uint16),
                ("to_addr", ctypes.c_uint32), ("to_port", ctypes.c_uint16), ("rev_nat_index", ctypes.c_uint16)]


def _spec(pin: str, c_name: str, mtype: int, key: type[Any], value: type[Any], size: int, define: str,
          why: str) -> MapSpec:
    return MapSpec(pin_name=pin, c_name=c_name, map_type=mtype, key_type=key, value_type=value,
                   max_entries=size, why_size=why, size_define=define,
                   c_key_struct=getattr(key, "C_STRUCT", ""), c_value_struct=value.C_STRUCT)


SERVICES_SPEC = _spec("cilium_lb4_services_v2", "lb4_services", bpf.BPF_MAP_TYPE_HASH, Lb4Key, Lb4Service,
                      65536, "LB_SERVICE_MAP_SIZE",
                      "Cilium's bpf.lbMapMax default: one entry per frontend plus one per backend slot "
                      "(10,000 services x 4 backends = 50,000); allocated on demand")
BACKENDS_SPEC = _spec("cilium_lb4_backends_v3", "lb4_backends", bpf.BPF_MAP_TYPE_HASH, ctypes.c_uint32, Lb4Backend,
                      65536, "LB_BACKENDS_MAP_SIZE", "Cilium's bpf.lbMapMax default; backend ids are 32 bit")
REV_NAT_SPEC = _spec("cilium_lb4_reverse_nat", "lb4_reverse_nat", bpf.BPF_MAP_TYPE_HASH, ctypes.c_uint16,
                     Lb4ReverseNat, 65536, "LB_REV_NAT_MAP_SIZE", "one per frontend; rev_nat_index is 16 bit")
AFFINITY_SPEC = _spec("cilium_lb4_affinity", "lb4_affinity", bpf.BPF_MAP_TYPE_LRU_HASH, Lb4AffinityKey,
                      LbAffinityVal, 65536, "LB_AFFINITY_MAP_SIZE",
                      "Cilium's default; LRU: the oldest client->backend pins go first")
MAGLEV_SPEC = _spec("cilium_lb4_maglev", "lb4_maglev", bpf.BPF_MAP_TYPE_HASH, ctypes.c_uint32, Lb4Maglev,
                    16384, "LB_MAGLEV_MAP_SIZE",
                    f"one table of M={MAGLEV_TABLE_SIZE} backend ids (64 KiB) per Maglev service, on demand")


def maglev_spec(table_size: int) -> MapSpec:
    """MAGLEV_SPEC for another maglev.tableSize: its value is M backend ids (compiled with
    -DLB_MAGLEV_TABLE_SIZE=M)."""
    if table_size not in MAGLEV_TABLE_SIZES:
        raise ValidationError("maglev.tableSize", f"{table_size} is not one of {list(MAGLEV_TABLE_SIZES)}")
    if table_size == MAGLEV_TABLE_SIZE:
        return MAGLEV_SPEC
    value = type(f"Lb4Maglev{table_size}", (ctypes.Structure,),
                 {"C_STRUCT": "lb4_maglev", "_fields_": [("backend_ids", ctypes.c_uint32 * table_size)]})
    return dataclasses.replace(MAGLEV_SPEC, value_type=value,
                               why_size=f"one table of M={table_size} backend ids per Maglev service, on demand")
SNAT_SPEC = _spec("cilium_snat_v4_external", "snat4_external", bpf.BPF_MAP_TYPE_LRU_HASH, CtTuple4, Ipv4NatEntry,
                  65536, "SNAT_MAP_SIZE", "NodePort flows SNATed to another node's backend; LRU, preallocated (2 MiB)")

# maps every program of the node uses (listed in propolis.maps.ALL_SPECS: the loader checks
# adopted programs use all of them); the SNAT map is cil_from_netdev's alone
SPECS: tuple[MapSpec, ...] = (SERVICES_SPEC, BACKENDS_SPEC, REV_NAT_SPEC, AFFINITY_SPEC, MAGLEV_SPEC)
NETDEV_SPECS: tuple[MapSpec, ...] = (SNAT_SPEC,)

PROTO_NUMBERS = {"TCP": 6, "UDP": 17, "SCTP": 132}
PROTO_NAMES = {v: k for k, v in PROTO_NUMBERS.items()}


# --------------------------------------------------------------------------- keys/values
def service_key(ip: str, port: int, proto: int, slot: int = 0) -> Lb4Key:
    key = Lb4Key()
    key.address = ip4_to_be32(ip)
    key.dport = htons(port)
    key.backend_slot = slot
    key.proto = proto
    return key


def backend_value(ip: str, port: int, proto: int, state: int) -> Lb4Backend:
    value = Lb4Backend()
    value.address = ip4_to_be32(ip)
    value.port = htons(port)
    value.proto = proto
    value.flags = state
    return value


def rev_nat_value(ip: str, port: int) -> Lb4ReverseNat:
    value = Lb4ReverseNat()
    value.address = ip4_to_be32(ip)
    value.port = htons(port)
    return value


@dataclass(frozen=True)
class ServiceRow:
    """One cilium_lb4_services_v2 entry, decoded (`propolis bpf lb list`)."""

    frontend: str
    proto: int
    slot: int
    backend_id: int
    count: int
    rev_nat_index: int
    flags: int
    flags2: int

    def to_json(self) -> dict[str, Any]:
        return {"frontend": self.frontend, "protocol": PROTO_NAMES.get(self.proto, str(self.proto)),
                "slot": self.slot, "backend_id": self.backend_id, "count": self.count,
                "rev_nat_index": self.rev_nat_index, "flags": self.flags, "flags2": self.flags2}


def dump_services(bpf_map: bpf.BpfMap[Any, Any]) -> list[ServiceRow]:
    rows = [ServiceRow(f"{be32_to_ip4(k.address)}:{ntohs(k.dport)}", k.proto, k.backend_slot, v.backend_id,
                       v.count, v.rev_nat_index, v.flags, v.flags2) for k, v in items_batch(bpf_map)]
    return sorted(rows, key=lambda r: (r.rev_nat_index, r.slot))


def dump_backends(bpf_map: bpf.BpfMap[Any, Any]) -> dict[int, tuple[str, int, int, int, int]]:
    """backend id -> (ip, port, proto, state, cluster id: 0 = this cluster, else the remote one of Cluster Mesh)."""
    return {int(k.value): (be32_to_ip4(v.address), ntohs(v.port), v.proto, v.flags, v.cluster_id)
            for k, v in items_batch(bpf_map)}


def dump_rev_nat(bpf_map: bpf.BpfMap[Any, Any]) -> dict[int, tuple[str, int]]:
    return {int(k.value): (be32_to_ip4(v.address), ntohs(v.port)) for k, v in items_batch(bpf_map)}


def flag_names(flags: int, flags2: int) -> list[str]:
    names = [n for bit, n in ((SVC_FLAG_EXTERNAL_IP, "ExternalIPs"), (SVC_FLAG_NODEPORT, "NodePort"),
                              (SVC_FLAG_EXT_LOCAL_SCOPE, "eTP=Local"), (SVC_FLAG_AFFINITY, "sessionAffinity"),
                              (SVC_FLAG_LOADBALANCER, "LoadBalancer"), (SVC_FLAG_HOSTPORT, "HostPort")) if flags & bit]
    names += [n for bit, n in ((SVC_FLAG2_INT_LOCAL_SCOPE, "iTP=Local"), (SVC_FLAG2_MAGLEV, "maglev"),
                               (SVC_FLAG2_CLUSTERMESH_AFFINITY_LOCAL, "affinity=local"),
                               (SVC_FLAG2_CLUSTERMESH_AFFINITY_REMOTE, "affinity=remote")) if flags2 & bit]
    return names


# --------------------------------------------------------------------------- batch syscalls
BPF_MAP_LOOKUP_BATCH = 24
BPF_MAP_UPDATE_BATCH = 26
BPF_MAP_DELETE_BATCH = 27
BATCH_CHUNK = 8192


def _batch_attr(fd: int, keys_addr: int, values_addr: int, count: int, in_batch: int = 0,
                out_batch: int = 0) -> ctypes.Array[ctypes.c_char]:
    attr = ctypes.create_string_buffer(128)
    # in_batch, out_batch, keys, values, count, map_fd, elem_flags, flags
    struct.pack_into("=QQQQIIQQ", attr, 0, in_batch, out_batch, keys_addr, values_addr, count, fd, 0, 0)
    return attr


def update_batch(bpf_map: bpf.BpfMap[Any, Any], keys: bytes, values: bytes, count: int) -> None:
    """Write `count` packed keys/values (C layout, back to back) in chunks of BATCH_CHUNK."""
    ksz, vsz = ctypes.sizeof(bpf_map.key_type), ctypes.sizeof(bpf_map.value_type)
    kbuf = ctypes.create_string_buffer(keys, len(keys))
    vbuf = ctypes.create_string_buffer(values, len(values))
    done = 0
    while done < count:
        n = min(BATCH_CHUNK, count - done)
        attr = _batch_attr(bpf_map.fd, ctypes.addressof(kbuf) + done * ksz, ctypes.addressof(vbuf) + done * vsz, n)
        bpf._bpf(BPF_MAP_UPDATE_BATCH, attr, f"update batch in {bpf_map.path}")
        done += n


def delete_batch(bpf_map: bpf.BpfMap[Any, Any], keys: bytes, count: int) -> None:
    """Delete `count` packed keys; missing keys are skipped one by one (the batch stops on ENOENT)."""
    ksz = ctypes.sizeof(bpf_map.key_type)
    kbuf = ctypes.create_string_buffer(keys, len(keys))
    done = 0
    while done < count:
        n = min(BATCH_CHUNK, count - done)
        attr = _batch_attr(bpf_map.fd, ctypes.addressof(kbuf) + done * ksz, 0, n)
        try:
            bpf._bpf(BPF_MAP_DELETE_BATCH, attr, f"delete batch in {bpf_map.path}")
            done += n
        except bpf.BpfError as exc:
            if exc.errno != errno.ENOENT:
                raise
            deleted, = struct.unpack_from("=I", attr, 32)
            done += deleted + 1  # skip the missing key


def items_batch(bpf_map: bpf.BpfMap[Any, Any]) -> list[tuple[Any, Any]]:
    """Every entry with BPF_MAP_LOOKUP_BATCH (hash maps), decoded to the ctypes types."""
    if bpf_map.percpu:
        return list(bpf_map.items())
    ktype, vtype = bpf_map.key_type, bpf_map.value_type
    return [(ktype.from_buffer_copy(k), vtype.from_buffer_copy(v)) for k, v in raw_items_batch(bpf_map)]


def raw_items_batch(bpf_map: bpf.BpfMap[Any, Any]) -> list[tuple[bytes, bytes]]:
    """Every entry as packed (key, value) bytes with BPF_MAP_LOOKUP_BATCH (a restart's read-back
    of 100k entries is a few syscalls and slices); falls back to key iteration."""
    ksz, vsz = ctypes.sizeof(bpf_map.key_type), ctypes.sizeof(bpf_map.value_type)
    out: list[tuple[bytes, bytes]] = []
    for raw_k, raw_v, n in raw_batches(bpf_map):
        out.extend(zip([raw_k[i:i + ksz] for i in range(0, n * ksz, ksz)],
                       [raw_v[i:i + vsz] for i in range(0, n * vsz, vsz)]))
    return out


def raw_batches(bpf_map: bpf.BpfMap[Any, Any], chunk: int = 4096) -> Iterator[tuple[bytes, bytes, int]]:
    """The map's entries in chunks: (packed keys, packed values, count), BPF_MAP_LOOKUP_BATCH;
    key iteration as one chunk where the kernel has no batch lookup for the map type."""
    ktype, vtype = bpf_map.key_type, bpf_map.value_type
    ksz, vsz = ctypes.sizeof(ktype), ctypes.sizeof(vtype)
    kbuf = ctypes.create_string_buffer(ksz * chunk)
    vbuf = ctypes.create_string_buffer(vsz * chunk)
    token = ctypes.create_string_buffer(max(ksz, 8))
    first = True
    while True:
        attr = _batch_attr(bpf_map.fd, ctypes.addressof(kbuf), ctypes.addressof(vbuf), chunk,
                           0 if first else ctypes.addressof(token), ctypes.addressof(token))
        finished = False
        try:
            bpf._bpf(BPF_MAP_LOOKUP_BATCH, attr, f"lookup batch in {bpf_map.path}")
        except bpf.BpfError as exc:
            if exc.errno == errno.ENOENT:
                finished = True
            elif exc.errno in (errno.EINVAL, errno.EOPNOTSUPP, 524) and first:  # 524: ENOTSUPP
                items = list(bpf_map.items())
                yield b"".join(bytes(k) for k, _ in items), b"".join(bytes(v) for _, v in items), len(items)
                return
            else:
                raise
        n, = struct.unpack_from("=I", attr, 32)
        if n:
            yield kbuf.raw[:n * ksz], vbuf.raw[:n * vsz], n
        if finished:
            return
        first = False


def pack(entries: Sequence[Any]) -> bytes:
    """ctypes structs (or c_uint*) back to back, as the batch calls want them."""
    return b"".join(bytes(e) for e in entries)
