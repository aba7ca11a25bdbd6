"""Compile bpf/bpf_lxc.c once per node with bcc, adopting the node's pinned maps.

Why once per node: every endpoint-specific value lives in maps, so one compile (~2 s)
serves every pod on the node; adding a pod is map writes plus a tc attach.
Why the include expansion: bcc rewrites map method calls (`map.lookup(&k)`) only in the
main source text, so bpf/lib/*.h are inlined textually before compiling.
Pinned maps: bcc reuses a map already pinned at the path (the writer restarts without
losing conntrack, policy or endpoints) and creates+pins it otherwise; maps whose layout
changed are refused before compiling, never flushed.
Pinned programs: the compiled programs are pinned under <pin_dir>/progs/<digest of source
and flags>/, so a restarted writer with the same build adopts them in milliseconds
instead of compiling again (only if they still use the node's pinned maps).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from propolis.errors import PermanentError
from propolis.maps import ALL_SPECS, bpf, events
from propolis.maps.spec import MapSpec

PROGRAM_FROM_CONTAINER = "cil_from_container"
PROGRAM_TO_CONTAINER = "cil_to_container"
PROGRAM_FROM_NETDEV = "cil_from_netdev"  # bpf_host.c: NodePort on the node's underlay interface
PROGRAM_TO_NETDEV = "cil_to_netdev"  # bpf_host.c: encryption.strictMode on the node's underlay interface
#: bpf_sock.c: socket LB, cgroup sock_addr programs -> the attach type each is loaded for
SOCK_PROGRAMS = {"cil_sock4_connect": bpf.BPF_CGROUP_INET4_CONNECT, "cil_sock4_sendmsg": bpf.BPF_CGROUP_UDP4_SENDMSG,
                 "cil_sock4_recvmsg": bpf.BPF_CGROUP_UDP4_RECVMSG,
                 "cil_sock4_getpeername": bpf.BPF_CGROUP_INET4_GETPEERNAME}
PROGRAM_NAMES = (PROGRAM_FROM_CONTAINER, PROGRAM_TO_CONTAINER, PROGRAM_FROM_NETDEV, PROGRAM_TO_NETDEV, *SOCK_PROGRAMS)
MAIN_SOURCES = ("bpf_lxc.c", "bpf_host.c", "bpf_sock.c")  # one compile unit: shared maps, one compile per node

_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"')


def bpf_source_dir() -> Path:
    """bpf/ of the source tree ($PROPOLIS_BPF_DIR overrides)."""
    env = os.environ.get("PROPOLIS_BPF_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "bpf"


def render_source(main: Path, root: Path, seen: set[str] | None = None) -> str:
    """The program with its quoted #includes expanded once each (in order)."""
    seen = set() if seen is None else seen

    def expand(path: Path) -> str:
        out: list[str] = []
        for line in path.read_text().splitlines(keepends=True):
            match = _INCLUDE.match(line)
            if not match:
                out.append(line)
                continue
            name = match.group(1)
            if name not in seen:
                seen.add(name)
                out.append(expand(root / name))
        return "".join(out)

    return expand(main)


def render_program(root: Path) -> str:
    """Every entry file of the node (MAIN_SOURCES) as one unit, each header once."""
    seen: set[str] = set()
    return "".join(render_source(root / name, root, seen) for name in MAIN_SOURCES)


def compile_flags(node: str, pin_dir: str, specs: tuple[MapSpec, ...] = ALL_SPECS) -> list[str]:
    flags = [f'-DPIN_DIR="{pin_dir}"', f'-DNODE_NAME="{node}"']
    from propolis.maps import policy
    for spec in (*specs, policy.INNER_SPEC):
        if spec.size_define:
            flags.append(f"-D{spec.size_define}={spec.max_entries}")
    flags.append(f"-DEVENTS_RINGBUF_PAGES={events.RINGBUF_PAGES}")
    return flags


