"""The wire format: bounded msgpack, signed envelopes, replay protection (tensors: ``tensors``).

Envelope on the wire (a msgpack map with exactly these keys)::

    {type: str, version: int, sender: bin(32), seq: int, timestamp: float,
     body: bin, signature: bin(64)}

``body`` is the msgpack encoding of the message body. The signature covers the
canonical bytes ``msgpack([DOMAIN, type, version, sender, seq, timestamp, body])``,
so the body is only decoded once the signature has been checked.

Every decoder here turns *any* input into a value or a ``RemoteProtocolError``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn

import msgpack

from peerlearn.buffers import Bytes, Segments
from peerlearn.errors import LocalProtocolError, Offence, RemoteProtocolError
from peerlearn.identity import (
    PUBLIC_KEY_SIZE,
    SIGNATURE_SIZE,
    Identity,
    peer_id_from_public_key,
    verify_signature,
)

WIRE_VERSION = 1
SIGNATURE_DOMAIN = b"peerlearn/envelope/v1"
MAX_TYPE_LENGTH = 64  # characters


@dataclass(frozen=True)
class Limits:
    """Bounds on what a peer can make us decode."""

    max_message_size: int = 1 * 2**20  # bytes; control and gossip messages
    max_array_len: int = 10_000  # elements per msgpack array
    max_map_len: int = 1_000  # entries per msgpack map


DEFAULT_LIMITS = Limits()


def _reject_ext(code: int, data: bytes) -> NoReturn:
    raise RemoteProtocolError(f"msgpack ext type {code} is not allowed")


def pack(obj: Any) -> bytes:
    """Encode ``obj`` as msgpack (bin for bytes, str for text, no ext types)."""
    try:
        return msgpack.packb(obj, use_bin_type=True, datetime=False)  # type: ignore[no-any-return]
    except (TypeError, ValueError, OverflowError) as exc:
        raise LocalProtocolError(f"cannot encode {type(obj).__name__}: {exc}") from exc


def _bin_header(size: int) -> bytes:
    """The msgpack bin header of ``size`` bytes (bin 8, 16 or 32, as ``pack`` writes)."""
    if size < 1 << 8:
        return b"\xc4" + size.to_bytes(1, "big")
    if size < 1 << 16:
        return b"\xc5" + size.to_bytes(2, "big")
    if size < 1 << 32:
        return b"\xc6" + size.to_bytes(4, "big")
    raise LocalProtocolError(f"cannot encode {size} bytes as one msgpack bin (4 GiB at most)")


def pack_segments(mapping: Mapping[str, Any]) -> Segments:
    """``pack(dict(mapping))``, the bytes-like values framed but not copied into the
    encoding (a checkpoint's model and optimizer state)."""
    packer = msgpack.Packer(use_bin_type=True, datetime=False)
    parts: list[Bytes] = [packer.pack_map_header(len(mapping))]
    for key, value in mapping.items():
        parts.append(pack(key))
        if isinstance(value, Bytes):
            view = memoryview(value).cast("B")
            parts += [_bin_header(view.nbytes), view]
        else:
            parts.append(pack(value))
    return Segments(parts)


def _unpacker(data: Any, limits: Limits) -> msgpack.Unpacker:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise RemoteProtocolError(f"expected bytes, got {type(data).__name__}")
    if len(data) > limits.max_message_size:
        raise RemoteProtocolError(
            f"message of {len(data)} bytes exceeds the limit of {limits.max_message_size}",
            Offence.OVERSIZED,
        )
    unpacker = msgpack.Unpacker(
        raw=False,
        use_list=True,
        strict_map_key=True,
        ext_hook=_reject_ext,
        max_buffer_size=max(limits.max_message_size, 1),
        max_array_len=limits.max_array_len,
        max_map_len=limits.max_map_len,
        max_ext_len=0,
    )
    unpacker.feed(data)
    return unpacker


def _next_value(unpacker: msgpack.Unpacker) -> Any:
    try:
        return unpacker.unpack()
    except msgpack.OutOfData as exc:
        raise RemoteProtocolError("truncated msgpack") from exc
    except (ValueError, msgpack.UnpackException, RecursionError) as exc:
        # ValueError covers ExtraData, FormatError, StackError and limit violations.
        raise RemoteProtocolError(f"malformed msgpack: {type(exc).__name__}: {exc}") from exc


def unpack(data: Bytes, limits: Limits = DEFAULT_LIMITS) -> Any:
    """Decode one msgpack value from ``data`` within ``limits``; anything else is rejected."""
    unpacker = _unpacker(data, limits)
    value = _next_value(unpacker)
    if unpacker.tell() != len(data):
        raise RemoteProtocolError(f"{len(data) - unpacker.tell()} trailing bytes after msgpack")
    return value


def unpack_sequence(data: bytes, limits: Limits, max_values: int) -> Iterator[Any]:
    """Decode consecutive msgpack values (each within ``limits``), at most ``max_values``."""
    unpacker = _unpacker(data, limits)
    for _ in range(max_values):
        if unpacker.tell() == len(data):
            return
        yield _next_value(unpacker)
    if unpacker.tell() != len(data):
        raise RemoteProtocolError(f"more than {max_values} msgpack values", Offence.OVERSIZED)


# --- schema helpers -------------------------------------------------------------------------


def _describe_keys(keys: Any) -> str:
    """Keys of any types (a hostile map mixes str and bytes), described without sorting them."""
    shown = sorted(repr(k)[:40] for k in list(keys)[:8])
    return "[" + ", ".join(shown) + (", ..." if len(keys) > 8 else "") + "]"


def expect_map(value: Any, keys: set[str], what: str) -> dict[str, Any]:
    """Check that ``value`` is a map with exactly ``keys``."""
    if not isinstance(value, dict):
        raise RemoteProtocolError(f"{what}: expected a map, got {type(value).__name__}")
    if value.keys() != keys:
        raise RemoteProtocolError(
            f"{what}: expected keys {sorted(keys)}, got {_describe_keys(value.keys())}"
        )
    return value


def expect(value: Any, kind: type | tuple[type, ...], what: str) -> Any:
    """Check the type of a decoded field (bool is never accepted as int)."""
    if isinstance(value, bool) and kind is not bool:
        raise RemoteProtocolError(f"{what}: expected {kind}, got bool")
    if not isinstance(value, kind):
        raise RemoteProtocolError(f"{what}: expected {kind}, got {type(value).__name__}")
    return value


# --- envelopes ------------------------------------------------------------------------------

_ENVELOPE_KEYS = {"type", "version", "sender", "seq", "timestamp", "body", "signature"}


@dataclass(frozen=True)
class Envelope:
    """A verified, signed message."""

    type: str
    version: int
    sender: bytes
    seq: int
    timestamp: float
    body: Any
    signature: bytes = field(repr=False)

    @property
    def sender_id(self) -> str:
        return peer_id_from_public_key(self.sender)


def _signed_bytes(
    msg_type: str, version: int, sender: bytes, seq: int, timestamp: float, body: bytes
) -> bytes:
    return pack([SIGNATURE_DOMAIN, msg_type, version, sender, seq, timestamp, body])


def seal(identity: Identity, msg_type: str, body: Any, *, seq: int, timestamp: float) -> bytes:
    """Sign ``body`` as a message of ``msg_type`` and return the envelope bytes."""
    if not msg_type or len(msg_type) > MAX_TYPE_LENGTH:
        raise LocalProtocolError(f"message type must be 1..{MAX_TYPE_LENGTH} characters")
    if seq < 0:
        raise LocalProtocolError("seq must be non-negative")
    body_bytes = pack(body)
    sender = identity.public_key
    timestamp = float(timestamp)
    signature = identity.sign(
        _signed_bytes(msg_type, WIRE_VERSION, sender, seq, timestamp, body_bytes)
    )
    return pack(
        {
            "type": msg_type,
            "version": WIRE_VERSION,
            "sender": sender,
            "seq": seq,
            "timestamp": timestamp,
            "body": body_bytes,
            "signature": signature,
        }
    )


def open_envelope(
    data: bytes,
    limits: Limits = DEFAULT_LIMITS,
    *,
    expected_sender: bytes | None = None,
) -> Envelope:
    """Decode and verify an envelope. Raises ``RemoteProtocolError`` with a clear reason."""
    raw = expect_map(unpack(data, limits), _ENVELOPE_KEYS, "envelope")
    msg_type = expect(raw["type"], str, "envelope.type")
    version = expect(raw["version"], int, "envelope.version")
    sender = expect(raw["sender"], bytes, "envelope.sender")
    seq = expect(raw["seq"], int, "envelope.seq")
    timestamp = expect(raw["timestamp"], float, "envelope.timestamp")
    body_bytes = expect(raw["body"], bytes, "envelope.body")
    signature = expect(raw["signature"], bytes, "envelope.signature")
    if version != WIRE_VERSION:
        raise RemoteProtocolError(f"unsupported wire version {version} (we speak {WIRE_VERSION})")
    if not msg_type or len(msg_type) > MAX_TYPE_LENGTH:
        raise RemoteProtocolError("envelope.type has an invalid length")
    if len(sender) != PUBLIC_KEY_SIZE or len(signature) != SIGNATURE_SIZE:
        raise RemoteProtocolError("envelope.sender or envelope.signature has the wrong size")
    if not 0 <= seq < 2**64 or not math.isfinite(timestamp):
        raise RemoteProtocolError("envelope.seq or envelope.timestamp is out of range")
    if expected_sender is not None and sender != expected_sender:
        raise RemoteProtocolError(
            f"wrong sender: envelope signed by {peer_id_from_public_key(sender)}, "
            f"but it came from {peer_id_from_public_key(expected_sender)}",
            Offence.FORGED,
        )
    signed = _signed_bytes(msg_type, version, sender, seq, timestamp, body_bytes)
    if not verify_signature(sender, signature, signed):
        raise RemoteProtocolError(
            f"bad signature on {msg_type!r} from {peer_id_from_public_key(sender)}",
            Offence.FORGED,
        )
    body = unpack(body_bytes, limits)
    return Envelope(msg_type, version, sender, seq, timestamp, body, signature)


class SequenceCounter:
    """Strictly increasing sequence numbers that stay increasing across restarts.

    Seeded from the wall clock in microseconds, so a restarted daemon does not
    reuse numbers its peers have already seen.
    """

    def __init__(self, now: float) -> None:
        self._last = int(now * 1_000_000)

    def next(self, now: float) -> int:
        self._last = max(self._last + 1, int(now * 1_000_000))
        return self._last


class ReplayGuard:
    """Rejects replayed, stale and future-dated envelopes (sans-I/O: pass ``now``).

    A message is accepted once per (sender, seq), in any order. Messages older than
    ``max_age`` seconds are rejected outright, so per-sender state only has to
    cover that window and is evicted after it; the guard's memory is bounded by
    ``max_senders`` and ``window`` seqs per sender: beyond that the lowest seqs are
    forgotten and everything at or below them is refused.
    """

    def __init__(
        self,
        *,
        max_age: float = 600.0,
        max_clock_skew: float = 60.0,
        window: int = 4096,
        max_senders: int = 100_000,
    ) -> None:
        self.max_age = max_age
        self.max_clock_skew = max_clock_skew
        self.window = window
        self.max_senders = max_senders
        self._seen: OrderedDict[bytes, tuple[float, set[int], int]] = OrderedDict()

    def check(self, envelope: Envelope, now: float) -> None:
        """Record ``envelope`` or raise ``RemoteProtocolError`` saying why it is rejected."""
        who = envelope.sender_id
        if envelope.timestamp < now - self.max_age:
            raise RemoteProtocolError(
                f"stale message from {who}: {now - envelope.timestamp:.0f} s old",
                Offence.REPLAYED,
            )
        if envelope.timestamp > now + self.max_clock_skew:
            raise RemoteProtocolError(
                f"message from {who} is dated {envelope.timestamp - now:.0f} s in the future",
                Offence.REPLAYED,
            )
        self._evict(now)
        last_seen, seqs, floor = self._seen.pop(envelope.sender, (now, set(), -1))
        if envelope.seq in seqs or envelope.seq <= floor:
            self._seen[envelope.sender] = (last_seen, seqs, floor)
            raise RemoteProtocolError(
                f"replayed message from {who} (seq {envelope.seq})", Offence.REPLAYED
            )
        seqs.add(envelope.seq)
        if len(seqs) > self.window:  # one over: forget the lowest
            lowest = min(seqs)
            floor = max(floor, lowest)
            seqs.discard(lowest)
        self._seen[envelope.sender] = (now, seqs, floor)

    def _evict(self, now: float) -> None:
        while self._seen:
            sender, (last_seen, _, _) = next(iter(self._seen.items()))
            if last_seen >= now - self.max_age - self.max_clock_skew and (
                len(self._seen) < self.max_senders
            ):
                break
            del self._seen[sender]
