"""Swarm state as a delta-state CRDT of signed, single-writer records (sans-I/O).

Each peer owns one record of each name in ``RECORD_NAMES`` (membership, heartbeat, round,
model, metrics; their shapes are in ``schemas``). A record is an ``Entry`` signed by its
owner's Ed25519 key, so nobody can write another peer's records and a replica can accept
entries from anyone. Per (owner, name) the entry with the highest (clock, signature) wins.

Clocks are hybrid logical clocks: ``clock = unix milliseconds << 16 | counter``. An entry
dated more than ``max_skew`` seconds ahead of our clock is refused, so no peer can push a
replica to a clock it cannot write past (a plain Lamport counter set to 2**63-1 froze every
replica before). A new write takes ``max(now, own previous + 1)``.

Remote entries go through three steps, so the expensive one can leave the event loop:

1. ``decode_entries``: structure only (types and sizes);
2. ``SwarmState.triage``: clock bound, record schema, admission of member records, and
   "would it change anything": entries we already hold are dropped before any signature
   is checked;
3. ``verify_entries`` (pure, thread-safe): signatures; then ``SwarmState.merge``.

Merge is commutative, associative and idempotent (tests/test_crdt.py). Size is bounded:
records overwrite their previous versions, values are capped, and beyond ``max_owners``
owners the least recently active one is dropped, in O(log n) per entry. Strangers cannot
push the members we know out: an owner's activity is the date of its newest record, but
never later than when we received it (a record dated a minute ahead does not make its owner
the most active), and *established* owners (we met them in person, in a sync session on
their own authenticated stream, or they delivered a model we accepted) are never dropped,
nor are we; newcomers arrive at the rate ``joins`` allows per introducer
(``peerlearn.gossip.joins``). Anti-entropy (``peerlearn.gossip.sync``) pages the digest by
owner.
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from peerlearn import wire
from peerlearn.errors import LocalProtocolError, Offence, RemoteProtocolError
from peerlearn.gossip.admission import Admission
from peerlearn.gossip.joins import JoinLimiter
from peerlearn.gossip.schemas import RECORD_NAMES, check_record
from peerlearn.identity import PUBLIC_KEY_SIZE, SIGNATURE_SIZE, Identity, verify_signature

MAX_VALUE_BYTES = 4096  # per record, msgpack-encoded
DEFAULT_MAX_OWNERS = 10_000
DEFAULT_MAX_SKEW = 60.0  # seconds an entry may be dated ahead of our clock
CLOCK_SHIFT = 16  # low bits of a clock: a counter for writes within one millisecond
MAX_CLOCK = 2**63 - 1
_DOMAIN = b"peerlearn/crdt/v1"

Key = tuple[bytes, str]


def clock_at(now: float) -> int:
    """The hybrid logical clock value of wall-clock time ``now`` (seconds)."""
    return int(now * 1000) << CLOCK_SHIFT


def clock_seconds(clock: int) -> float:
    return (clock >> CLOCK_SHIFT) / 1000


@dataclass(frozen=True)
class Entry:
    """One signed record: ``owner``'s value for ``name`` at hybrid logical time ``clock``."""

    owner: bytes
    name: str
    clock: int
    value: Any
    signature: bytes = field(repr=False)

    @property
    def key(self) -> Key:
        return (self.owner, self.name)

    def wins_over(self, other: Entry) -> bool:
        return (self.clock, self.signature) > (other.clock, other.signature)

    def to_wire(self) -> list[Any]:
        return [self.owner, self.name, self.clock, self.value, self.signature]


def _signed_bytes(swarm: str, owner: bytes, name: str, clock: int, value: Any) -> bytes:
    return wire.pack([_DOMAIN, swarm, owner, name, clock, value])


def sign_entry(identity: Identity, swarm: str, name: str, clock: int, value: Any) -> Entry:
    if name not in RECORD_NAMES:
        raise LocalProtocolError(f"unknown record {name!r}; known: {', '.join(RECORD_NAMES)}")
    if len(wire.pack(value)) > MAX_VALUE_BYTES:
        raise LocalProtocolError(f"record {name!r} is larger than {MAX_VALUE_BYTES} bytes")
    owner = identity.public_key
    signature = identity.sign(_signed_bytes(swarm, owner, name, clock, value))
    return Entry(owner, name, clock, value, signature)


