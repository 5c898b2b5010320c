"""Node identity: an Ed25519 key pair stored in the data directory, and its libp2p peer ID."""

from __future__ import annotations

import functools
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from peerlearn.errors import ConfigError

KEY_FILE_NAME = "identity.key"
PUBLIC_KEY_SIZE = 32  # bytes, raw Ed25519
SIGNATURE_SIZE = 64  # bytes, Ed25519

_B58_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
# libp2p PublicKey protobuf: field 1 (KeyType) = 1 (Ed25519), field 2 (Data) = 32 bytes.
_LIBP2P_ED25519_PREFIX = b"\x08\x01\x12\x20"
_IDENTITY_MULTIHASH_PREFIX = b"\x00\x24"  # identity hash, 36 bytes of digest


def _base58(data: bytes) -> str:
    number = int.from_bytes(data, "big")
    out = []
    while number:
        number, rem = divmod(number, 58)
        out.append(_B58_ALPHABET[rem])
    leading = len(data) - len(data.lstrip(b"\x00"))
    return "1" * leading + "".join(reversed(out))


def _unbase58(text: str) -> bytes:
    number = 0
    for char in text:
        digit = _B58_ALPHABET.find(char)
        if digit < 0:
            raise ValueError(f"{char!r} is not a base58 character")
        number = number * 58 + digit
    leading = len(text) - len(text.lstrip("1"))
    return b"\x00" * leading + number.to_bytes((number.bit_length() + 7) // 8, "big")


def public_key_from_peer_id(peer_id: str) -> bytes:
    """The raw Ed25519 key inlined in an Ed25519 peer ID (``ValueError`` for anything else)."""
    prefix = _IDENTITY_MULTIHASH_PREFIX + _LIBP2P_ED25519_PREFIX
    if len(peer_id) > 64:
        raise ValueError("too long for an Ed25519 peer ID")
    raw = _unbase58(peer_id)
    if not raw.startswith(prefix) or len(raw) != len(prefix) + PUBLIC_KEY_SIZE:
        raise ValueError(f"{peer_id[:60]} is not an Ed25519 peer ID")
    return raw[len(prefix) :]


@functools.lru_cache(maxsize=65_536)  # swarms ask for the same few thousand IDs again and again
def peer_id_from_public_key(public_key: bytes) -> str:
    """The libp2p peer ID (base58 identity multihash) of a raw 32-byte Ed25519 key."""
    if len(public_key) != PUBLIC_KEY_SIZE:
        raise ValueError(f"Ed25519 public key must be {PUBLIC_KEY_SIZE} bytes")
    return _base58(_IDENTITY_MULTIHASH_PREFIX + _LIBP2P_ED25519_PREFIX + public_key)


def verify_signature(public_key: bytes, signature: bytes, data: bytes) -> bool:
    """True when ``signature`` is a valid Ed25519 signature of ``data`` by ``public_key``."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


@dataclass(frozen=True)
class Identity:
    """An Ed25519 signing key with its derived public key and peer ID."""

    private_key: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        """Deterministic identity from a 32-byte seed (simulations and tests)."""
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    @property
    def public_key(self) -> bytes:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @property
    def private_bytes(self) -> bytes:
        return self.private_key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )

    @property
    def peer_id(self) -> str:
        return peer_id_from_public_key(self.public_key)

    def sign(self, data: bytes) -> bytes:
        return self.private_key.sign(data)


def load_identity(path: Path) -> Identity:
    """An Ed25519 key from a PEM file readable by its owner only; ``ConfigError`` otherwise."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise ConfigError(
            f"{path} is readable by other users (mode {mode:o}); run `chmod 600 {path}`"
        )
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except ValueError as exc:
        raise ConfigError(f"{path} is not a valid PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path} holds a {type(key).__name__}, expected an Ed25519 key")
    return Identity(key)


def create_identity(path: Path, identity: Identity | None = None) -> Identity:
    """A new Ed25519 key (or ``identity``), written to ``path`` (mode 0600; never
    overwrites a file)."""
    identity = identity or Identity.generate()
    pem = identity.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
        handle.flush()
        os.fsync(handle.fileno())
    return identity


def load_or_create_identity(data_dir: Path) -> Identity:
    """Load ``identity.key`` from ``data_dir``, creating it (mode 0600) on first start."""
    path = data_dir / KEY_FILE_NAME
    return load_identity(path) if path.exists() else create_identity(path)
