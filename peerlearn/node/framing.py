"""Length-prefixed frames over any byte stream with trio-style ``receive_some``/``send_all``,
with a pace every transfer must keep: a peer that goes silent, or trickles bytes, is cut off
within seconds instead of holding a stream (and its buffers) for the whole transfer timeout."""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

import trio

from peerlearn.buffers import Body, chunks
from peerlearn.errors import NetworkError, Offence, RemoteProtocolError, TransferTooSlowError

_HEADER = struct.Struct(">I")  # 4-byte big-endian payload length
READ_SIZE = 1 << 20  # bytes asked for per receive_some


class ByteStream(Protocol):
    async def receive_some(self, max_bytes: int = ...) -> bytes: ...

    async def send_all(self, data: bytes) -> None: ...


@dataclass(frozen=True)
class Pace:
    """The slowest a peer may be: no byte for ``idle_timeout`` seconds, or fewer than
    ``min_rate`` bytes per second on average once ``grace`` seconds have passed, ends the
    transfer with ``TransferTooSlowError``."""

    idle_timeout: float = 30.0  # seconds
    min_rate: float = 64 * 1024  # bytes per second
    # Also how long the first byte of a reply may take: a busy peer (a whole swarm sharing
    # two cores, say) can take several seconds to get to a new stream.
    grace: float = 20.0  # seconds before the rate counts
    start_timeout: float = float("inf")  # seconds the first byte may take (a body's: short)

    def deadline(self, started: float, done: int, last_progress: float) -> float:
        """When the transfer fails unless another byte moves."""
        by_rate = started + self.grace + (done + 1) / self.min_rate
        if done == 0:
            by_rate = min(by_rate, started + self.start_timeout)
        return min(last_progress + self.idle_timeout, by_rate)

    def why(self, started: float, done: int, last_progress: float, now: float) -> str:
        if done == 0 and now >= started + self.start_timeout:
            return f"nothing within {self.start_timeout:.0f} s"
        if now >= last_progress + self.idle_timeout:
            return f"no data for {self.idle_timeout:.0f} s"
        rate = done / max(now - started, 1e-9)
        return f"{rate:.0f} B/s is below the minimum of {self.min_rate:.0f} B/s"


DEFAULT_PACE = Pace()


async def receive_exactly(stream: ByteStream, count: int, pace: Pace = DEFAULT_PACE) -> bytes:
    """Exactly ``count`` bytes; ``NetworkError`` if the stream ends first, and
    ``TransferTooSlowError`` if the peer does not keep ``pace``."""
    parts: list[bytes] = []
    async for chunk in receive_chunks(stream, count, pace):
        parts.append(chunk)
    return b"".join(parts)


async def receive_chunks(
    stream: ByteStream, count: int, pace: Pace = DEFAULT_PACE
) -> AsyncIterator[bytes]:
    """The next ``count`` bytes as they arrive, at the given pace."""
    started = last = trio.current_time()
    done = 0
    while done < count:
        chunk = b""
        with trio.move_on_at(pace.deadline(started, done, last)):
            chunk = await stream.receive_some(min(count - done, READ_SIZE))
            if not chunk:
                raise NetworkError(f"stream ended after {done} of {count} bytes")
        if not chunk:
            now = trio.current_time()
            raise TransferTooSlowError(
                f"after {done} of {count} bytes: {pace.why(started, done, last, now)}"
            )
        done += len(chunk)
        last = trio.current_time()
        yield chunk


async def send_paced(stream: ByteStream, data: Body, chunk_size: int, pace: Pace) -> None:
    """Write ``data`` in chunks; ``TransferTooSlowError`` if the peer stops reading."""
    started = last = trio.current_time()
    done = 0
    for chunk in chunks(data, chunk_size):
        with trio.move_on_at(pace.deadline(started, done, last)) as scope:
            await stream.send_all(bytes(chunk))
        if scope.cancelled_caught:
            now = trio.current_time()
            raise TransferTooSlowError(
                f"peer stopped reading after {done} of {len(data)} bytes: "
                f"{pace.why(started, done, last, now)}"
            )
        done += len(chunk)
        last = trio.current_time()


async def send_frame(stream: ByteStream, payload: bytes) -> None:
    await stream.send_all(_HEADER.pack(len(payload)) + payload)


async def receive_frame(stream: ByteStream, max_size: int, pace: Pace = DEFAULT_PACE) -> bytes:
    """One frame of at most ``max_size`` bytes (checked before anything is buffered)."""
    return await _frame_body(
        stream, await receive_exactly(stream, _HEADER.size, pace), max_size, pace
    )


async def receive_next_frame(
    stream: ByteStream, max_size: int, pace: Pace, wait: float
) -> bytes | None:
    """The next frame of a stream that carries many, or None if the stream ends, or stays
    silent for ``wait`` seconds, before a frame begins."""
    first = b""
    with trio.move_on_after(wait):
        first = await stream.receive_some(_HEADER.size)
    if not first:
        return None
    header = first + await receive_exactly(stream, _HEADER.size - len(first), pace)
    return await _frame_body(stream, header, max_size, pace)


async def _frame_body(stream: ByteStream, header: bytes, max_size: int, pace: Pace) -> bytes:
    (size,) = _HEADER.unpack(header)
    if size > max_size:
        raise RemoteProtocolError(
            f"frame of {size} bytes exceeds the limit of {max_size}", Offence.OVERSIZED
        )
    return await receive_exactly(stream, size, pace)
