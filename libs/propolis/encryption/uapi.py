"""Client of WireGuard's cross-platform userspace API (wireguard.com/xplatform), as wireguard-go serves it.

The protocol is text over a stream UNIX socket: ``get=1\\n\\n`` answers
``key=value`` lines (device first, then one block per peer starting at
``public_key=``) ending with ``errno=N`` and a blank line; ``set=1\\n`` followed
by ``key=value`` lines and a blank line changes the device and answers
``errno=N``. Keys are hex on this socket (base64 everywhere else in Propolis).
Requests are built by pure functions (`set_device_request`, `set_peer_request`,
`remove_peer_request`) so tests can check them without a device; `UapiClient`
only carries them. This is how Propolis configures wireguard-go — never by
running `wg`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

from propolis.encryption import keys
from propolis.errors import PermanentError, TemporaryError

UAPI_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class PeerConfig:
    """What the key manager wants for one remote node (keys base64)."""

    public_key: str
    endpoint: str  # "ip:port"
    allowed_ips: tuple[str, ...]
    persistent_keepalive: int = 0  # seconds, 0 = off
    node: str = ""  # for logs only: WireGuard itself knows peers by key


@dataclass
class PeerState:
    """A peer as the device reports it (`get=1`)."""

    public_key: str
    endpoint: str = ""
    allowed_ips: list[str] = field(default_factory=list)
    persistent_keepalive: int = 0
    last_handshake: float = 0.0  # unix time, 0 = never
    rx_bytes: int = 0
    tx_bytes: int = 0


@dataclass
class DeviceState:
    private_key: str = ""  # base64; empty when unset
    listen_port: int = 0
    fwmark: int = 0
    peers: dict[str, PeerState] = field(default_factory=dict)  # base64 public key -> state


def set_device_request(*, private_key: str, listen_port: int, fwmark: int | None = None) -> str:
    """`fwmark`: the mark of the device's own UDP packets (None = leave it as it is)."""
    mark = "" if fwmark is None else f"fwmark={fwmark}\n"
    return f"set=1\nprivate_key={keys.to_hex(private_key)}\nlisten_port={listen_port}\n{mark}\n"


def set_peer_request(peer: PeerConfig) -> str:
    """Create or update one peer; its allowed IPs are replaced, not added to."""
    lines = ["set=1", f"public_key={keys.to_hex(peer.public_key)}", f"endpoint={peer.endpoint}",
             f"persistent_keepalive_interval={peer.persistent_keepalive}", "replace_allowed_ips=true"]
    lines += [f"allowed_ip={cidr}" for cidr in peer.allowed_ips]
    return "\n".join(lines) + "\n\n"


def remove_peer_request(public_key: str) -> str:
    return f"set=1\npublic_key={keys.to_hex(public_key)}\nremove=true\n\n"


def parse_get(text: str) -> DeviceState:
    """The answer of ``get=1`` (without its final errno line check, see `_check_errno`)."""
    dev = DeviceState()
    peer: PeerState | None = None
    hs_sec = hs_nsec = 0
    for line in text.splitlines():
        if not line or "=" not in line:
            continue
        k, v = line.split("=", 1)
        if k == "public_key":
            peer = PeerState(keys.from_hex(v))
            dev.peers[peer.public_key] = peer
            hs_sec = hs_nsec = 0
        elif peer is None:
            if k == "private_key":
                dev.private_key = keys.from_hex(v)
            elif k == "listen_port":
                dev.listen_port = int(v)
            elif k == "fwmark":
                dev.fwmark = int(v)
        elif k == "endpoint":
            peer.endpoint = v
        elif k == "allowed_ip":
            peer.allowed_ips.append(v)
        elif k == "persistent_keepalive_interval":
            peer.persistent_keepalive = int(v)
        elif k == "rx_bytes":
            peer.rx_bytes = int(v)
        elif k == "tx_bytes":
            peer.tx_bytes = int(v)
        elif k in ("last_handshake_time_sec", "last_handshake_time_nsec"):
            hs_sec, hs_nsec = (int(v), hs_nsec) if k.endswith("_sec") else (hs_sec, int(v))
            peer.last_handshake = hs_sec + hs_nsec / 1e9 if hs_sec else 0.0
    return dev


def _check_errno(answer: str, what: str) -> str:
    lines = answer.rstrip("\n").splitlines()
    if not lines or not lines[-1].startswith("errno="):
        raise TemporaryError(f"{what}: malformed UAPI answer {answer[-80:]!r}")
    errno = int(lines[-1].split("=", 1)[1])
    if errno:
        raise PermanentError(f"{what}: wireguard-go answered errno={errno}")
    return "\n".join(lines[:-1])


class UapiClient:
    """One request per connection, as `wg` does."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path

    async def _exchange(self, request: str, what: str) -> str:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(self.socket_path)),
                                                    UAPI_TIMEOUT_S)
        except (TimeoutError, OSError) as exc:
            raise TemporaryError(f"{what}: cannot reach {self.socket_path}: {exc}") from exc
        try:
            writer.write(request.encode())
            await writer.drain()
            chunks = []
            while True:  # the answer ends with a blank line after errno=
                chunk = await asyncio.wait_for(reader.readline(), UAPI_TIMEOUT_S)
                if not chunk:
                    break
                chunks.append(chunk.decode())
                if chunk == b"\n" and chunks and len(chunks) > 1 and chunks[-2].startswith("errno="):
                    break
            return _check_errno("".join(chunks), what)
        except (TimeoutError, OSError) as exc:
            raise TemporaryError(f"{what}: {self.socket_path}: {exc}") from exc
        finally:
            writer.close()

    async def get(self) -> DeviceState:
        return parse_get(await self._exchange("get=1\n\n", "get device"))

    async def set(self, request: str, *, what: str) -> None:
        await self._exchange(request, what)

    async def alive(self) -> bool:
        try:
            await self.get()
            return True
        except (TemporaryError, PermanentError):
            return False
