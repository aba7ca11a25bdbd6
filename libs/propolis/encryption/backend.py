"""The WireGuard device `cilium_wg0` and its peers, kernel or userspace, behind one interface.

`WireguardBackend` is what the key manager's reconciler targets call; which
implementation runs is decided once (`select_backend`):

* `UserspaceBackend` — Debian's ``wireguard-go`` in the node's network
  namespace, configured over its UAPI socket (`uapi`). This is what runs on this
  kernel, which has no WireGuard module. The process is started in its own
  session and outlives the key manager: a restarted key manager finds the
  socket answering and adopts the running device, so established tunnels are
  never torn down by a restart. Its socket directory is the node's own (bind
  mounted over /run/wireguard in a private mount namespace of wireguard-go
  only), so every sandbox node can have a `cilium_wg0`. Its UDP sockets get
  7 MiB buffers (`size_udp_sockets`), as newer wireguard-go asks for itself.
* `KernelBackend` — pyroute2's generic-netlink WireGuard API, where the kernel
  has the module. This kernel lacks it, so this backend is checked here only at
  the level of the requests it builds (`KernelBackend.device_request`,
  `peer_request`; tests/encryption/test_backend_requests.py), never against a
  device.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Protocol

from propolis.encryption import keys
from propolis.encryption.uapi import (
    DeviceState,
    PeerConfig,
    PeerState,
    UapiClient,
    remove_peer_request,
    set_device_request,
    set_peer_request,
)
from propolis.errors import PermanentError, TemporaryError

log = logging.getLogger("propolis.encryption.backend")

DEVICE = "cilium_wg0"
LISTEN_PORT = 51871
#: Where wireguard-go puts `<device>.sock` (compiled in; we bind-mount the node's own directory over it).
WIREGUARD_GO_SOCKET_DIR = Path("/run/wireguard")
DEVICE_START_TIMEOUT_S = 5.0
#: wireguard-go >= 0.0.20230223 asks for these socket buffers itself (conn/bind_std.go); Debian's 0.0.20220316
#: keeps the 208 KiB default, and its receiving socket overflowed under a single TCP stream (UdpRcvbufErrors:
#: 40,705 of 217,028 datagrams in 10 s, each loss a TCP retransmission inside the tunnel).
SOCKET_BUFFER_BYTES = 7 << 20
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33  # asm-generic/socket.h: beyond net.core.[rw]mem_max (CAP_NET_ADMIN)
SYS_PIDFD_GETFD = 438


def size_udp_sockets(pid: int, port: int, size: int = SOCKET_BUFFER_BYTES) -> int:
    """Give the UDP sockets process `pid` has bound to `port` `size`-byte send and receive buffers; returns how
    many. Through a copy of each descriptor (pidfd_getfd): the socket is shared, so the setting is its; the copy
    is closed at once."""
    libc = ctypes.CDLL(None, use_errno=True)
    inodes = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        link = os.readlink(f"/proc/{pid}/fd/{fd}")
        if link.startswith("socket:["):
            inodes[link[len("socket:["):-1]] = int(fd)
    sized = 0
    for table in ("udp", "udp6"):
        for row in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = row.split()
            if int(fields[1].rsplit(":", 1)[1], 16) != port or fields[9] not in inodes:
                continue
            pidfd = os.pidfd_open(pid)
            try:
                copy = libc.syscall(SYS_PIDFD_GETFD, pidfd, inodes[fields[9]], 0)
            finally:
                os.close(pidfd)
            if copy < 0:
                raise OSError(ctypes.get_errno(), f"pidfd_getfd of pid {pid} fd {inodes[fields[9]]}")
            with socket.socket(fileno=copy) as sock:
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
                sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, size)
            sized += 1
    return sized


class WireguardBackend(Protocol):
    kind: str  # "kernel" | "wireguard-go"

    async def ensure_device(self, *, private_key: str, listen_port: int, fwmark: int = 0) -> bool:
        """Create or adopt the device and set its key, port and the mark of its own UDP packets (so they are
        not routed back into the device); True if a running device was adopted."""
        ...

    async def device(self) -> DeviceState: ...
    async def set_peer(self, peer: PeerConfig) -> None: ...
    async def remove_peer(self, public_key: str) -> None: ...
    def describe(self) -> dict[str, Any]: ...


# --- userspace: wireguard-go over UAPI ----------------------------------------------------------

CLONE_NEWNET = 0x40000000
CLONE_NEWNS = 0x00020000
MS_REC, MS_PRIVATE, MS_BIND = 0x4000, 0x40000, 0x1000


def _enter_device_namespaces(netns_path: str | None, socket_dir: Path) -> None:
    """preexec of wireguard-go: the node's network namespace, and its own socket directory."""
    libc = ctypes.CDLL(None, use_errno=True)
    if netns_path:
        fd = os.open(netns_path, os.O_RDONLY)
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {netns_path}")
        os.close(fd)
    if socket_dir != WIREGUARD_GO_SOCKET_DIR:
        if libc.unshare(CLONE_NEWNS) != 0:
            raise OSError(ctypes.get_errno(), "unshare mount namespace")
        if libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
            raise OSError(ctypes.get_errno(), "make / private")
        if libc.mount(str(socket_dir).encode(), str(WIREGUARD_GO_SOCKET_DIR).encode(), None, MS_BIND, None) != 0:
            raise OSError(ctypes.get_errno(), f"bind {socket_dir} on {WIREGUARD_GO_SOCKET_DIR}")


