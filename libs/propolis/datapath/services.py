"""The service LB maps of one node, written as a diff of the desired `LBService` list.

Why a diff of packed bytes: the writer recomputes the whole desired state on every
Service/EndpointSlice change; turning it into map entries and comparing bytes with what
this process last wrote costs microseconds per service, and only the differences reach
the kernel, in BPF_MAP_UPDATE_BATCH / DELETE_BATCH calls. After a restart the first call
reads the maps back (batch lookup) and recovers the frontend and backend ids, so a resync
of unchanged services writes nothing and established flows keep their backends.

Write order keeps every intermediate state valid for the datapath: backends, reverse NAT
and Maglev tables, then backend slots, then master entries (count last); removals in
the reverse order. Terminating backends stay in the backends map (established flows
find them through their CT_SERVICE entry) but in no slot (no new flows).
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from propolis.errors import PermanentError, ValidationError
from propolis.lb.desired import BACKEND_ACTIVE, BACKEND_TERMINATING, LBService
from propolis.lb.maglev import maglev_table
from propolis.maps import bpf
from propolis.maps import lb as lbmaps

LB_ALGORITHMS = ("random", "maglev")  # Cilium's loadBalancer.algorithm
MAX_FRONTEND_ID = 65535

_PROTO = lbmaps.PROTO_NUMBERS
_STATE = {BACKEND_ACTIVE: lbmaps.BE_STATE_ACTIVE, BACKEND_TERMINATING: lbmaps.BE_STATE_TERMINATING}
_FRONTEND_FLAGS = {"ClusterIP": 0, "NodePort": lbmaps.SVC_FLAG_NODEPORT,
                   "ExternalIP": lbmaps.SVC_FLAG_EXTERNAL_IP, "LoadBalancer": lbmaps.SVC_FLAG_LOADBALANCER,
                   "HostPort": lbmaps.SVC_FLAG_HOSTPORT}

# identities kept packed (no parsing on a restart's read-back): a frontend is its master
# key (lb4_key with slot 0), a backend the first 7 bytes of lb4_backend (address, port, proto)
FrontendKey = bytes
BackendAddr = bytes


@dataclass
class ServiceDiff:
    """What one set_services call changed (logs, metrics, the benchmark)."""

    frontends: int = 0
    frontends_added: int = 0
    frontends_removed: int = 0
    entries_written: int = 0
    entries_deleted: int = 0
    seconds: float = 0.0
    enabled: bool = True


@dataclass
class _Tables:
    """Packed key -> packed value of each map."""

    services: dict[bytes, bytes] = field(default_factory=dict)
    backends: dict[bytes, bytes] = field(default_factory=dict)
    rev_nat: dict[bytes, bytes] = field(default_factory=dict)
    maglev: dict[bytes, bytes] = field(default_factory=dict)


class _Frontend:
    """The entries one frontend owns (its backends are shared, counted by reference)."""

    __slots__ = ("services", "rev_nat", "maglev", "backends", "backend_l3n4")

    def __init__(self) -> None:
        self.services: dict[bytes, bytes] = {}
        self.rev_nat: dict[bytes, bytes] = {}
        self.maglev: dict[bytes, bytes] = {}
        self.backends: dict[bytes, bytes] = {}
        self.backend_l3n4: dict[bytes, BackendAddr] = {}


# packed layouts of bpf/lib/lb.h (ports already in network order via htons)
_KEY = struct.Struct("=4sHHBxxx")          # lb4_key: address, dport, backend_slot, proto, scope, pad
_SERVICE = struct.Struct("=IHHBBxx")       # lb4_service
_BACKEND = struct.Struct("=4sHBBHBx")      # lb4_backend
_REV_NAT = struct.Struct("=4sHxx")         # lb4_reverse_nat
_U32 = struct.Struct("=I")
_U16 = struct.Struct("=H")
_htons = socket.htons
_aton = socket.inet_aton


def _frontend_key(ip: str, port: int, proto: int, slot: int = 0) -> bytes:
    return _KEY.pack(_aton(ip), _htons(port), slot, proto)


def _service_value(backend_id: int, count: int, rev_nat: int, flags: int, flags2: int) -> bytes:
    return _SERVICE.pack(backend_id, count, rev_nat, flags, flags2)


def _backend_value(ip: str, port: int, proto: int, state: int) -> bytes:
    return _BACKEND.pack(_aton(ip), _htons(port), proto, state, 0, 0)


def _is_master(key: bytes) -> bool:
    return key[6:8] == b"\0\0"


def _is_slot(key: bytes) -> bool:
    return key[6:8] != b"\0\0"


def _flatten(frontends: Iterable[_Frontend]) -> _Tables:
    out = _Tables()
    for fe in frontends:
        out.services.update(fe.services)
        out.rev_nat.update(fe.rev_nat)
        out.maglev.update(fe.maglev)
        out.backends.update(fe.backends)
    return out


class ServiceMaps:
    """Diffing writer of cilium_lb4_* for one node (the only writer of these maps).

    `apply(all services)` is the full sync (start, resync); `update(upserts, removed)`
    touches only the named frontends (one Service or EndpointSlice event), so its cost does
    not grow with the number of services on the node.
    """

    def __init__(self, maps: dict[str, bpf.BpfMap[Any, Any]], *, algorithm: str = "random",
                 maglev_table_size: int = lbmaps.MAGLEV_TABLE_SIZE) -> None:
        if algorithm not in LB_ALGORITHMS:
            raise ValidationError("loadBalancer.algorithm", f"{algorithm!r} not in {list(LB_ALGORITHMS)}")
        self.algorithm = algorithm
        self.maglev_table_size = maglev_table_size  # maglev.tableSize, as the programs were compiled
        self._maps = maps
        self._recovered: _Tables | None = None     # maps read back, until the first full apply
        self._frontends: dict[FrontendKey, _Frontend] | None = None
        self._backend_refs: dict[bytes, int] = {}
        self._frontend_ids: dict[FrontendKey, int] = {}
        self._used_ids: set[int] = set()  # the values of _frontend_ids, kept in step
        self._backend_ids: dict[BackendAddr, int] = {}
        self._next_backend_id = 1
        self._next_frontend_hint = 1

    def _map(self, spec: Any) -> bpf.BpfMap[Any, Any]:
        return self._maps[spec.pin_name]

    # ------------------------------------------------------------------ recovery
    def recover(self) -> None:
        """Read the maps back (after a restart): what is written and which ids are taken."""
        tables = _Tables()
        for spec, table in ((lbmaps.SERVICES_SPEC, tables.services), (lbmaps.BACKENDS_SPEC, tables.backends),
                            (lbmaps.REV_NAT_SPEC, tables.rev_nat), (lbmaps.MAGLEV_SPEC, tables.maglev)):
            table.update(lbmaps.raw_items_batch(self._map(spec)))
        self._frontend_ids.clear()
        self._backend_ids.clear()
        u16, u32 = _U16.unpack_from, _U32.unpack
        self._frontend_ids = {k: u16(v, 6)[0] for k, v in tables.services.items() if k[6:8] == b"\0\0"}
        self._backend_ids = {v[:7]: u32(k)[0] for k, v in tables.backends.items()}
        self._used_ids = set(self._frontend_ids.values())
        self._next_backend_id = max(self._backend_ids.values(), default=0) + 1
        self._recovered = tables
        self._frontends = None

    # ------------------------------------------------------------------ desired entries
    def _frontend_id(self, frontend: FrontendKey) -> int:
        fid = self._frontend_ids.get(frontend)
        if fid is not None:
            return fid
        candidate = self._next_frontend_hint
        for _ in range(MAX_FRONTEND_ID):
            if candidate > MAX_FRONTEND_ID:
                candidate = 1
            if candidate not in self._used_ids:
                self._frontend_ids[frontend] = candidate
                self._used_ids.add(candidate)
                self._next_frontend_hint = candidate + 1
                return candidate
            candidate += 1
        raise ValidationError("services", f"more than {MAX_FRONTEND_ID} frontends on one node")

    def _backend_id(self, backend: BackendAddr) -> int:
        bid = self._backend_ids.get(backend)
        if bid is None:
            bid = self._next_backend_id
            self._next_backend_id += 1
            self._backend_ids[backend] = bid
        return bid

    @staticmethod
    def master_key(ip: str, port: int, protocol: str) -> FrontendKey:
        if protocol not in _PROTO:
            raise ValidationError("protocol", f"{protocol!r} not in {sorted(_PROTO)}")
        try:
            return _KEY.pack(_aton(ip), _htons(port), 0, _PROTO[protocol])
        except (OSError, struct.error, OverflowError):
            raise ValidationError("frontend", f"{ip}:{port} is not an IPv4 address and port") from None

    def _entries(self, svc: LBService, master: FrontendKey) -> _Frontend:
        """The map entries of one frontend (allocating its id and new backend ids)."""
        proto = master[8]
        fid = self._frontend_id(master)
        flags = _FRONTEND_FLAGS[svc.frontend_type]
        flags2 = 0
        if svc.ext_traffic_local and svc.frontend_type != "ClusterIP":
            flags |= lbmaps.SVC_FLAG_EXT_LOCAL_SCOPE
        if svc.int_traffic_local and svc.frontend_type == "ClusterIP":
            flags2 |= lbmaps.SVC_FLAG2_INT_LOCAL_SCOPE
        if svc.session_affinity:
            flags |= lbmaps.SVC_FLAG_AFFINITY
        maglev = self.algorithm == "maglev"
        if maglev:
            flags2 |= lbmaps.SVC_FLAG2_MAGLEV
        flags2 |= lbmaps.CLUSTERMESH_AFFINITY_FLAGS.get(svc.cluster_affinity, 0)
        fe = _Frontend()
        active: list[int] = []
        backend_ids = self._backend_ids
        fe_backends, fe_addrs = fe.backends, fe.backend_l3n4
        for b in svc.backends:
            bproto = _PROTO.get(b.protocol, proto)
            value = _BACKEND.pack(_aton(b.ip), _htons(b.port), bproto, _STATE[b.state], b.cluster_id, 0)
            addr = value[:7]
            bid = backend_ids.get(addr) or self._backend_id(addr)
            bkey = _U32.pack(bid)
            fe_backends[bkey] = value
            fe_addrs[bkey] = addr
            if b.state == BACKEND_ACTIVE:
                active.append(bid)
        address, dport = master[:4], _htons(svc.port)
        services = fe.services
        for slot, bid in enumerate(active, start=1):
            services[_KEY.pack(address, dport, slot, proto)] = _SERVICE.pack(bid, 0, fid, 0, 0)
        services[master] = _SERVICE.pack(svc.affinity_timeout if svc.session_affinity else 0,
                                         len(active), fid, flags, flags2)
        fe.rev_nat[_U16.pack(fid)] = _REV_NAT.pack(address, dport)
        if maglev and active:
            active_names = [f"{b.ip}:{b.port}/{b.protocol}" for b in svc.backends if b.state == BACKEND_ACTIVE]
            table = maglev_table(active_names, self.maglev_table_size)
            fe.maglev[_U32.pack(fid)] = struct.pack(f"={len(table)}I", *(active[i] for i in table))
        return fe

    # ------------------------------------------------------------------ writing
    def _write(self, old: _Tables, new: _Tables, diff: ServiceDiff) -> None:
        """Kernel writes for old -> new, in an order the datapath can read at any moment."""

        def changes(want: dict[bytes, bytes], have: dict[bytes, bytes]) -> tuple[list[tuple[bytes, bytes]],
                                                                                 list[bytes]]:
            if want == have:  # the common case of a resync, compared in C
                return [], []
            get = have.get
            return [(k, v) for k, v in want.items() if get(k) != v], list(have.keys() - want.keys())

        def upsert(spec: Any, items: list[tuple[bytes, bytes]]) -> None:
            if items:
                lbmaps.update_batch(self._map(spec), b"".join(k for k, _ in items),
                                    b"".join(v for _, v in items), len(items))
                diff.entries_written += len(items)

        def remove(spec: Any, keys: list[bytes]) -> None:
            if keys:
                lbmaps.delete_batch(self._map(spec), b"".join(keys), len(keys))
                diff.entries_deleted += len(keys)

        svc_set, svc_del = changes(new.services, old.services)
        be_set, be_del = changes(new.backends, old.backends)
        rn_set, rn_del = changes(new.rev_nat, old.rev_nat)
        mg_set, mg_del = changes(new.maglev, old.maglev)
        upsert(lbmaps.BACKENDS_SPEC, be_set)
        upsert(lbmaps.REV_NAT_SPEC, rn_set)
        upsert(lbmaps.MAGLEV_SPEC, mg_set)
        upsert(lbmaps.SERVICES_SPEC, [kv for kv in svc_set if _is_slot(kv[0])])
        upsert(lbmaps.SERVICES_SPEC, [kv for kv in svc_set if _is_master(kv[0])])
        remove(lbmaps.SERVICES_SPEC, [k for k in svc_del if _is_master(k)])
        remove(lbmaps.SERVICES_SPEC, [k for k in svc_del if _is_slot(k)])
        remove(lbmaps.MAGLEV_SPEC, mg_del)
        remove(lbmaps.REV_NAT_SPEC, rn_del)
        remove(lbmaps.BACKENDS_SPEC, be_del)
        removed_ids = {struct.unpack("=H", k)[0] for k in old.rev_nat if k not in new.rev_nat}
        if removed_ids:
            diff.entries_deleted += self._forget_affinity(removed_ids)

    def apply(self, services: Iterable[LBService]) -> ServiceDiff:
        """Full sync: the maps hold exactly `services` afterwards."""
        started = time.perf_counter()
        if self._frontends is None and self._recovered is None:
            self.recover()
        keyed = {self.master_key(s.ip, s.port, s.protocol): s for s in services}
        for gone in [f for f in self._frontend_ids if f not in keyed]:
            del self._frontend_ids[gone]  # ids of removed frontends are free again
        self._used_ids = set(self._frontend_ids.values())
        frontends = {k: self._entries(s, k) for k, s in keyed.items()}
        old = self._recovered if self._frontends is None else _flatten(self._frontends.values())
        assert old is not None
        new = _flatten(frontends.values())
        diff = self._diff_counts(old, new)
        self._write(old, new, diff)
        self._frontends = frontends
        self._recovered = None
        refs: dict[bytes, int] = {}
        for fe in frontends.values():
            for k in fe.backends:
                refs[k] = refs.get(k, 0) + 1
        self._backend_refs = refs
        self._backend_ids = {addr: bid for addr, bid in self._backend_ids.items() if _U32.pack(bid) in refs}
        diff.seconds = time.perf_counter() - started
        return diff

    def update(self, upserts: Iterable[LBService], removed: Iterable[tuple[str, int, str]] = ()) -> ServiceDiff:
        """Incremental sync of a few frontends: `upserts` replace theirs, `removed`
        ((ip, port, protocol) frontends) go. Needs a full `apply` earlier in this process."""
        started = time.perf_counter()
        if self._frontends is None:
            raise PermanentError("update_services before a full set_services in this process")
        keyed = {self.master_key(s.ip, s.port, s.protocol): s for s in upserts}
        gone = [self.master_key(ip, port, proto) for ip, port, proto in removed]
        old_fes = {f: self._frontends[f] for f in (*keyed, *gone) if f in self._frontends}
        for f in gone:
            if f not in keyed and f in self._frontend_ids:
                self._used_ids.discard(self._frontend_ids.pop(f))
        new_fes = {k: self._entries(s, k) for k, s in keyed.items()}
        old = _flatten(old_fes.values())
        new = _flatten(new_fes.values())
        # backends shared with untouched frontends stay (reference counts)
        refs = self._backend_refs
        for fe in old_fes.values():
            for k in fe.backends:
                refs[k] -= 1
        for fe in new_fes.values():
            for k in fe.backends:
                refs[k] = refs.get(k, 0) + 1
        for k in list(old.backends):
            if refs.get(k, 0) > 0 and k not in new.backends:
                new.backends[k] = old.backends[k]  # still used elsewhere: keep as is
        for fe in old_fes.values():
            for k, addr in fe.backend_l3n4.items():
                if refs.get(k, 0) <= 0:
                    refs.pop(k, None)
                    self._backend_ids.pop(addr, None)
        diff = self._diff_counts(old, new)
        self._write(old, new, diff)
        for f in old_fes:
            self._frontends.pop(f, None)
        self._frontends.update(new_fes)
        diff.frontends = len(self._frontends)
        diff.seconds = time.perf_counter() - started
        return diff

    @staticmethod
    def _diff_counts(old: _Tables, new: _Tables) -> ServiceDiff:
        old_fe = {k for k in old.services if _is_master(k)}
        new_fe = {k for k in new.services if _is_master(k)}
        return ServiceDiff(frontends=len(new_fe), frontends_added=len(new_fe - old_fe),
                           frontends_removed=len(old_fe - new_fe))

    def _forget_affinity(self, frontend_ids: set[int]) -> int:
        """Client->backend pins of removed frontends (Cilium cleans them too): their ids may be
        given to new frontends."""
        affinity = self._map(lbmaps.AFFINITY_SPEC)
        stale = [bytes(k) for k, _ in lbmaps.items_batch(affinity) if k.rev_nat_id in frontend_ids]
        if stale:
            lbmaps.delete_batch(affinity, b"".join(stale), len(stale))
        return len(stale)

    def forget(self) -> None:
        """Drop the cache (the next apply reads the maps back, as after a restart)."""
        self._frontends = None
        self._recovered = None


@dataclass(frozen=True)
class BackendView:
    """One slotted backend of a frontend; `cluster_id` 0 = this cluster (Cluster Mesh: else the remote's)."""

    id: int
    address: str
    state: str
    cluster_id: int = 0
    preferred: bool = False  # on the side a global Service's affinity prefers (Cilium's `(preferred)`)

    @property
    def remote(self) -> bool:
        return self.cluster_id != 0

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "address": self.address, "state": self.state, "cluster_id": self.cluster_id,
                "remote": self.remote, "preferred": self.preferred}


