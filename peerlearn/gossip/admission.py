"""Who may join a swarm: ``open``, ``allowlist`` or ``token`` (sans-I/O).

* ``open``: anyone who publishes a self-signed member record is a member. For public
  experiments, where the swarm is whoever shows up; Byzantine filtering does the rest.
* ``allowlist``: only the listed peer IDs. For a fixed set of machines you run.
* ``token``: the swarm's authority (a key made by ``peerlearn swarm create``) signs an invite
  for each peer ID (``peerlearn swarm invite``); a member carries its invite in its member
  record, and every node checks it. For a lab or a group that grows over time.

An invite is the signed tuple ``(authority, swarm, member, expires)``; as a token it is that
msgpack list in URL-safe base64 behind ``INVITE_PREFIX``.

Any mode may also ask a proof of work of each member (``pow_bits``): its member record
carries a nonce such that sha256(domain, swarm, public key, nonce) starts with ``pow_bits``
zero bits. It is found once per identity (about 2**pow_bits hashes; a second or so at 20
bits on one core) and checked with one hash, before the record's signature, so ten thousand
fake identities cost their maker hours while costing us nothing. Nothing here does I/O.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import itertools
from dataclasses import dataclass
from typing import Any

from peerlearn import wire
from peerlearn.errors import ConfigError, Offence, RemoteProtocolError
from peerlearn.identity import (
    PUBLIC_KEY_SIZE,
    SIGNATURE_SIZE,
    Identity,
    peer_id_from_public_key,
    public_key_from_peer_id,
    verify_signature,
)

INVITE_PREFIX = "plinv1."
MAX_INVITE_BYTES = 512
MAX_POW_BITS = 32  # beyond, finding a nonce takes a day on one core
_DOMAIN = b"peerlearn/invite/v1"
_POW_DOMAIN = b"peerlearn/member-pow/v1"
_LIMITS = wire.Limits(max_message_size=MAX_INVITE_BYTES, max_array_len=8, max_map_len=0)


class AdmissionMode(enum.StrEnum):
    OPEN = "open"
    ALLOWLIST = "allowlist"
    TOKEN = "token"


@dataclass(frozen=True)
class Invite:
    """The authority's signed word that ``member`` may join ``swarm`` until ``expires``."""

    authority: bytes
    swarm: str
    member: bytes
    expires: float  # unix time; 0 means never
    signature: bytes

    def to_wire(self) -> bytes:
        return wire.pack([self.authority, self.swarm, self.member, self.expires, self.signature])

    @property
    def token(self) -> str:
        encoded = base64.urlsafe_b64encode(self.to_wire()).decode().rstrip("=")
        return INVITE_PREFIX + encoded


def _signed(authority: bytes, swarm: str, member: bytes, expires: float) -> bytes:
    return wire.pack([_DOMAIN, authority, swarm, member, expires])


def issue_invite(authority: Identity, swarm: str, member: bytes, expires: float = 0.0) -> Invite:
    """Sign an invite for the peer whose public key is ``member``."""
    expires = float(expires)
    signature = authority.sign(_signed(authority.public_key, swarm, member, expires))
    return Invite(authority.public_key, swarm, member, expires, signature)


def invite_from_wire(data: bytes) -> Invite:
    """Decode and check an invite's signature; ``RemoteProtocolError`` if it is not one."""
    raw = wire.expect(wire.unpack(data, _LIMITS), list, "invite")
    if len(raw) != 5:
        raise RemoteProtocolError("an invite is [authority, swarm, member, expires, signature]")
    authority = wire.expect(raw[0], bytes, "invite.authority")
    swarm = wire.expect(raw[1], str, "invite.swarm")
    member = wire.expect(raw[2], bytes, "invite.member")
    expires = wire.expect(raw[3], float, "invite.expires")
    signature = wire.expect(raw[4], bytes, "invite.signature")
    if len(authority) != PUBLIC_KEY_SIZE or len(member) != PUBLIC_KEY_SIZE:
        raise RemoteProtocolError("invite keys have the wrong size")
    if len(signature) != SIGNATURE_SIZE:
        raise RemoteProtocolError("invite signature has the wrong size")
    if not verify_signature(authority, signature, _signed(authority, swarm, member, expires)):
        raise RemoteProtocolError("forged invite", Offence.FORGED)
    return Invite(authority, swarm, member, expires, signature)


