"""Raw bpf(2) syscalls through ctypes: open pinned maps, create/pin maps, read and write
elements, run a program on a test packet.

Why not bcc here: the CLI, the observer and the tests must read the pinned maps of a
running node without compiling anything (bcc costs ~2 s and an LLVM in memory); a pinned
path plus these few syscalls is enough. The datapath-writer compiles with bcc once
(propolis.datapath.loader) and then talks to maps through this module too.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long

SYS_BPF = 321  # x86_64

BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_PROG_TEST_RUN = 10
BPF_OBJ_GET_INFO_BY_FD = 15

BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2
BPF_F_NO_PREALLOC = 1

BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_PERCPU_HASH = 5
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_LRU_HASH = 9
BPF_MAP_TYPE_LPM_TRIE = 11
BPF_MAP_TYPE_HASH_OF_MAPS = 13
BPF_MAP_TYPE_RINGBUF = 27

PERCPU_TYPES = {BPF_MAP_TYPE_PERCPU_HASH, BPF_MAP_TYPE_PERCPU_ARRAY}

_ATTR_SIZE = 128


class BpfError(OSError):
    """A bpf(2) call failed; `errno` says why, the message says what was being done."""


def _bpf(cmd: int, attr: ctypes.Array[ctypes.c_char], what: str) -> int:
    ret = _libc.syscall(SYS_BPF, cmd, ctypes.byref(attr), _ATTR_SIZE)
    if ret < 0:
        err = ctypes.get_errno()
        raise BpfError(err, f"{what}: {os.strerror(err)}")
    return int(ret)


def _attr() -> ctypes.Array[ctypes.c_char]:
    return ctypes.create_string_buffer(_ATTR_SIZE)


def _addr(obj: Any) -> int:
    return ctypes.addressof(obj)


@functools.cache
def possible_cpus() -> int:
    """Number of possible CPUs: the stride of per-CPU map values."""
    with open("/sys/devices/system/cpu/possible") as f:
        text = f.read().strip()
    count = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        count += (int(hi) if hi else int(lo)) - int(lo) + 1
    return count


@dataclass(frozen=True)
class MapInfo:
    """What the kernel says about a map (bpftool map show)."""

    type: int
    id: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    name: str


def obj_get(path: str) -> int:
    """Open a pinned object; FileNotFoundError when nothing is pinned there."""
    cpath = ctypes.create_string_buffer(os.fsencode(path))
    attr = _attr()
    struct.pack_into("=Q", attr, 0, _addr(cpath))
    try:
        return _bpf(BPF_OBJ_GET, attr, f"open pinned {path}")
    except BpfError as exc:
        if exc.errno == errno.ENOENT:
            raise FileNotFoundError(errno.ENOENT, f"nothing pinned at {path}") from None
        raise


def obj_pin(fd: int, path: str) -> None:
    cpath = ctypes.create_string_buffer(os.fsencode(path))
    attr = _attr()
    struct.pack_into("=QI", attr, 0, _addr(cpath), fd)
    _bpf(BPF_OBJ_PIN, attr, f"pin at {path}")


def obj_info(fd: int) -> MapInfo:
    info = ctypes.create_string_buffer(80)
    attr = _attr()
    struct.pack_into("=IIQ", attr, 0, fd, len(info), _addr(info))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr, f"info of fd {fd}")
    mtype, mid, ksz, vsz, maxe, flags = struct.unpack_from("=6I", info, 0)
    name = info.raw[24:40].split(b"\0", 1)[0].decode()
    return MapInfo(mtype, mid, ksz, vsz, maxe, flags, name)


def prog_map_ids(fd: int, max_maps: int = 64) -> list[int]:
    """Ids of the maps a loaded program uses (to check adopted programs use the pinned maps)."""
    ids = (ctypes.c_uint32 * max_maps)()
    info = ctypes.create_string_buffer(232)
    struct.pack_into("=IQ", info, 52, max_maps, _addr(ids))
    attr = _attr()
    struct.pack_into("=IIQ", attr, 0, fd, len(info), _addr(info))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr, f"info of program fd {fd}")
    count, = struct.unpack_from("=I", info, 52)
    return list(ids[:min(count, max_maps)])


def create_map(map_type: int, key_size: int, value_size: int, max_entries: int,
               flags: int = 0, name: str = "", inner_map_fd: int = 0) -> int:
    attr = _attr()
    struct.pack_into("=6I", attr, 0, map_type, key_size, value_size, max_entries, flags, inner_map_fd)
    encoded = name.encode()[:15]
    ctypes.memmove(ctypes.addressof(attr) + 28, encoded, len(encoded))  # map_name, after numa_node
    return _bpf(BPF_MAP_CREATE, attr, f"create map {name}")


K = TypeVar("K", bound=ctypes.Structure)
V = TypeVar("V")


class BpfMap(Generic[K, V]):
    """One open BPF map with typed keys and values (ctypes).

    Per-CPU maps return a list of values (one per possible CPU) from lookup/items.
    Closing is explicit (or a `with` block); the map itself lives on while pinned.
    """

    def __init__(self, fd: int, key_type: type[K], value_type: type[Any], *,
                 path: str | None = None, percpu: bool = False) -> None:
        self.fd = fd
        self.key_type = key_type
        self.value_type = value_type
        self.path = path
        self.percpu = percpu
        self._value_stride = (ctypes.sizeof(value_type) + 7) // 8 * 8
        self._value_buf_size = self._value_stride * possible_cpus() if percpu else ctypes.sizeof(value_type)

    @classmethod
    def open_pinned(cls, path: str, key_type: type[K], value_type: type[Any], *,
                    percpu: bool = False, check: bool = True) -> BpfMap[K, V]:
        fd = obj_get(path)
        bpf_map: BpfMap[K, V] = cls(fd, key_type, value_type, path=path, percpu=percpu)
        if check:
            info = obj_info(fd)
            expected_value = ctypes.sizeof(value_type)
            if info.key_size != ctypes.sizeof(key_type) or info.value_size != expected_value:
                bpf_map.close()
                raise BpfError(errno.EINVAL, f"{path}: pinned map has key/value size "
                               f"{info.key_size}/{info.value_size}, this build expects "
                               f"{ctypes.sizeof(key_type)}/{expected_value} (layout changed?)")
        return bpf_map

    def info(self) -> MapInfo:
        return obj_info(self.fd)

    def pin(self, path: str) -> None:
        obj_pin(self.fd, path)
        self.path = path

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> BpfMap[K, V]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # best effort; fds are cheap but finite
        try:
            self.close()
        except Exception:  # noqa: BLE001 - closing on the way out: a failure changes nothing
            pass

    # -- element operations --------------------------------------------------------
    def _elem_attr(self, key: Any, value_addr: int, flags: int = 0) -> ctypes.Array[ctypes.c_char]:
        attr = _attr()
        struct.pack_into("=IIQQQ", attr, 0, self.fd, 0, _addr(key) if key is not None else 0, value_addr, flags)
        return attr

    def _decode_value(self, buf: ctypes.Array[ctypes.c_char]) -> Any:
        if not self.percpu:
            return self.value_type.from_buffer_copy(buf)
        return [self.value_type.from_buffer_copy(buf, i * self._value_stride) for i in range(possible_cpus())]

    def lookup(self, key: K) -> Any | None:
        buf = ctypes.create_string_buffer(self._value_buf_size)
        try:
            _bpf(BPF_MAP_LOOKUP_ELEM, self._elem_attr(key, _addr(buf)), f"lookup in {self.path}")
        except BpfError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise
        return self._decode_value(buf)

    def update(self, key: K, value: Any, flags: int = BPF_ANY) -> None:
        if self.percpu:
            buf = ctypes.create_string_buffer(self._value_buf_size)
            for i in range(possible_cpus()):
                ctypes.memmove(ctypes.addressof(buf) + i * self._value_stride, ctypes.addressof(value), ctypes.sizeof(value))
            addr = _addr(buf)
        else:
            addr = _addr(value)
        _bpf(BPF_MAP_UPDATE_ELEM, self._elem_attr(key, addr, flags), f"update in {self.path}")

    def delete(self, key: K) -> bool:
        """Delete; False when the key was not there (idempotent delete)."""
        try:
            _bpf(BPF_MAP_DELETE_ELEM, self._elem_attr(key, 0), f"delete in {self.path}")
        except BpfError as exc:
            if exc.errno == errno.ENOENT:
                return False
            raise
        return True

    def keys(self) -> Iterator[K]:
        key: K | None = None
        while True:
            next_key = self.key_type()
            try:
                _bpf(BPF_MAP_GET_NEXT_KEY, self._elem_attr(key, _addr(next_key)), f"iterate {self.path}")
            except BpfError as exc:
                if exc.errno == errno.ENOENT:
                    return
                raise
            yield next_key
            key = next_key

    def items(self) -> Iterator[tuple[K, Any]]:
        for key in list(self.keys()):
            value = self.lookup(key)
            if value is not None:
                yield key, value

    def clear(self) -> int:
        count = 0
        for key in list(self.keys()):
            count += self.delete(key)
        return count


def prog_test_run(prog_fd: int, data: bytes, *, repeat: int = 1, ctx: bytes | None = None,
                  data_out_size: int = 2048) -> tuple[int, int, bytes]:
    """BPF_PROG_TEST_RUN: run a program on `data` in the kernel.

    Returns (program return value, average duration in ns, packet after the run).
    """
    data_in = ctypes.create_string_buffer(data, len(data))
    data_out = ctypes.create_string_buffer(max(data_out_size, len(data) + 256))
    ctx_in = ctypes.create_string_buffer(ctx, len(ctx)) if ctx else None
    attr = _attr()
    struct.pack_into("=IIIIQQII", attr, 0, prog_fd, 0, len(data), len(data_out),
                     _addr(data_in), _addr(data_out), repeat, 0)
    if ctx_in is not None:
        struct.pack_into("=IIQQ", attr, 40, len(ctx_in), 0, _addr(ctx_in), 0)
    _bpf(BPF_PROG_TEST_RUN, attr, "BPF_PROG_TEST_RUN")
    retval, = struct.unpack_from("=I", attr, 4)
    size_out, = struct.unpack_from("=I", attr, 12)
    duration, = struct.unpack_from("=I", attr, 36)
    return retval, duration, data_out.raw[:size_out]


# ---- bpf_link: programs attached to a cgroup (socket LB) ----------------------------------
BPF_PROG_QUERY = 16
BPF_LINK_CREATE = 28
BPF_LINK_UPDATE = 29
BPF_LINK_DETACH = 34
BPF_PROG_TYPE_CGROUP_SOCK_ADDR = 18
BPF_CGROUP_INET4_CONNECT = 10
BPF_CGROUP_UDP4_SENDMSG = 14
BPF_CGROUP_UDP4_RECVMSG = 19
BPF_CGROUP_INET4_GETPEERNAME = 29


@dataclass(frozen=True)
class LinkInfo:
    """What the kernel says about a cgroup link: its program and where it is attached (cgroup id 0 = detached)."""

    id: int
    prog_id: int
    cgroup_id: int
    attach_type: int


def link_create(prog_fd: int, target_fd: int, attach_type: int) -> int:
    """BPF_LINK_CREATE: attach a program to a cgroup (target_fd) through a link; returns the link's fd.
    The program stays attached while the link lives (an fd or a pin), and only this link can remove it."""
    attr = _attr()
    struct.pack_into("=IIII", attr, 0, prog_fd, target_fd, attach_type, 0)
    return _bpf(BPF_LINK_CREATE, attr, f"link program fd {prog_fd} to fd {target_fd} (attach type {attach_type})")


def link_update(link_fd: int, new_prog_fd: int) -> None:
    """BPF_LINK_UPDATE: put another program behind a link, atomically (no moment without one)."""
    attr = _attr()
    struct.pack_into("=IIII", attr, 0, link_fd, new_prog_fd, 0, 0)
    _bpf(BPF_LINK_UPDATE, attr, f"update link fd {link_fd} to program fd {new_prog_fd}")


def link_detach(link_fd: int) -> None:
    """BPF_LINK_DETACH: detach now, even while the link is still pinned or open elsewhere."""
    attr = _attr()
    struct.pack_into("=I", attr, 0, link_fd)
    _bpf(BPF_LINK_DETACH, attr, f"detach link fd {link_fd}")


def link_info(link_fd: int) -> LinkInfo:
    info = ctypes.create_string_buffer(64)
    attr = _attr()
    struct.pack_into("=IIQ", attr, 0, link_fd, len(info), _addr(info))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr, f"info of link fd {link_fd}")
    _type, link_id, prog_id = struct.unpack_from("=III", info, 0)
    cgroup_id, attach_type = struct.unpack_from("=QI", info, 16)
    return LinkInfo(link_id, prog_id, cgroup_id, attach_type)


def prog_query(target_fd: int, attach_type: int, max_progs: int = 64) -> list[int]:
    """BPF_PROG_QUERY: ids of the programs attached to a cgroup directly (not inherited) for `attach_type`."""
    ids = (ctypes.c_uint32 * max_progs)()
    attr = _attr()
    struct.pack_into("=IIIIQI", attr, 0, target_fd, attach_type, 0, 0, _addr(ids), max_progs)
    _bpf(BPF_PROG_QUERY, attr, f"query programs on fd {target_fd} (attach type {attach_type})")
    count, = struct.unpack_from("=I", attr, 24)
    return list(ids[:min(count, max_progs)])


def prog_id(prog_fd: int) -> int:
    """The kernel's id of a loaded program."""
    return obj_info(prog_fd).id