class UserspaceBackend:
    """wireguard-go, one process per node, configured over `<socket_dir>/cilium_wg0.sock`."""

    kind = "wireguard-go"

    def __init__(self, *, state_dir: Path, netns: str | None, binary: str = "wireguard-go",
                 device: str = DEVICE, extra_env: dict[str, str] | None = None) -> None:
        self.state_dir = state_dir
        self.socket_dir = state_dir / "sock"
        self.netns = netns
        self.binary = binary
        self.device_name = device
        self.extra_env = extra_env or {}
        self.uapi = UapiClient(self.socket_dir / f"{device}.sock")
        self.pid = 0
        self.adopted = False
        self.started_at = 0.0

    @property
    def pid_file(self) -> Path:
        return self.state_dir / "wireguard-go.pid"

    def describe(self) -> dict[str, Any]:
        return {"backend": self.kind, "pid": self.pid, "socket": str(self.uapi.socket_path), "adopted": self.adopted}

    async def ensure_device(self, *, private_key: str, listen_port: int, fwmark: int = 0) -> bool:
        self.adopted = await self.uapi.alive()
        if self.adopted:
            try:
                self.pid = int(self.pid_file.read_text())
            except (FileNotFoundError, ValueError):
                self.pid = 0
            log.info("adopted running wireguard-go (pid %s) at %s", self.pid or "?", self.uapi.socket_path)
        else:
            await self._start()
        current = await self.uapi.get()
        if current.private_key != private_key or current.listen_port != listen_port or current.fwmark != fwmark:
            await self.uapi.set(set_device_request(private_key=private_key, listen_port=listen_port, fwmark=fwmark),
                                what=f"set {self.device_name} key, port {listen_port} and fwmark {fwmark:#x}")
        if self.pid:  # a new listen port means new sockets: size them after every change
            try:
                sized = await asyncio.to_thread(size_udp_sockets, self.pid, listen_port)
                log.info("wireguard-go (pid %d): %d UDP sockets with %d-byte buffers", self.pid, sized,
                         SOCKET_BUFFER_BYTES)
            except OSError as exc:  # the tunnel works without; it just loses more under load
                log.warning("sizing wireguard-go's UDP socket buffers (pid %d) failed: %s", self.pid, exc)
        return self.adopted

    async def _start(self) -> None:
        binary = shutil.which(self.binary)
        if binary is None:
            raise PermanentError(f"{self.binary} not found on PATH: no WireGuard without the kernel module")
        self.socket_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.uapi.socket_path.unlink(missing_ok=True)  # a dead process's socket would never answer
        WIREGUARD_GO_SOCKET_DIR.mkdir(exist_ok=True, mode=0o700)  # the mount point (wg(8)'s usual directory)
        netns_path = None
        if self.netns:
            netns_path = self.netns if self.netns.startswith("/") else f"/run/netns/{self.netns}"
        env = {**os.environ, "WG_PROCESS_FOREGROUND": "1", "LOG_LEVEL": "error", **self.extra_env}
        with open(self.state_dir / "wireguard-go.log", "ab") as logf:  # noqa: ASYNC230 - once per device start
            # Own session: the device process outlives this key manager (a restart adopts it), so a plain
            # Popen, not asyncio's, whose child watcher would own and reap it.
            proc = subprocess.Popen(  # noqa: ASYNC220
                [binary, "-f", self.device_name], stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, env=env,
                start_new_session=True, preexec_fn=lambda: _enter_device_namespaces(netns_path, self.socket_dir))
        self.pid, self.started_at = proc.pid, time.time()
        self.pid_file.write_text(str(proc.pid))
        deadline = time.monotonic() + DEVICE_START_TIMEOUT_S
        while not await self.uapi.alive():
            if proc.poll() is not None:
                tail = (self.state_dir / "wireguard-go.log").read_text(errors="replace").strip()[-300:]
                raise TemporaryError(f"wireguard-go {self.device_name} exited with {proc.returncode}: {tail}")
            if time.monotonic() > deadline:
                proc.kill()
                raise TemporaryError(f"wireguard-go {self.device_name}: UAPI socket {self.uapi.socket_path} "
                                     f"did not answer within {DEVICE_START_TIMEOUT_S}s")
            await asyncio.sleep(0.05)
        log.info("started wireguard-go (pid %d) for %s in %s", proc.pid, self.device_name, self.netns or "this netns")

    async def device(self) -> DeviceState:
        return await self.uapi.get()

    async def set_peer(self, peer: PeerConfig) -> None:
        await self.uapi.set(set_peer_request(peer), what=f"set peer {peer.node or peer.public_key}")

    async def remove_peer(self, public_key: str) -> None:
        await self.uapi.set(remove_peer_request(public_key), what=f"remove peer {public_key}")

    def stop_device(self) -> None:
        """Only for tests and teardown: a key manager never stops its device."""
        if self.pid:
            try:
                os.kill(self.pid, 15)
            except ProcessLookupError:
                pass


