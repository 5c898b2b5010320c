"""Swarm state as a delta-state CRDT of signed, single-writer records (sans-I/O).

Each peer owns a fixed set of records (``RECORD_NAMES``): its membership (addresses), a
heartbeat, its current round, its latest model (version + sha256) and its metrics. A record
is an ``Entry`` signed by its owner's Ed25519 key, so nobody can write another peer's
records, and a replica can accept entries from anyone. Merge keeps, per (owner, name), the
entry with the highest (lamport, signature): last writer wins, deterministically.

Merge is commutative, associative and idempotent, so replicas that have seen the same
entries are equal whatever the order, duplication or loss on the way (tests/test_crdt.py).
Size is bounded: a record overwrites its previous version, names are a closed set, values are
capped, and at most ``max_owners`` owners are kept (the least recently active are dropped).
Anti-entropy: ``digest()`` on one side, ``missing_for(digest)`` on the other.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from peerlearn import wire
from peerlearn.errors import LocalProtocolError, RemoteProtocolError
from peerlearn.identity import PUBLIC_KEY_SIZE, SIGNATURE_SIZE, Identity, verify_signature

RECORD_NAMES = ("member", "heartbeat", "round", "model", "metrics")
MAX_VALUE_BYTES = 4096  # per record, msgpack-encoded
DEFAULT_MAX_OWNERS = 10_000
_DOMAIN = b"peerlearn/crdt/v1"
_VALUE_LIMITS = wire.Limits(max_message_size=MAX_VALUE_BYTES, max_array_len=256, max_map_len=64)

Key = tuple[bytes, str]


@dataclass(frozen=True)
class Entry:
    """One signed record: ``owner``'s value for ``name`` at logical time ``lamport``."""

    owner: bytes
    name: str
    lamport: int
    value: Any
    signature: bytes = field(repr=False)

    @property
    def key(self) -> Key:
        return (self.owner, self.name)

    def wins_over(self, other: Entry) -> bool:
        return (self.lamport, self.signature) > (other.lamport, other.signature)

    def to_wire(self) -> list[Any]:
        return [self.owner, self.name, self.lamport, self.value, self.signature]


def _signed_bytes(swarm: str, owner: bytes, name: str, lamport: int, value: Any) -> bytes:
    return wire.pack([_DOMAIN, swarm, owner, name, lamport, value])


def sign_entry(identity: Identity, swarm: str, name: str, lamport: int, value: Any) -> Entry:
    if name not in RECORD_NAMES:
        raise LocalProtocolError(f"unknown record {name!r}; known: {', '.join(RECORD_NAMES)}")
    if len(wire.pack(value)) > MAX_VALUE_BYTES:
        raise LocalProtocolError(f"record {name!r} is larger than {MAX_VALUE_BYTES} bytes")
    owner = identity.public_key
    signature = identity.sign(_signed_bytes(swarm, owner, name, lamport, value))
    return Entry(owner, name, lamport, value, signature)


def entry_from_wire(raw: Any, swarm: str) -> Entry:
    """Decode and verify one entry; ``RemoteProtocolError`` if malformed or forged."""
    if not isinstance(raw, list) or len(raw) != 5:
        raise RemoteProtocolError("crdt entry must be [owner, name, lamport, value, signature]")
    owner = wire.expect(raw[0], bytes, "entry.owner")
    name = wire.expect(raw[1], str, "entry.name")
    lamport = wire.expect(raw[2], int, "entry.lamport")
    value = raw[3]
    signature = wire.expect(raw[4], bytes, "entry.signature")
    if len(owner) != PUBLIC_KEY_SIZE or len(signature) != SIGNATURE_SIZE:
        raise RemoteProtocolError("entry.owner or entry.signature has the wrong size")
    if name not in RECORD_NAMES or not 0 <= lamport < 2**63:
        raise RemoteProtocolError(f"entry {name!r} at lamport {lamport} is not allowed")
    signed = _signed_bytes(swarm, owner, name, lamport, value)
    if len(signed) > MAX_VALUE_BYTES + 256:
        raise RemoteProtocolError("entry value is too large")
    if not verify_signature(owner, signature, signed):
        raise RemoteProtocolError(f"forged or corrupted {name!r} entry")
    return Entry(owner, name, lamport, value, signature)


def entries_from_wire(data: bytes, swarm: str, limits: wire.Limits) -> list[Entry]:
    raw = wire.expect(wire.unpack(data, limits), list, "crdt entries")
    return [entry_from_wire(item, swarm) for item in raw]


def entries_to_wire(entries: Iterable[Entry]) -> bytes:
    return wire.pack([e.to_wire() for e in entries])


class SwarmState:
    """One replica of the swarm's CRDT."""

    def __init__(self, swarm: str, *, max_owners: int = DEFAULT_MAX_OWNERS) -> None:
        self.swarm = swarm
        self.max_owners = max_owners
        self.entries: dict[Key, Entry] = {}
        self.lamport = 0

    def write(self, identity: Identity, name: str, value: Any) -> Entry:
        """Create (and merge) a new version of one of our own records."""
        self.lamport += 1
        entry = sign_entry(identity, self.swarm, name, self.lamport, value)
        self.merge_entry(entry)
        return entry

    def merge_entry(self, entry: Entry) -> bool:
        """Merge one verified entry; True if it changed the state."""
        self.lamport = max(self.lamport, entry.lamport)
        current = self.entries.get(entry.key)
        if current is not None and not entry.wins_over(current):
            return False
        self.entries[entry.key] = entry
        self._bound()
        return True

    def merge(self, entries: Iterable[Entry]) -> list[Entry]:
        """Merge verified entries; returns those that changed the state."""
        return [e for e in entries if self.merge_entry(e)]

    def _bound(self) -> None:
        owners = self.owners()
        if len(owners) <= self.max_owners:
            return
        activity = {o: max(e.lamport for k, e in self.entries.items() if k[0] == o) for o in owners}
        for owner in sorted(owners, key=lambda o: (activity[o], o))[
            : len(owners) - self.max_owners
        ]:
            for name in RECORD_NAMES:
                self.entries.pop((owner, name), None)

    def owners(self) -> set[bytes]:
        return {owner for owner, _ in self.entries}

    def get(self, owner: bytes, name: str) -> Any:
        entry = self.entries.get((owner, name))
        return None if entry is None else entry.value

    def digest(self) -> list[list[Any]]:
        """What we hold, for anti-entropy: ``[[owner, name, lamport], ...]``."""
        return [[o, n, e.lamport] for (o, n), e in sorted(self.entries.items())]

    def missing_for(self, digest: Any) -> list[Entry]:
        """Entries the holder of ``digest`` does not have (or has older versions of)."""
        known: dict[Key, int] = {}
        for item in wire.expect(digest, list, "digest"):
            if (
                isinstance(item, list)
                and len(item) == 3
                and isinstance(item[0], bytes)
                and isinstance(item[1], str)
                and isinstance(item[2], int)
            ):
                known[(item[0], item[1])] = item[2]
            else:
                raise RemoteProtocolError("digest items must be [owner, name, lamport]")
        return [e for k, e in sorted(self.entries.items()) if known.get(k, -1) < e.lamport]

    def state_hash(self) -> str:
        """Equal on replicas holding the same entries."""
        h = hashlib.sha256()
        for _, entry in sorted(self.entries.items()):
            h.update(wire.pack(entry.to_wire()))
        return h.hexdigest()

    def records(self, name: str) -> Mapping[bytes, Any]:
        return {owner: e.value for (owner, n), e in self.entries.items() if n == name}