def verify_entry(swarm: str, entry: Entry) -> bool:
    """Whether ``entry`` carries its owner's signature for ``swarm`` (pure; thread-safe)."""
    signed = _signed_bytes(swarm, entry.owner, entry.name, entry.clock, entry.value)
    return verify_signature(entry.owner, entry.signature, signed)


def verify_entries(swarm: str, entries: Iterable[Entry]) -> tuple[list[Entry], list[Entry]]:
    """(verified, forged): the expensive step, safe to run in a worker thread."""
    verified: list[Entry] = []
    forged: list[Entry] = []
    for entry in entries:
        (verified if verify_entry(swarm, entry) else forged).append(entry)
    return verified, forged


def entry_from_wire(raw: Any) -> Entry:
    """The structure of one entry (types and sizes); its signature is not checked here."""
    if not isinstance(raw, list) or len(raw) != 5:
        raise RemoteProtocolError("crdt entry must be [owner, name, clock, value, signature]")
    owner = wire.expect(raw[0], bytes, "entry.owner")
    name = wire.expect(raw[1], str, "entry.name")
    clock = wire.expect(raw[2], int, "entry.clock")
    signature = wire.expect(raw[4], bytes, "entry.signature")
    if len(owner) != PUBLIC_KEY_SIZE or len(signature) != SIGNATURE_SIZE:
        raise RemoteProtocolError("entry.owner or entry.signature has the wrong size")
    if name not in RECORD_NAMES or not 0 <= clock <= MAX_CLOCK:
        raise RemoteProtocolError(f"entry {name[:20]!r} at clock {clock} is not allowed")
    if len(wire.pack(raw[3])) > MAX_VALUE_BYTES:
        raise RemoteProtocolError("entry value is too large", Offence.OVERSIZED)
    return Entry(owner, name, clock, raw[3], signature)


def decode_entries(data: bytes, limits: wire.Limits) -> list[Entry]:
    """A msgpack list of entries, structure checked; ``RemoteProtocolError`` otherwise."""
    return entries_from_list(wire.unpack(data, limits))


def entries_from_list(raw: Any) -> list[Entry]:
    return [entry_from_wire(item) for item in wire.expect(raw, list, "crdt entries")]


def entries_to_wire(entries: Iterable[Entry]) -> bytes:
    return wire.pack([e.to_wire() for e in entries])


SNAPSHOT_CHUNK = 500  # entries per msgpack list in a snapshot


def encode_snapshot(entries: Sequence[Entry]) -> bytes:
    """A whole replica for the disk: consecutive msgpack lists of ``SNAPSHOT_CHUNK`` entries,
    so neither writing nor reading it holds the interpreter for long at a time."""
    return b"".join(
        entries_to_wire(entries[start : start + SNAPSHOT_CHUNK])
        for start in range(0, len(entries), SNAPSHOT_CHUNK)
    )


