"""A capture of every frame on the sandbox underlay: the proof that pod traffic crosses it encrypted.

An AF_PACKET socket opened in the underlay namespace, unbound, sees every frame on
every node's port of the bridge (each twice: leaving one veth, entering the bridge).
`propolis connectivity test` (scenario ``encryption``) and the encryption tests use it
to show that a known payload never appears in cleartext and that pod conversations
appear only as WireGuard's UDP 51871. The reader is a thread: frames are not lost
while the event loop is busy probing.
"""

from __future__ import annotations

import socket
import struct
import threading
from dataclasses import dataclass, field

from propolis.runtime.netns import entered

ETH_P_ALL = 0x0003
IPPROTO_TCP, IPPROTO_UDP = 6, 17


@dataclass(frozen=True)
class Frame:
    proto: int  # IPv4 protocol number (0 = not IPv4)
    sport: int
    dport: int
    data: bytes


def parse(frame: bytes) -> Frame:
    if len(frame) < 34 or frame[12:14] != b"\x08\x00":
        return Frame(0, 0, 0, frame)
    l4 = 14 + (frame[14] & 0x0F) * 4
    sport, dport = struct.unpack("!HH", frame[l4:l4 + 4]) if len(frame) >= l4 + 4 else (0, 0)
    return Frame(frame[23], sport, dport, frame)


@dataclass
class UnderlayCapture:
    """``with UnderlayCapture(cfg.underlay_netns) as cap: …`` then `contains` / `count`."""

    netns: str
    frames: list[Frame] = field(default_factory=list)

    def __enter__(self) -> UnderlayCapture:
        with entered(self.netns):
            self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self._sock.settimeout(0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"capture-{self.netns}", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            self.frames.append(parse(data))

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sock.close()

    def contains(self, payload: bytes) -> bool:
        """Did ``payload`` appear anywhere in a captured frame (i.e. in cleartext)?"""
        return any(payload in f.data for f in self.frames)

    def count(self, proto: int, port: int) -> int:
        """Frames of IP protocol ``proto`` with ``port`` as source or destination port."""
        return sum(1 for f in self.frames if f.proto == proto and port in (f.sport, f.dport))