# --- kernel: pyroute2 generic netlink ------------------------------------------------------------

class KernelBackend:
    """Kernel WireGuard through pyroute2. NOT exercised on this kernel (no module): the requests it builds
    are unit-tested; the calls themselves are pyroute2's documented `WireGuard.set/info`."""

    kind = "kernel"

    def __init__(self, *, netns: str | None, device: str = DEVICE) -> None:
        self.netns = netns
        self.device_name = device

    def describe(self) -> dict[str, Any]:
        return {"backend": self.kind}

    def device_request(self, *, private_key: str, listen_port: int, fwmark: int = 0) -> dict[str, Any]:
        return {"interface": self.device_name, "private_key": private_key, "listen_port": listen_port,
                "fwmark": fwmark}

    def peer_request(self, peer: PeerConfig | None = None, *, remove: str = "") -> dict[str, Any]:
        if remove:
            return {"interface": self.device_name, "peer": {"public_key": remove, "remove": True}}
        assert peer is not None
        host, _, port = peer.endpoint.rpartition(":")
        return {"interface": self.device_name,
                "peer": {"public_key": peer.public_key, "endpoint_addr": host, "endpoint_port": int(port),
                         "persistent_keepalive": peer.persistent_keepalive, "allowed_ips": list(peer.allowed_ips)}}

    def _wg(self) -> Any:
        from pyroute2 import WireGuard  # only where the module exists

        from propolis.runtime.netns import entered
        if self.netns:
            with entered(self.netns):
                return WireGuard()
        return WireGuard()

    async def ensure_device(self, *, private_key: str, listen_port: int, fwmark: int = 0) -> bool:
        from propolis.runtime.netns import iproute_in

        def work() -> bool:
            with iproute_in(self.netns) if self.netns else _iproute() as ipr:
                existed = bool(ipr.link_lookup(ifname=self.device_name))
                if not existed:
                    ipr.link("add", ifname=self.device_name, kind="wireguard")
            with self._wg() as wg:
                wg.set(**self.device_request(private_key=private_key, listen_port=listen_port, fwmark=fwmark))
            return existed
        return await asyncio.to_thread(work)

    async def device(self) -> DeviceState:
        def work() -> DeviceState:
            with self._wg() as wg:
                msgs = wg.info(self.device_name)
            dev = DeviceState()
            for msg in msgs:
                dev.listen_port = msg.get_attr("WGDEVICE_A_LISTEN_PORT") or dev.listen_port
                for p in msg.get_attr("WGDEVICE_A_PEERS") or []:
                    pub = p.get_attr("WGPEER_A_PUBLIC_KEY")
                    pub = pub.decode() if isinstance(pub, bytes) else pub
                    dev.peers[pub] = PeerState(pub)
            return dev
        return await asyncio.to_thread(work)

    async def set_peer(self, peer: PeerConfig) -> None:
        def work() -> None:
            with self._wg() as wg:
                wg.set(**self.peer_request(peer))
        await asyncio.to_thread(work)

    async def remove_peer(self, public_key: str) -> None:
        def work() -> None:
            with self._wg() as wg:
                wg.set(**self.peer_request(remove=public_key))
        await asyncio.to_thread(work)


def _iproute() -> Any:
    from pyroute2 import IPRoute
    return IPRoute()


def kernel_has_wireguard() -> bool:
    return Path("/sys/module/wireguard").exists()


def select_backend(choice: str, *, state_dir: Path, netns: str | None) -> WireguardBackend:
    """`auto`: the kernel module when loaded, else wireguard-go."""
    if choice not in ("auto", "kernel", "wireguard-go"):
        raise PermanentError(f"wireguard backend {choice!r}: must be auto, kernel or wireguard-go")
    if choice == "kernel" or (choice == "auto" and kernel_has_wireguard()):
        return KernelBackend(netns=netns)
    return UserspaceBackend(state_dir=state_dir, netns=netns)


__all__ = ["DEVICE", "LISTEN_PORT", "KernelBackend", "UserspaceBackend", "WireguardBackend", "select_backend",
           "keys"]