def invite_from_token(token: str) -> Invite:
    """An operator's pasted token; ``ConfigError`` in plain words if it is not a valid one."""
    token = token.strip()
    if not token.startswith(INVITE_PREFIX):
        raise ConfigError(f"an invite token starts with {INVITE_PREFIX!r}")
    body = token[len(INVITE_PREFIX) :]
    try:
        data = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        return invite_from_wire(data)
    except (binascii.Error, ValueError, RemoteProtocolError) as exc:
        raise ConfigError(f"the invite token is damaged or forged ({exc})") from exc


def _pow_hash(swarm: str, owner: bytes) -> hashlib._Hash:
    return hashlib.sha256(_POW_DOMAIN + swarm.encode() + b"\0" + owner)


def _leading_zeros(digest: bytes, bits: int) -> bool:
    return int.from_bytes(digest, "big") >> (256 - bits) == 0


def pow_valid(swarm: str, owner: bytes, nonce: bytes, bits: int) -> bool:
    """Whether ``nonce`` is ``owner``'s proof of work of ``bits`` bits in ``swarm``."""
    digest = _pow_hash(swarm, owner)
    digest.update(nonce)
    return _leading_zeros(digest.digest(), bits)


def solve_pow(swarm: str, owner: bytes, bits: int) -> bytes:
    """A nonce that proves ``bits`` bits of work for ``owner`` (about 2**bits hashes)."""
    if not 0 <= bits <= MAX_POW_BITS:
        raise ValueError(f"pow_bits must be 0-{MAX_POW_BITS}, not {bits}")
    prefix = _pow_hash(swarm, owner)
    for counter in itertools.count():
        nonce = counter.to_bytes(8, "big")
        digest = prefix.copy()
        digest.update(nonce)
        if _leading_zeros(digest.digest(), bits):
            return nonce
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Admission:
    """A swarm's admission rule, applied to member records and to who may talk to us."""

    mode: AdmissionMode = AdmissionMode.OPEN
    allowlist: frozenset[bytes] = frozenset()
    authority: bytes | None = None  # token mode: the public key that signs invites
    pow_bits: int = 0  # proof of work each member record must carry (0: none)

    def check_member(self, swarm: str, owner: bytes, value: Any, now: float) -> None:
        """Raise ``RemoteProtocolError`` (not a member) unless ``owner``'s member record
        ``value`` admits it under this rule."""
        who = peer_id_from_public_key(owner)
        if self.pow_bits:
            nonce = value.get("pow") if isinstance(value, dict) else None
            if not isinstance(nonce, bytes) or not pow_valid(swarm, owner, nonce, self.pow_bits):
                raise RemoteProtocolError(
                    f"{who} carries no proof of work of {self.pow_bits} bits", Offence.NOT_MEMBER
                )
        if self.mode is AdmissionMode.ALLOWLIST and owner not in self.allowlist:
            raise RemoteProtocolError(f"{who} is not on the allowlist", Offence.NOT_MEMBER)
        if self.mode is not AdmissionMode.TOKEN or owner == self.authority:
            return
        raw = value.get("invite") if isinstance(value, dict) else None
        if not isinstance(raw, bytes):
            raise RemoteProtocolError(f"{who} has no invite", Offence.NOT_MEMBER)
        invite = invite_from_wire(raw)
        if invite.authority != self.authority or invite.swarm != swarm:
            raise RemoteProtocolError(
                f"{who}'s invite is for another swarm or authority", Offence.NOT_MEMBER
            )
        if invite.member != owner:
            raise RemoteProtocolError(f"{who} carries someone else's invite", Offence.FORGED)
        if invite.expires and invite.expires < now:
            raise RemoteProtocolError(f"{who}'s invite has expired", Offence.NOT_MEMBER)


def parse_allowlist(text: str, source: str) -> frozenset[bytes]:
    """Peer IDs, one per line (``#`` starts a comment), as public keys; ``ConfigError`` names
    the first line that is not an Ed25519 peer ID."""
    keys = set()
    for number, line in enumerate(text.splitlines(), 1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        try:
            keys.add(public_key_from_peer_id(entry))
        except ValueError as exc:
            raise ConfigError(f"{source}:{number}: {entry!r} is not a peer ID ({exc})") from None
    return frozenset(keys)