def check_pins(pin_dir: str, specs: tuple[MapSpec, ...] = ALL_SPECS) -> list[str]:
    """Refuse pinned maps this build cannot use (layout or size changed); return the adopted ones."""
    adopted: list[str] = []
    for spec in specs:
        path = spec.path(pin_dir)
        if not os.path.exists(path):
            continue
        fd = bpf.obj_get(path)
        try:
            info = bpf.obj_info(fd)
        finally:
            os.close(fd)
        if spec.map_type == bpf.BPF_MAP_TYPE_RINGBUF:
            expected = (spec.map_type, 0, 0, spec.max_entries)
        else:
            expected = (spec.map_type, ctypes.sizeof(spec.key_type), ctypes.sizeof(spec.value_type), spec.max_entries)
        actual = (info.type, info.key_size, info.value_size, info.max_entries)
        if actual != expected:
            raise PermanentError(
                f"pinned map {path} is (type, key, value, max) {actual}, this build needs {expected}: "
                "remove the node's pins (propolis bpf pins remove --node NODE) or run the matching build")
        adopted.append(spec.pin_name)
    return adopted


@dataclass
class LoadedPrograms:
    """The programs of one node (kept alive while the writer runs)."""

    module: Any  # bcc.BPF when compiled here, None when adopted from pins
    from_container_fd: int
    to_container_fd: int
    compile_seconds: float
    adopted_pins: list[str]
    digest: str = ""
    from_netdev_fd: int = -1
    to_netdev_fd: int = -1
    sock_fds: dict[str, int] = field(default_factory=dict)  # SOCK_PROGRAMS name -> fd
    sock_error: str = ""  # why sock_fds is empty (the kernel refused bpf_sock.c)

    @property
    def compiled(self) -> bool:
        return self.module is not None

    def table(self, c_name: str) -> Any:
        """bcc's view of a map (Key/Leaf ctypes) — used by the layout test."""
        if self.module is None:
            raise PermanentError("programs were adopted from pins: no bcc tables in this process")
        return self.module[c_name.encode()]

    def close(self) -> None:
        if self.module is not None:
            self.module.cleanup()
            self.module = None
        else:
            for fd in (self.from_container_fd, self.to_container_fd, self.from_netdev_fd, self.to_netdev_fd,
                       *self.sock_fds.values()):
                if fd >= 0:
                    os.close(fd)
        self.sock_fds = {}
        self.from_container_fd = self.to_container_fd = self.from_netdev_fd = self.to_netdev_fd = -1


PROGS_DIR = "progs"


def source_digest(text: str, flags: list[str]) -> str:
    return hashlib.sha256("\0".join([text, *flags]).encode()).hexdigest()[:16]


def _pinned_map_ids(pin_dir: str) -> set[int]:
    ids: set[int] = set()
    for spec in ALL_SPECS:
        fd = bpf.obj_get(spec.path(pin_dir))
        try:
            ids.add(bpf.obj_info(fd).id)
        finally:
            os.close(fd)
    return ids


def _adopt_pinned_programs(pin_dir: str, digest: str) -> tuple[int, ...] | None:
    """The pinned programs of this exact build, if they use the node's pinned maps."""
    prog_dir = os.path.join(pin_dir, PROGS_DIR, digest)
    fds: list[int] = []
    try:
        for name in PROGRAM_NAMES:
            fds.append(bpf.obj_get(os.path.join(prog_dir, name)))
    except (FileNotFoundError, bpf.BpfError):
        for fd in fds:
            os.close(fd)
        return None
    try:
        pinned_maps = _pinned_map_ids(pin_dir)
        uses: set[int] = set()
        for fd in fds:
            uses |= set(bpf.prog_map_ids(fd))
        # the programs must use the pinned maps (the inner-map template is private to them)
        if len(pinned_maps - uses) == 0:
            return tuple(fds)
    except (FileNotFoundError, bpf.BpfError):
        pass
    for fd in fds:
        os.close(fd)
    return None


def _pin_programs(pin_dir: str, digest: str, fds: tuple[int, ...]) -> None:
    """Pin this build's programs and drop pins of other builds (attached ones stay attached)."""
    progs = os.path.join(pin_dir, PROGS_DIR)
    os.makedirs(progs, exist_ok=True)
    for other in os.listdir(progs):
        if other != digest:
            _unlink_tree(os.path.join(progs, other))
    target = os.path.join(progs, digest)
    os.makedirs(target, exist_ok=True)
    for name, fd in zip(PROGRAM_NAMES, fds):
        path = os.path.join(target, name)
        if os.path.exists(path):
            os.unlink(path)
        bpf.obj_pin(fd, path)


