"""``/peerlearn/blob/1``: bulk transfer of a content-hashed blob over one direct stream.

Exchange (each ``frame`` is length-prefixed, see ``framing``)::

    sender   -> frame(signed envelope "blob_offer" {sha256, size, kind, meta})
    receiver -> frame({accept: bool, reason: str})
    sender   -> `size` raw bytes, written in chunks
    receiver -> frame({ok: bool, reason: str})        # after sha256 + decode checks

The sender only reports success after the receiver's ``ok``: nothing is dropped silently.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from peerlearn import wire
from peerlearn.errors import NetworkError, RemoteProtocolError
from peerlearn.identity import Identity
from peerlearn.nat.policy import blob_path_allowed
from peerlearn.node.framing import ByteStream, receive_exactly, receive_frame, send_frame
from peerlearn.node.host import P2PHost, Stream

logger = logging.getLogger(__name__)

PROTOCOL = "/peerlearn/blob/1"
OFFER_TYPE = "blob_offer"
MAX_CONTROL_FRAME = 64 * 1024  # bytes; offers and replies
MAX_KIND_LENGTH = 64  # characters
_OFFER_KEYS = {"sha256", "size", "kind", "meta"}
_REPLY_KEYS = {"ok", "reason"}


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
    data: bytes = field(repr=False)


class BlobRejected(NetworkError):
    """The receiving peer refused or failed to verify the blob."""


def parse_offer(envelope: wire.Envelope, max_size: int) -> BlobOffer:
    if envelope.type != OFFER_TYPE:
        raise RemoteProtocolError(f"expected {OFFER_TYPE!r}, got {envelope.type!r}")
    body = wire.expect_map(envelope.body, _OFFER_KEYS, "blob_offer")
    sha256 = wire.expect(body["sha256"], bytes, "blob_offer.sha256")
    size = wire.expect(body["size"], int, "blob_offer.size")
    kind = wire.expect(body["kind"], str, "blob_offer.kind")
    meta = wire.expect(body["meta"], dict, "blob_offer.meta")
    if len(sha256) != 32 or not 0 < len(kind) <= MAX_KIND_LENGTH:
        raise RemoteProtocolError("blob_offer.sha256 or blob_offer.kind is malformed")
    if not 0 <= size <= max_size:
        raise RemoteProtocolError(f"blob of {size} bytes exceeds the limit of {max_size}")
    return BlobOffer(sha256, size, kind, meta)


def _reply(ok: bool, reason: str = "") -> bytes:
    return wire.pack({"ok": ok, "reason": reason})


def _parse_reply(data: bytes) -> tuple[bool, str]:
    body = wire.expect_map(wire.unpack(data), _REPLY_KEYS, "blob reply")
    return wire.expect(body["ok"], bool, "reply.ok"), wire.expect(body["reason"], str, "reason")


async def _expect_ok(stream: ByteStream, stage: str) -> None:
    ok, reason = _parse_reply(await receive_frame(stream, MAX_CONTROL_FRAME))
    if not ok:
        raise BlobRejected(f"peer {stage}: {reason}")


async def send_blob(
    stream: Stream,
    identity: Identity,
    seq: int,
    data: bytes,
    *,
    kind: str,
    meta: dict[str, Any],
    chunk_size: int = 1 << 20,
) -> None:
    """Offer, send and get ``data`` confirmed; raises ``NetworkError`` if not delivered."""
    body = {"sha256": hashlib.sha256(data).digest(), "size": len(data), "kind": kind, "meta": meta}
    offer = wire.seal(identity, OFFER_TYPE, body, seq=seq, timestamp=time.time())
    await send_frame(stream, offer)
    await _expect_ok(stream, "refused the offer")
    view = memoryview(data)
    for start in range(0, len(data), chunk_size):
        await stream.send_all(bytes(view[start : start + chunk_size]))
    await _expect_ok(stream, "rejected the blob")


async def receive_blob(
    stream: Stream,
    *,
    max_size: int,
    replay_guard: wire.ReplayGuard,
    accept: Callable[[ReceivedBlob], Awaitable[None]],
) -> ReceivedBlob | None:
    """Serve one incoming blob. ``accept`` may raise ``RemoteProtocolError`` to reject it.

    Returns the blob, or None when it was rejected (the reason is sent to the peer and logged).
    """
    try:
        envelope = wire.open_envelope(
            await receive_frame(stream, MAX_CONTROL_FRAME),
            expected_sender=stream.remote_public_key,
        )
        replay_guard.check(envelope, time.time())
        offer = parse_offer(envelope, max_size)
    except RemoteProtocolError as exc:
        logger.warning("refused blob offer from %s: %s", stream.remote_peer_id, exc)
        await send_frame(stream, _reply(False, str(exc)))
        return None
    await send_frame(stream, _reply(True))
    data = await receive_exactly(stream, offer.size)
    blob = ReceivedBlob(stream.remote_peer_id, offer, data)
    try:
        if hashlib.sha256(data).digest() != offer.sha256:
            raise RemoteProtocolError("sha256 of the received bytes does not match the offer")
        await accept(blob)
    except RemoteProtocolError as exc:
        logger.warning("rejected %s blob from %s: %s", offer.kind, blob.sender_id, exc)
        await send_frame(stream, _reply(False, str(exc)))
        return None
    await send_frame(stream, _reply(True))
    return blob


async def push_blob(
    open_stream: Callable[[], Awaitable[Stream]],
    identity: Identity,
    seq: int,
    data: bytes,
    *,
    kind: str,
    meta: dict[str, Any],
    chunk_size: int = 1 << 20,
) -> None:
    """Open a stream, send the blob and close the stream (wrap in ``trio.fail_after``)."""
    stream = await open_stream()
    try:
        await send_blob(stream, identity, seq, data, kind=kind, meta=meta, chunk_size=chunk_size)
    finally:
        await stream.close()


async def deliver(
    host: P2PHost,
    sequence: wire.SequenceCounter,
    peer_id: str,
    data: bytes,
    *,
    kind: str,
    meta: dict[str, Any],
    timeout: float,  # noqa: ASYNC109 - the deadline is part of the outcome reported
    chunk_size: int,
    relay_blobs: bool,
) -> str | None:
    """Push ``data`` to ``peer_id`` within ``timeout`` s; None once acknowledged, else why not.

    Over a relayed-only connection the blob is not sent unless ``relay_blobs``: relays are
    for small messages, models wait for the direct path hole punching is working on.
    """
    if not blob_path_allowed(host.paths().get(peer_id), relay_blobs):
        return "only a relayed connection (models need a direct one; relay_blobs allows it)"

    try:
        with trio.fail_after(timeout):
            await push_blob(
                lambda: host.open_stream(peer_id, PROTOCOL),
                host.identity,
                sequence.next(time.time()),
                data,
                kind=kind,
                meta=meta,
                chunk_size=chunk_size,
            )
    except NetworkError as exc:
        return str(exc)
    except trio.TooSlowError:
        return f"no acknowledgement within {timeout:.0f} s"
    return None
