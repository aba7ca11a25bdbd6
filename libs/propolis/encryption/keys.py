"""WireGuard key pairs: X25519 private keys on the node, public keys on the bus and the Node.

Keys travel as WireGuard writes them (`wg genkey`): 32 bytes, standard base64
(44 characters). The UAPI protocol wants hex (`to_hex`). The public key is
derived with RFC 7748's X25519 (`public_key`): the suite has no crypto library
dependency for one scalar multiplication at start-up and at rotation; the
encryption itself is wireguard-go's (or the kernel's). The RFC's test vectors
pin this implementation (tests/encryption/test_keys.py).

The private key lives in one root-only file on the node (`load_or_create`):
directory 0700, file 0600, written atomically, never on the bus.
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
from pathlib import Path

from propolis.errors import ValidationError

KEY_LEN = 32
_P = 2**255 - 19
_A24 = 121665


def _clamp(k: bytes) -> int:
    b = bytearray(k)
    b[0] &= 248
    b[31] &= 127
    b[31] |= 64
    return int.from_bytes(b, "little")


def x25519(scalar: bytes, u: bytes) -> bytes:
    """RFC 7748 section 5: the Montgomery ladder on Curve25519."""
    k = _clamp(scalar)
    x1 = int.from_bytes(u, "little") & ((1 << 255) - 1)
    x2, z2, x3, z3, swap = 1, 0, x1, 1, 0
    for t in reversed(range(255)):
        bit = (k >> t) & 1
        swap ^= bit
        if swap:
            x2, x3, z2, z3 = x3, x2, z3, z2
        swap = bit
        a, b = (x2 + z2) % _P, (x2 - z2) % _P
        aa, bb = a * a % _P, b * b % _P
        e = (aa - bb) % _P
        c, d = (x3 + z3) % _P, (x3 - z3) % _P
        da, cb = d * a % _P, c * b % _P
        x3, z3 = (da + cb) ** 2 % _P, x1 * (da - cb) ** 2 % _P
        x2, z2 = aa * bb % _P, e * (aa + _A24 * e) % _P
    if swap:
        x2, z2 = x3, z3
    return (x2 * pow(z2, _P - 2, _P) % _P).to_bytes(32, "little")


_BASE_POINT = (9).to_bytes(32, "little")


def generate_private_key() -> str:
    """A fresh private key (base64), clamped as `wg genkey` does."""
    raw = bytearray(secrets.token_bytes(KEY_LEN))
    raw[0] &= 248
    raw[31] = (raw[31] & 127) | 64
    return base64.b64encode(bytes(raw)).decode()


def public_key(private_key: str) -> str:
    """The public key (base64) of a private key (base64), like `wg pubkey`."""
    return base64.b64encode(x25519(decode(private_key, what="private key"), _BASE_POINT)).decode()


def decode(key: str, *, what: str = "public key") -> bytes:
    """base64 text -> 32 bytes; anything else is a ValidationError naming what it was."""
    if not isinstance(key, str) or len(key) != 44:
        raise ValidationError(what, f"must be 44 characters of base64 (32 bytes), got {key!r:.60}")
    try:
        raw = base64.b64decode(key, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValidationError(what, f"not base64: {exc}") from exc
    if len(raw) != KEY_LEN:
        raise ValidationError(what, f"must decode to {KEY_LEN} bytes, got {len(raw)}")
    if raw == bytes(KEY_LEN):
        raise ValidationError(what, "is all zeros")
    return raw


def to_hex(key: str) -> str:
    """base64 -> the lowercase hex the UAPI protocol speaks."""
    return decode(key).hex()


def from_hex(key: str) -> str:
    return base64.b64encode(bytes.fromhex(key)).decode()


def load_or_create(path: Path) -> tuple[str, bool]:
    """The node's private key from `path`, generated on first use. Returns (key, created)."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return write_private_key(path, generate_private_key()), True
    decode(text, what=f"private key in {path}")
    return text, False


def write_private_key(path: Path, key: str) -> str:
    """Write atomically, root-only (0700 directory, 0600 file)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path.parent, 0o700)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, (key + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return key