def _unlink_tree(path: str) -> None:
    if os.path.isdir(path):
        for name in os.listdir(path):
            _unlink_tree(os.path.join(path, name))
        os.rmdir(path)
    else:
        os.unlink(path)


def node_specs(sizes: dict[str, int] | None = None,
               maglev_table_size: int | None = None) -> tuple[MapSpec, ...]:
    """ALL_SPECS as this node's settings make them: sizes from memory, Maglev table size."""
    from propolis.maps import lb, sizing
    specs = sizing.sized(ALL_SPECS, sizes or {})
    if maglev_table_size is None:
        return specs
    maglev = lb.maglev_spec(maglev_table_size)
    return tuple(maglev if s.pin_name == maglev.pin_name else s for s in specs)


def compile_programs(node: str, pin_dir: str, *, reuse_pinned: bool = True,
                     sizes: dict[str, int] | None = None,
                     maglev_table_size: int | None = None) -> LoadedPrograms:
    """Load bpf_lxc.c for `node`, pinning/adopting maps under `pin_dir`.

    Adopts this build's pinned programs when they exist (no compile), else compiles with
    bcc and pins the result. `sizes` (pin name -> max_entries, `propolis.maps.sizing`)
    overrides the specs' fixed sizes; `maglev_table_size` is maglev.tableSize.
    """
    from propolis.maps import lb, sizing
    os.makedirs(pin_dir, exist_ok=True)
    specs = node_specs(sizes, maglev_table_size)
    adopted = check_pins(pin_dir, specs)
    root = bpf_source_dir()
    text = render_program(root)
    flags = compile_flags(node, pin_dir, specs + sizing.sized(lb.NETDEV_SPECS, sizes or {}))
    if maglev_table_size is not None:
        flags.append(f"-DLB_MAGLEV_TABLE_SIZE={maglev_table_size}")
    digest = source_digest(text, flags)
    started = time.perf_counter()
    if reuse_pinned and len(adopted) == len(ALL_SPECS):
        fds = _adopt_pinned_programs(pin_dir, digest)
        if fds is not None:
            return LoadedPrograms(None, fds[0], fds[1], time.perf_counter() - started, adopted, digest, fds[2],
                                  fds[3], dict(zip(SOCK_PROGRAMS, fds[4:])))

    from bcc import BPF  # imported here: the CLI and readers never need bcc
    try:
        module = BPF(text=text.encode(), cflags=flags)
        from_fn = module.load_func(PROGRAM_FROM_CONTAINER.encode(), BPF.SCHED_CLS)
        to_fn = module.load_func(PROGRAM_TO_CONTAINER.encode(), BPF.SCHED_CLS)
        netdev_fn = module.load_func(PROGRAM_FROM_NETDEV.encode(), BPF.SCHED_CLS)
        to_netdev_fn = module.load_func(PROGRAM_TO_NETDEV.encode(), BPF.SCHED_CLS)
    except Exception as exc:
        raise PermanentError(f"compile/load bpf_lxc.c for node {node}: {exc}") from exc
    sock_fds, sock_error = _load_sock_programs(module)
    elapsed = time.perf_counter() - started
    _pin_programs(pin_dir, digest, (from_fn.fd, to_fn.fd, netdev_fn.fd, to_netdev_fn.fd, *sock_fds.values()))
    return LoadedPrograms(module, from_fn.fd, to_fn.fd, elapsed, adopted, digest, netdev_fn.fd, to_netdev_fn.fd,
                          sock_fds, sock_error)


def _load_sock_programs(module: Any) -> tuple[dict[str, int], str]:
    """bpf_sock.c's programs, or why the kernel refused them: socket LB is then off and says why, the rest
    of the datapath does not need it (cgroup sock_addr programs want bpf_get_netns_cookie, 5.7, and
    bpf_set_retval, 5.18). Pinned after the tc programs, so a build without them pins those alone."""
    from bcc import BPF
    try:
        return {name: module.load_func(name.encode(), BPF.CGROUP_SOCK_ADDR, attach_type=attach_type).fd
                for name, attach_type in SOCK_PROGRAMS.items()}, ""
    except Exception as exc:  # noqa: BLE001 - bcc raises Exception with the verifier's verdict
        return {}, f"the kernel refused bpf_sock.c: {exc}"
