"""Key pairs: RFC 7748 vectors pin X25519; the private key file is root-only and survives a reload."""

from __future__ import annotations

import base64
import stat

import pytest

from propolis.encryption import keys
from propolis.errors import ValidationError


def test_x25519_rfc7748_vectors():
    alice = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    assert keys.x25519(alice, keys._BASE_POINT).hex() == \
        "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
    scalar = bytes.fromhex("a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4")
    u = bytes.fromhex("e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c")
    assert keys.x25519(scalar, u).hex() == "c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552"


def test_public_key_like_wg_pubkey():
    private = base64.b64encode(bytes.fromhex(
        "5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")).decode()
    bob_public = "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f"
    assert keys.to_hex(keys.public_key(private)) == bob_public


def test_generated_keys_are_clamped_and_distinct():
    a, b = keys.generate_private_key(), keys.generate_private_key()
    assert a != b
    raw = keys.decode(a, what="private key")
    assert raw[0] & 7 == 0 and raw[31] & 0xC0 == 0x40


@pytest.mark.parametrize("bad", ["", "not-base64!" * 4, base64.b64encode(b"x" * 31).decode() + "==",
                                 base64.b64encode(bytes(32)).decode(), 42])
def test_malformed_public_keys_are_refused(bad):
    with pytest.raises(ValidationError) as err:
        keys.decode(bad)
    assert err.value.field == "public key"


def test_private_key_file_root_only_and_stable(tmp_path):
    path = tmp_path / "wg" / "cilium_wg0.key"
    first, created = keys.load_or_create(path)
    assert created
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    again, created = keys.load_or_create(path)
    assert (again, created) == (first, False)


def test_corrupt_private_key_file_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "cilium_wg0.key"
    path.write_text("garbage\n")
    with pytest.raises(ValidationError, match=str(path)):
        keys.load_or_create(path)
