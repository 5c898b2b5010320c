"""``/peerlearn/blob/3``: bulk transfer of a content-hashed blob over one direct stream.

Exchange (each ``frame`` is length-prefixed, see ``framing``)::

    sender   -> frame(signed envelope "blob_offer" {sha256, size, kind, meta})
    receiver -> frame({ok: bool, reason: str[, bulk: invitation]})  # accepted, or why not
    (invited only)
    sender   -> frame({via: "bulk" | "stream"})       # where the body comes
    sender   -> `size` raw bytes, in chunks, on this stream; or sealed records on the
                invited bulk connection (``bulk_path``)
    receiver -> frame({ok: bool, reason: str})        # after sha256 + decode checks

A receiver with a bulk path (``bulk_path``) invites bodies of at least ``BULK_MIN_SIZE``
bytes onto a direct connection, sealed with a key the invitation carries, several times
faster than the libp2p stream; the sender falls back to the stream when that port does not
answer (a NAT in the way, say).

The receiver decides on the signed offer alone, before a byte of the body is read: the
sender must be allowed to send this kind, the size must fit the kind's limit, and memory for
the body is reserved from a global and a per-peer budget (a full budget is a polite "busy",
not an offence). A reservation lives only while its body moves: the body must start within
``BODY_START_TIMEOUT`` seconds of the acceptance and then keep a pace (``framing.Pace``), so
an offer whose body never comes holds memory for seconds, not for the transfer timeout.
Bodies nobody asked for (``model_update``, what ``node share`` sends) may hold half of the
budget at most (one peer's share, if larger), so they never crowd out the models a node
learns from. The sender only
reports success after the receiver's final ``ok``: nothing is dropped silently.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import trio

from peerlearn import wire
from peerlearn.buffers import Body, Bytes, allocate, sha256
from peerlearn.errors import NetworkError, Offence, RemoteProtocolError
from peerlearn.identity import Identity
from peerlearn.nat.policy import blob_path_allowed
from peerlearn.node.bulk_path import BulkPath, Invitation, close_connection
from peerlearn.node.config import NodeConfig
from peerlearn.node.framing import (
    DEFAULT_PACE,
    ByteStream,
    Pace,
    receive_chunks,
    receive_frame,
    send_frame,
    send_paced,
)
from peerlearn.node.host_api import Host, Stream

logger = logging.getLogger(__name__)

PROTOCOL = "/peerlearn/blob/3"
OFFER_TYPE = "blob_offer"
MAX_CONTROL_FRAME = 64 * 1024  # bytes; offers and replies
MAX_KIND_LENGTH = 64  # characters
MAX_REASON_LENGTH = 300  # characters
# Waiting for the receiver's verdict on the whole blob: it hashes, decodes and checks it.
VERDICT_PACE = Pace(idle_timeout=120.0, min_rate=1.0, grace=120.0)
_OFFER_KEYS = {"sha256", "size", "kind", "meta"}
_REPLY_KEYS = {"ok", "reason"}
_INVITING_REPLY_KEYS = {"ok", "reason", "bulk"}
VIA_BULK, VIA_STREAM = "bulk", "stream"
BULK_MIN_SIZE = 1 << 18  # bytes; smaller bodies stay on the libp2p stream (a bulk connection
# costs a TCP connect; a 1 MB model A->B took 29 ms over it (TLS then), 57 ms over the stream)
_REPLY_LIMITS = wire.Limits(max_message_size=MAX_CONTROL_FRAME, max_array_len=16, max_map_len=4)
BODY_START_TIMEOUT = 5.0  # seconds from our acceptance to the body's first byte (a sender
# whose bulk port connect fails, 3 s at most, then starts on the stream)
MAX_BLOBS_PER_PEER = 8  # bodies one peer may have reserved at once


@dataclass(frozen=True)
class BlobOffer:
    sha256: bytes
    size: int
    kind: str
    meta: dict[str, Any]


@dataclass(frozen=True)
class ReceivedBlob:
    """A blob whose bytes matched the sha256 its sender signed."""

    sender_id: str
    offer: BlobOffer
    data: Bytes = field(repr=False)  # a writable buffer: tensors may view it


class BlobRejected(NetworkError):
    """The receiving peer refused or failed to verify the blob."""


class BlobBusy(Exception):
    """A polite refusal of an offer (no room right now); not held against the sender."""


class BlobBudget:
    """Memory for inbound blob bodies: at most ``total`` bytes held at once, at most
    ``per_peer`` of them (and ``MAX_BLOBS_PER_PEER`` bodies) for one peer, and at most half
    of ``total`` (or one peer's share, if larger) for *unsolicited* bodies (shared files,
    not models to learn from). Reserved from the offer, before the body is read."""

    def __init__(self, total: int, per_peer: int) -> None:
        self.total = total
        self.per_peer = per_peer
        self.unsolicited_total = max(total // 2, per_peer)
        self.held = 0
        self.unsolicited_held = 0
        self._by_peer: Counter[str] = Counter()
        self._blobs: Counter[str] = Counter()
        self.refused = 0

    def _room(self, peer: str, size: int, unsolicited: bool) -> bool:
        return (
            self.held + size <= self.total
            and self._by_peer[peer] + size <= self.per_peer
            and self._blobs[peer] < MAX_BLOBS_PER_PEER
            and (not unsolicited or self.unsolicited_held + size <= self.unsolicited_total)
        )

    @contextmanager
    def reserve(self, peer: str, size: int, *, unsolicited: bool = False) -> Iterator[None]:
        """Hold ``size`` bytes for ``peer`` for the block; ``BlobBusy`` if there is no room."""
        if not self._room(peer, size, unsolicited):
            self.refused += 1
            raise BlobBusy(
                f"busy: {self.held >> 20} MiB of {self.total >> 20} MiB of blob memory in use"
            )
        self.held += size
        self.unsolicited_held += size if unsolicited else 0
        self._by_peer[peer] += size
        self._blobs[peer] += 1
        try:
            yield
        finally:
            self.held -= size
            self.unsolicited_held -= size if unsolicited else 0
            self._by_peer[peer] -= size
            self._blobs[peer] -= 1
            if self._blobs[peer] <= 0:
                del self._by_peer[peer], self._blobs[peer]


def parse_offer(envelope: wire.Envelope, max_size: int) -> BlobOffer:
    if envelope.type != OFFER_TYPE:
        raise RemoteProtocolError(f"expected {OFFER_TYPE!r}, got {envelope.type[:40]!r}")
    body = wire.expect_map(envelope.body, _OFFER_KEYS, "blob_offer")
    sha256 = wire.expect(body["sha256"], bytes, "blob_offer.sha256")
    size = wire.expect(body["size"], int, "blob_offer.size")
    kind = wire.expect(body["kind"], str, "blob_offer.kind")
    meta = wire.expect(body["meta"], dict, "blob_offer.meta")
    if len(sha256) != 32 or not 0 < len(kind) <= MAX_KIND_LENGTH:
        raise RemoteProtocolError("blob_offer.sha256 or blob_offer.kind is malformed")
    if not 0 <= size <= max_size:
        raise RemoteProtocolError(
            f"blob of {size} bytes exceeds the limit of {max_size}", Offence.OVERSIZED
        )
    return BlobOffer(sha256, size, kind, meta)


def encode_reply(ok: bool, reason: str = "", invitation: Invitation | None = None) -> bytes:
    reply: dict[str, Any] = {"ok": ok, "reason": reason[:MAX_REASON_LENGTH]}
    if invitation is not None:
        reply["bulk"] = invitation.encode()
    return wire.pack(reply)


def decode_reply(data: bytes) -> tuple[bool, str, Invitation | None]:
    body = wire.unpack(data, _REPLY_LIMITS)
    keys = _INVITING_REPLY_KEYS if isinstance(body, dict) and "bulk" in body else _REPLY_KEYS
    body = wire.expect_map(body, keys, "blob reply")
    ok = wire.expect(body["ok"], bool, "reply.ok")
    reason = wire.expect(body["reason"], str, "reply.reason")[:MAX_REASON_LENGTH]
    invitation = Invitation.decode(body["bulk"]) if "bulk" in body else None
    return ok, reason, invitation


def encode_via(bulk: bool) -> bytes:
    return wire.pack({"via": VIA_BULK if bulk else VIA_STREAM})


def decode_via(data: bytes) -> bool:
    """True if the body comes over the invited bulk connection."""
    body = wire.expect_map(wire.unpack(data, _REPLY_LIMITS), {"via"}, "blob via")
    via: str = wire.expect(body["via"], str, "via.via")
    if via not in (VIA_BULK, VIA_STREAM):
        raise RemoteProtocolError(f"blob via: unknown path {via[:20]!r}")
    return via == VIA_BULK


async def _expect_ok(stream: ByteStream, stage: str, pace: Pace) -> Invitation | None:
    """The peer's ok (with its invitation to the bulk path, if any); ``BlobRejected`` if
    it refused."""
    try:
        ok, reason, invitation = decode_reply(await receive_frame(stream, MAX_CONTROL_FRAME, pace))
    except RemoteProtocolError as exc:
        raise BlobRejected(f"peer {stage} with a malformed reply: {exc}") from exc
    if not ok:
        raise BlobRejected(f"peer {stage}: {reason}")
    return invitation


async def send_blob(
    stream: Stream,
    identity: Identity,
    seq: int,
    data: Body,
    *,
    kind: str,
    meta: dict[str, Any],
    chunk_size: int = 1 << 20,
    pace: Pace = DEFAULT_PACE,
    wall_clock: Callable[[], float] = time.time,
    bulk: BulkPath | None = None,
    sha256: bytes | None = None,
) -> None:
    """Offer, send and get ``data`` confirmed; raises ``NetworkError`` if not delivered.
    ``wall_clock`` dates the signed offer. With ``bulk``, the body takes the receiver's
    bulk path when it invites us to and its port answers. ``sha256``: the digest of
    ``data`` when the caller has it already (a model pushed to several peers)."""
    digest = sha256 if sha256 is not None else await digest_of(data)
    body = {"sha256": digest, "size": len(data), "kind": kind, "meta": meta}
    offer = wire.seal(identity, OFFER_TYPE, body, seq=seq, timestamp=wall_clock())
    await send_frame(stream, offer)
    invitation = await _expect_ok(stream, "refused the offer", pace)
    connection = None
    try:
        if invitation is None:
            await send_paced(stream, data, chunk_size, pace)
        else:
            connection = await _send_invited(stream, data, invitation, chunk_size, pace, bulk)
        await _expect_ok(stream, "rejected the blob", VERDICT_PACE)
    finally:
        if connection is not None:  # kept open until the verdict: the body has been read
            close_connection(connection)


async def _receive_streamed(stream: Stream, size: int, pace: Pace) -> tuple[memoryview, bytes]:
    """A body sent on the libp2p stream, written into one buffer as it comes, and its
    sha256 (hashed as it comes)."""
    buffer, digest, done = allocate(size), hashlib.sha256(), 0
    async for chunk in receive_chunks(stream, size, pace):
        buffer[done : done + len(chunk)] = chunk
        digest.update(chunk)
        done += len(chunk)
    return buffer, digest.digest()


async def digest_of(data: Body) -> bytes:
    """The digest of ``data``, off the event loop when it is large (0.1 s per 100 MB)."""
    if len(data) < BULK_MIN_SIZE:
        return sha256(data)
    return await trio.to_thread.run_sync(sha256, data)


async def _send_invited(
    stream: Stream,
    data: Body,
    invitation: Invitation,
    chunk_size: int,
    pace: Pace,
    bulk: BulkPath | None,
) -> socket.socket | None:
    """Send the body over the invited bulk connection (returned, for the caller to close),
    or over ``stream`` if we cannot reach it or have no bulk path (None)."""
    ip, peer = stream.remote_ip, stream.remote_peer_id
    connection = None
    if bulk is not None and ip is not None and bulk.reachable(peer, trio.current_time()):
        connection = await bulk.connect(peer, ip, invitation, trio.current_time())
        if connection is None:
            bulk.fallbacks += 1
    await send_frame(stream, encode_via(connection is not None))
    if bulk is None or connection is None:
        await send_paced(stream, data, chunk_size, pace)
        return None
    try:
        await bulk.send_body(connection, invitation, data, pace)
    except BaseException:
        close_connection(connection)
        raise
    return connection


async def _tell_refusal(stream: Stream, reason: str) -> None:
    """Tell the sender why (best effort: the stream may be broken already)."""
    try:
        await send_frame(stream, encode_reply(False, reason))
    except NetworkError as exc:
        logger.debug("could not tell %s why its blob was refused: %s", stream.remote_peer_id, exc)


Admit = Callable[[BlobOffer, str], AbstractContextManager[Any]]


def serve_every_blob(
    host: Host,
    max_size: int,
    accept: Callable[[ReceivedBlob], Awaitable[None]] | None = None,
    bulk: BulkPath | None = None,
) -> None:
    """Have ``host`` take every blob of at most ``max_size`` bytes from anyone, with no
    admission budget (benchmarks and tests; the daemon admits with its budgets).
    ``accept`` sees each blob received; ``bulk`` (served by the caller) takes large
    bodies."""

    async def ignore(item: ReceivedBlob) -> None:
        del item

    async def handler(stream: Stream) -> None:
        await receive_blob(
            stream,
            max_size=max_size,
            replay_guard=wire.ReplayGuard(),
            admit=lambda offer, sender: nullcontext(),
            accept=accept or ignore,
            bulk=bulk,
        )

    host.set_handler(PROTOCOL, handler)


async def receive_blob(
    stream: Stream,
    *,
    max_size: int,
    replay_guard: wire.ReplayGuard,
    admit: Admit,
    accept: Callable[[ReceivedBlob], Awaitable[None]],
    pace: Pace = DEFAULT_PACE,
    wall_clock: Callable[[], float] = time.time,
    bulk: BulkPath | None = None,
) -> ReceivedBlob | None:
    """Serve one incoming blob (inviting a large body onto ``bulk``, if given).

    ``admit(offer, sender_id)`` decides on the offer before the body is read: it returns a
    context manager held while the body is in memory (a budget reservation), or raises
    ``BlobBusy`` (a polite refusal) or ``RemoteProtocolError`` (an offence). ``accept`` may
    raise either too, to refuse the blob after all. Every rejection is sent to the peer
    and then raised, so the host counts it; returns None after a polite refusal.
    """
    with ExitStack() as holding:
        try:
            envelope = wire.open_envelope(
                await receive_frame(stream, MAX_CONTROL_FRAME, pace),
                expected_sender=stream.remote_public_key,
            )
            replay_guard.check(envelope, wall_clock())
            offer = parse_offer(envelope, max_size)
            holding.enter_context(admit(offer, stream.remote_peer_id))
        except BlobBusy as exc:
            await _tell_refusal(stream, str(exc))
            return None
        except RemoteProtocolError as exc:
            await _tell_refusal(stream, str(exc))
            raise
        invitation, connection = None, None
        if bulk is not None and offer.size >= BULK_MIN_SIZE and not stream.relayed:
            invitation = bulk.invite()
            connection = holding.enter_context(bulk.expecting(invitation))
        await send_frame(stream, encode_reply(True, invitation=invitation))
        body_pace = dataclasses.replace(pace, start_timeout=BODY_START_TIMEOUT)
        data: Bytes
        if (
            bulk is not None
            and connection is not None
            and decode_via(await receive_frame(stream, MAX_CONTROL_FRAME, body_pace))
        ):
            assert invitation is not None  # invited together with the connection
            data, digest = await bulk.receive_body(connection, invitation, offer.size, body_pace)
        else:
            data, digest = await _receive_streamed(stream, offer.size, body_pace)
        blob = ReceivedBlob(stream.remote_peer_id, offer, data)
        try:
            if digest != offer.sha256:
                raise RemoteProtocolError(
                    "sha256 of the received bytes does not match the offer", Offence.FORGED
                )
            await accept(blob)
        except BlobBusy as exc:
            await _tell_refusal(stream, str(exc))
            return None
        except RemoteProtocolError as exc:
            await _tell_refusal(stream, str(exc))
            raise
    await send_frame(stream, encode_reply(True))
    return blob


async def push_blob(
    open_stream: Callable[[], Awaitable[Stream]],
    identity: Identity,
    seq: int,
    data: Body,
    *,
    kind: str,
    meta: dict[str, Any],
    chunk_size: int = 1 << 20,
    wall_clock: Callable[[], float] = time.time,
    bulk: BulkPath | None = None,
    sha256: bytes | None = None,
) -> None:
    """Open a stream, send the blob and close the stream (wrap in ``trio.fail_after``)."""
    stream = await open_stream()
    try:
        await send_blob(
            stream,
            identity,
            seq,
            data,
            kind=kind,
            meta=meta,
            chunk_size=chunk_size,
            wall_clock=wall_clock,
            bulk=bulk,
            sha256=sha256,
        )
    finally:
        await stream.close()


async def deliver(
    host: Host,
    sequence: wire.SequenceCounter,
    peer_id: str,
    data: Body,
    *,
    kind: str,
    meta: dict[str, Any],
    config: NodeConfig,
    wall_clock: Callable[[], float] = time.time,
    bulk: BulkPath | None = None,
    sha256: bytes | None = None,
) -> str | None:
    """Push ``data`` to ``peer_id`` within ``config.blob_timeout`` s, in
    ``config.blob_chunk_size`` writes; None once acknowledged, else why not.

    Over a relayed-only connection the blob is not sent unless ``config.relay_blobs``: relays
    are for small messages, models wait for the direct path hole punching is working on.
    """
    timeout = config.blob_timeout
    if not blob_path_allowed(host.paths().get(peer_id), config.relay_blobs):
        return "only a relayed connection (models need a direct one; relay_blobs allows it)"

    try:
        with trio.fail_after(timeout):
            await push_blob(
                lambda: host.open_stream(peer_id, PROTOCOL),
                host.identity,
                sequence.next(wall_clock()),
                data,
                kind=kind,
                meta=meta,
                chunk_size=config.blob_chunk_size,
                wall_clock=wall_clock,
                bulk=bulk,
                sha256=sha256,
            )
    except NetworkError as exc:
        return str(exc)
    except trio.TooSlowError:
        return f"no acknowledgement within {timeout:.0f} s"
    return None