@dataclass(frozen=True)
class ServiceView:
    """One frontend as `propolis service list` shows it (read from the maps)."""

    id: int
    frontend: str
    protocol: str
    flags: list[str]
    backends: list[BackendView]
    affinity_timeout: int

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "frontend": self.frontend, "protocol": self.protocol, "flags": self.flags,
                "affinity_timeout": self.affinity_timeout, "backends": [b.to_json() for b in self.backends]}


def read_services(services_map: bpf.BpfMap[Any, Any], backends_map: bpf.BpfMap[Any, Any]) -> list[ServiceView]:
    """Frontends with the backends new connections can get (their slots), as the datapath
    sees them. Terminating backends kept for established flows are in no slot, so the maps
    cannot tell which service they belong to and they are not listed."""
    rows = lbmaps.dump_services(services_map)
    backends = lbmaps.dump_backends(backends_map)
    masters = {(r.frontend, r.proto): r for r in rows if r.slot == 0}
    slots: dict[tuple[str, int], list[lbmaps.ServiceRow]] = {}
    for r in rows:
        if r.slot:
            slots.setdefault((r.frontend, r.proto), []).append(r)
    out = []
    for key, m in sorted(masters.items(), key=lambda kv: kv[1].rev_nat_index):
        listed = []
        prefers_local = bool(m.flags2 & lbmaps.SVC_FLAG2_CLUSTERMESH_AFFINITY_LOCAL)
        prefers_remote = bool(m.flags2 & lbmaps.SVC_FLAG2_CLUSTERMESH_AFFINITY_REMOTE)
        for r in sorted(slots.get(key, []), key=lambda r: r.slot):
            if r.slot > m.count:
                continue
            ip, port, _proto, state, cluster_id = backends.get(r.backend_id, ("?", 0, 0, 0, 0))
            preferred = prefers_remote if cluster_id else prefers_local
            listed.append(BackendView(r.backend_id, f"{ip}:{port}", lbmaps.BE_STATE_NAMES.get(state, str(state)),
                                      cluster_id, preferred))
        affinity = m.backend_id if m.flags & lbmaps.SVC_FLAG_AFFINITY else 0
        out.append(ServiceView(m.rev_nat_index, m.frontend, lbmaps.PROTO_NAMES.get(m.proto, str(m.proto)),
                               lbmaps.flag_names(m.flags, m.flags2) or ["ClusterIP"], listed, affinity))
    return out
