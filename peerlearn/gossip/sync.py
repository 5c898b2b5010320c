"""Anti-entropy over ``/peerlearn/sync/2``: the wire codec (sans-I/O).

One session pulls what the initiator lacks from the responder, in bounded frames, so
replicas of any allowed size converge (one 8 MiB frame used to break for larger states)::

    initiator -> hello {member: our member entry}
    responder -> hello {member: its member entry}  |  refused {reason}
    for each page of the initiator's digest (``OWNERS_PER_PAGE`` owners, an owner range):
        initiator -> want {lo, hi, have: [[owner, name, clock], ...]}
        responder -> entries {entries: [...], more: true} ... entries {entries, more: false}

Both sides check the other's member entry (signature and admission) before revealing
anything, so a swarm with an allowlist or invites shows its state to members only. Each
side pulls from the other (on every new connection and every anti-entropy period), so
pulling one way per session is enough. Every frame is a msgpack map with a ``t`` field and
decodes to one of the frame classes here or to ``RemoteProtocolError``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from peerlearn import wire
from peerlearn.errors import Offence, RemoteProtocolError
from peerlearn.gossip.crdt import DigestPage, Entry, entries_from_list, entry_from_wire
from peerlearn.gossip.schemas import RECORD_NAMES
from peerlearn.identity import PUBLIC_KEY_SIZE

SYNC_PROTOCOL = "/peerlearn/sync/2"
MAX_SYNC_FRAME = 1 * 2**20  # bytes
OWNERS_PER_PAGE = 512
MAX_HAVE = OWNERS_PER_PAGE * len(RECORD_NAMES)
MAX_REASON = 200  # characters
MAX_ENTRIES_PER_FRAME = 512  # keeps the work one frame costs the receiver's event loop small
LIMITS = wire.Limits(max_message_size=MAX_SYNC_FRAME, max_array_len=MAX_HAVE, max_map_len=8)


@dataclass(frozen=True)
class Hello:
    member: Entry  # not yet verified


@dataclass(frozen=True)
class Refused:
    reason: str


@dataclass(frozen=True)
class Want:
    page: DigestPage


@dataclass(frozen=True)
class Entries:
    entries: list[Entry]  # not yet verified
    more: bool


Frame = Hello | Refused | Want | Entries


def encode_hello(member: Entry) -> bytes:
    return wire.pack({"t": "hello", "member": member.to_wire()})


def encode_refused(reason: str) -> bytes:
    return wire.pack({"t": "refused", "reason": reason[:MAX_REASON]})


def encode_want(page: DigestPage) -> bytes:
    have = [[owner, name, clock] for owner, name, clock in page.have]
    return wire.pack({"t": "want", "lo": page.lo, "hi": page.hi, "have": have})


def encode_entries(entries: Iterable[Entry], max_frame: int = MAX_SYNC_FRAME) -> Iterator[bytes]:
    """``entries`` as frames of at most ``max_frame`` bytes and ``MAX_ENTRIES_PER_FRAME``
    entries; the last says ``more: false``."""
    batch: list[list[Any]] = []
    size = 0
    for entry in entries:
        raw = entry.to_wire()
        item_size = len(wire.pack(raw))
        if batch and (size + item_size + 64 > max_frame or len(batch) >= MAX_ENTRIES_PER_FRAME):
            yield wire.pack({"t": "entries", "entries": batch, "more": True})
            batch, size = [], 0
        batch.append(raw)
        size += item_size
    yield wire.pack({"t": "entries", "entries": batch, "more": False})


def _owner_bound(value: Any, what: str) -> bytes | None:
    if value is None:
        return None
    bound = wire.expect(value, bytes, what)
    if len(bound) != PUBLIC_KEY_SIZE:
        raise RemoteProtocolError(f"{what} must be an owner key")
    return bytes(bound)


def _have(raw: Any) -> list[tuple[bytes, str, int]]:
    items = wire.expect(raw, list, "want.have")
    out = []
    for item in items:
        if (
            not isinstance(item, list)
            or len(item) != 3
            or not isinstance(item[0], bytes)
            or len(item[0]) != PUBLIC_KEY_SIZE
            or item[1] not in RECORD_NAMES
            or not isinstance(item[2], int)
            or isinstance(item[2], bool)
        ):
            raise RemoteProtocolError("want.have items must be [owner, record name, clock]")
        out.append((item[0], item[1], item[2]))
    return out


def decode_frame(data: bytes) -> Frame:
    """One sync frame; ``RemoteProtocolError`` for anything else."""
    raw = wire.unpack(data, LIMITS)
    if not isinstance(raw, dict):
        raise RemoteProtocolError("a sync frame is a map")
    kind = raw.get("t")
    if kind == "hello":
        wire.expect_map(raw, {"t", "member"}, "hello")
        member = entry_from_wire(raw["member"])
        if member.name != "member":
            raise RemoteProtocolError("hello must carry a member record")
        return Hello(member)
    if kind == "refused":
        wire.expect_map(raw, {"t", "reason"}, "refused")
        return Refused(wire.expect(raw["reason"], str, "refused.reason")[:MAX_REASON])
    if kind == "want":
        wire.expect_map(raw, {"t", "lo", "hi", "have"}, "want")
        lo, hi = _owner_bound(raw["lo"], "want.lo"), _owner_bound(raw["hi"], "want.hi")
        if lo is not None and hi is not None and lo >= hi:
            raise RemoteProtocolError("want.lo must be below want.hi")
        have = _have(raw["have"])
        if len(have) > MAX_HAVE:
            raise RemoteProtocolError("want.have is too long", Offence.OVERSIZED)
        return Want(DigestPage(lo, hi, have))
    if kind == "entries":
        wire.expect_map(raw, {"t", "entries", "more"}, "entries")
        more = wire.expect(raw["more"], bool, "entries.more")
        return Entries(entries_from_list(raw["entries"]), more)
    raise RemoteProtocolError(f"unknown sync frame {str(kind)[:20]!r}")
