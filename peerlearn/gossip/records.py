"""DHT records under ``/peerlearn/<swarm>/...``: signed by the peer they describe.

The DHT runs with strict validation: keys outside the ``peerlearn`` namespace are rejected,
and a value must be a signed envelope whose body names the same key; a peer record
``/peerlearn/<swarm>/peer/<peer id>`` must be signed by that peer. Among several values
the newest (highest seq) wins.
"""

from __future__ import annotations

import hashlib

from peerlearn import wire
from peerlearn.errors import RemoteProtocolError
from peerlearn.identity import Identity

NAMESPACE = "peerlearn"
RECORD_TYPE = "dht_record"
MAX_RECORD_SIZE = 16 * 1024  # bytes
_LIMITS = wire.Limits(max_message_size=MAX_RECORD_SIZE, max_array_len=64, max_map_len=16)


def swarm_provider_key(swarm: str) -> str:
    """Hex sha256 multihash of the swarm name: every member provides it."""
    return "1220" + hashlib.sha256(f"/{NAMESPACE}/{swarm}/members".encode()).hexdigest()


def peer_record_key(swarm: str, peer_id: str) -> str:
    return f"/{NAMESPACE}/{swarm}/peer/{peer_id}"


def make_peer_record(
    identity: Identity, swarm: str, addrs: list[str], seq: int, now: float
) -> tuple[str, bytes]:
    key = peer_record_key(swarm, identity.peer_id)
    body = {"key": key, "addrs": addrs}
    return key, wire.seal(identity, RECORD_TYPE, body, seq=seq, timestamp=now)


def validate_record(key: str, value: bytes) -> wire.Envelope:
    """The verified envelope, or ``RemoteProtocolError`` saying why the record is refused."""
    parts = key.split("/")
    if len(parts) < 4 or parts[0] != "" or parts[1] != NAMESPACE:
        raise RemoteProtocolError(f"DHT key {key[:80]!r} is outside /{NAMESPACE}/")
    envelope = wire.open_envelope(value, _LIMITS)
    if envelope.type != RECORD_TYPE:
        raise RemoteProtocolError(f"DHT value is a {envelope.type!r}, not a {RECORD_TYPE!r}")
    body = wire.expect(envelope.body, dict, "record body")
    if body.get("key") != key:
        raise RemoteProtocolError("DHT value was signed for another key")
    if parts[3] == "peer" and (len(parts) != 5 or envelope.sender_id != parts[4]):
        raise RemoteProtocolError("a peer record must be signed by the peer it describes")
    return envelope


def select_record(key: str, values: list[bytes]) -> int:
    """Index of the newest valid value (the highest seq)."""
    best, best_seq = 0, -1
    for i, value in enumerate(values):
        try:
            seq = validate_record(key, value).seq
        except RemoteProtocolError:
            continue
        if seq > best_seq:
            best, best_seq = i, seq
    return best