def decode_snapshot(data: bytes, max_entries: int) -> list[Entry]:
    limits = wire.Limits(max_message_size=len(data), max_array_len=SNAPSHOT_CHUNK)
    entries: list[Entry] = []
    for chunk in wire.unpack_sequence(data, limits, max_entries // SNAPSHOT_CHUNK + 1):
        entries += entries_from_list(chunk)
    return entries


@dataclass
class Triage:
    """What ``SwarmState.triage`` made of a batch of remote entries."""

    candidates: list[Entry] = field(default_factory=list)  # verify these, then merge them
    rejected: list[tuple[Entry, RemoteProtocolError]] = field(default_factory=list)
    known: int = 0  # entries we hold already, or older versions of them
    unknown_owner: int = 0  # records of owners that are not (yet) members: ignored
    deferred: int = 0  # newcomers over their introducer's rate: they come again later


class SwarmState:
    """One replica of the swarm's CRDT."""

    def __init__(
        self,
        swarm: str,
        *,
        admission: Admission | None = None,
        max_owners: int = DEFAULT_MAX_OWNERS,
        max_skew: float = DEFAULT_MAX_SKEW,
        protect: bytes | None = None,
        joins: JoinLimiter | None = None,
    ) -> None:
        """``protect`` (our own public key) is never evicted; ``joins`` limits the newcomers
        each introducer brings (None: no limit)."""
        self.swarm = swarm
        self.admission = admission or Admission()
        self.max_owners = max_owners
        self.max_skew = max_skew
        self.protect = protect
        self.joins = joins
        self.entries: dict[Key, Entry] = {}
        self.evicted_owners = 0
        self._activity: dict[bytes, int] = {}  # owner -> its newest clock, as of its arrival
        self._established: set[bytes] = set()  # owners never evicted (see ``establish``)
        # (activity, owner) of owners that may be evicted; stale items are skipped
        self._heap: list[tuple[int, bytes]] = []
        self._sorted_owners: list[bytes] | None = None

    # -- local writes -----------------------------------------------------------------------

    def write(self, identity: Identity, name: str, value: Any, now: float) -> Entry:
        """Create (and merge) a new version of one of our own records."""
        previous = self.entries.get((identity.public_key, name))
        clock = clock_at(now)
        if previous is not None and previous.clock >= clock:
            clock = previous.clock + 1
        entry = sign_entry(identity, self.swarm, name, clock, value)
        self._merge_one(entry, now)
        return entry

    def establish(self, owner: bytes) -> None:
        """``owner`` proved itself in person (a sync session on its own authenticated
        stream, or a model we accepted from it): from now on it is never evicted in favour
        of members we only heard of."""
        if owner in self._activity:
            self._established.add(owner)

    def is_established(self, owner: bytes) -> bool:
        return owner in self._established

    def established_count(self) -> int:
        return len(self._established)

    # -- remote entries ---------------------------------------------------------------------

    def triage(
        self, entries: Iterable[Entry], now: float, introducers: Sequence[str] = ()
    ) -> Triage:
        """Cheap checks before signatures: clock bound, schema, admission, novelty, and the
        rate of newcomers ``introducers`` (whoever handed us ``entries``: a peer ID, its IP
        address) may bring; none for our own saved state.

        Member records are looked at first, so an owner's other records in the same batch
        count once its membership is a candidate.
        """
        out = Triage()
        batch = sorted(entries, key=lambda e: e.name != "member")
        newcomers: set[bytes] = set()
        limit = clock_at(now + self.max_skew)
        for entry in batch:
            current = self.entries.get(entry.key)
            if current is not None and not entry.wins_over(current):
                out.known += 1
                continue
            try:
                if entry.clock > limit:
                    raise RemoteProtocolError(
                        f"{entry.name} record dated {clock_seconds(entry.clock) - now:.0f} s "
                        "in the future",
                        Offence.REPLAYED,
                    )
                check_record(entry.name, entry.value)
                if entry.name == "member":
                    self.admission.check_member(self.swarm, entry.owner, entry.value, now)
                    fresh = not self.is_member(entry.owner) and entry.owner not in newcomers
                    joins = self.joins
                    if fresh and introducers and joins and not joins.allow(introducers, now):
                        out.deferred += 1
                        continue
                    newcomers.add(entry.owner)
                elif not self.is_member(entry.owner) and entry.owner not in newcomers:
                    out.unknown_owner += 1
                    continue
            except RemoteProtocolError as exc:
                out.rejected.append((entry, exc))
                continue
            out.candidates.append(entry)
        return out

    def merge(self, verified: Iterable[Entry], now: float | None = None) -> list[Entry]:
        """Merge entries whose signatures were verified; returns those that changed the state.
        ``now``: when they arrived (an owner's activity is never dated later).

        Triage ran before; between the two the state may have moved on, so novelty and
        membership are checked again (cheaply).
        """
        changed = []
        for entry in sorted(verified, key=lambda e: e.name != "member"):
            if entry.name != "member" and not self.is_member(entry.owner):
                continue
            if self._merge_one(entry, now):
                changed.append(entry)
        return changed

    def _merge_one(self, entry: Entry, now: float | None) -> bool:
        current = self.entries.get(entry.key)
        if current is not None and not entry.wins_over(current):
            return False
        activity = entry.clock if now is None else min(entry.clock, clock_at(now))
        if entry.owner not in self._activity:
            self._sorted_owners = None
            self._activity[entry.owner] = activity
            self._heap_push(activity, entry.owner)
        elif activity > self._activity[entry.owner]:
            self._activity[entry.owner] = activity
            self._heap_push(activity, entry.owner)
        self.entries[entry.key] = entry
        self._bound()
        return True

    def _evictable(self, owner: bytes) -> bool:
        return owner != self.protect and owner not in self._established

    def _heap_push(self, activity: int, owner: bytes) -> None:
        if self._evictable(owner):
            heapq.heappush(self._heap, (activity, owner))

    def _bound(self) -> None:
        """Drop the least recently active owners beyond ``max_owners`` (O(log n) each),
        never ourselves nor an established owner: beyond the bound with only those left
        (the bound was lowered), nothing is dropped."""
        while len(self._activity) > self.max_owners and self._heap:
            activity, owner = heapq.heappop(self._heap)
            if self._activity.get(owner) != activity or not self._evictable(owner):
                continue  # a stale heap item: active since, established, or gone
            self._forget(owner)
        if len(self._heap) > 4 * len(self._activity) + 64:  # compact stale items
            self._heap = [(a, o) for o, a in self._activity.items() if self._evictable(o)]
            heapq.heapify(self._heap)

    def _forget(self, owner: bytes) -> None:
        for name in RECORD_NAMES:
            self.entries.pop((owner, name), None)
        del self._activity[owner]
        self._established.discard(owner)
        self._sorted_owners = None
        self.evicted_owners += 1

    # -- reading ----------------------------------------------------------------------------

    def is_member(self, owner: bytes) -> bool:
        return (owner, "member") in self.entries

    def owners(self) -> list[bytes]:
        """Every owner, sorted (cached until the set of owners changes)."""
        if self._sorted_owners is None:
            self._sorted_owners = sorted(self._activity)
        return self._sorted_owners

    def get(self, owner: bytes, name: str) -> Any:
        entry = self.entries.get((owner, name))
        return None if entry is None else entry.value

    def records(self, name: str) -> Mapping[bytes, Any]:
        """``{owner: value}`` of every ``name`` record."""
        out = {}
        for owner in self._activity:
            entry = self.entries.get((owner, name))
            if entry is not None:
                out[owner] = entry.value
        return out

    def state_hash(self) -> str:
        """Equal on replicas holding the same entries."""
        h = hashlib.sha256()
        for _, entry in sorted(self.entries.items()):
            h.update(wire.pack(entry.to_wire()))
        return h.hexdigest()

    # -- anti-entropy -----------------------------------------------------------------------

    def digest_pages(self, owners_per_page: int) -> Iterator[DigestPage]:
        """Our digest, ``owners_per_page`` owners at a time, as consecutive owner ranges that
        together cover every possible owner (so the peer can send what we lack anywhere)."""
        owners = list(self.owners())
        if not owners:
            yield DigestPage(None, None, [])
            return
        for start in range(0, len(owners), owners_per_page):
            chunk = owners[start : start + owners_per_page]
            lo = None if start == 0 else chunk[0]
            end = start + owners_per_page
            hi = owners[end] if end < len(owners) else None
            have = [
                (owner, name, entry.clock)
                for owner in chunk
                for name in RECORD_NAMES
                if (entry := self.entries.get((owner, name))) is not None
            ]
            yield DigestPage(lo, hi, have)

    def missing_for(self, page: DigestPage) -> Iterator[Entry]:
        """Entries of owners in ``[page.lo, page.hi)`` the holder of ``page`` lacks or holds
        an older version of."""
        known = {(owner, name): clock for owner, name, clock in page.have}
        owners = self.owners()
        start = 0 if page.lo is None else bisect.bisect_left(owners, page.lo)
        end = len(owners) if page.hi is None else bisect.bisect_left(owners, page.hi)
        for owner in owners[start:end]:
            for name in RECORD_NAMES:
                entry = self.entries.get((owner, name))
                if entry is not None and known.get(entry.key, -1) < entry.clock:
                    yield entry


@dataclass(frozen=True)
class DigestPage:
    """What one replica holds for owners in ``[lo, hi)`` (None: unbounded on that side)."""

    lo: bytes | None
    hi: bytes | None
    have: list[tuple[bytes, str, int]]
