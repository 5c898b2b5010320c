"""Length-prefixed frames over any byte stream with trio-style ``receive_some``/``send_all``."""

from __future__ import annotations

import struct
from typing import Protocol

from peerlearn.errors import NetworkError, RemoteProtocolError

_HEADER = struct.Struct(">I")  # 4-byte big-endian payload length


class ByteStream(Protocol):
    async def receive_some(self, max_bytes: int = ...) -> bytes: ...

    async def send_all(self, data: bytes) -> None: ...


async def receive_exactly(stream: ByteStream, count: int) -> bytes:
    """Exactly ``count`` bytes; ``NetworkError`` if the stream ends first."""
    parts: list[bytes] = []
    missing = count
    while missing:
        chunk = await stream.receive_some(min(missing, 1 << 20))
        if not chunk:
            raise NetworkError(f"stream ended after {count - missing} of {count} bytes")
        parts.append(chunk)
        missing -= len(chunk)
    return b"".join(parts)


async def send_frame(stream: ByteStream, payload: bytes) -> None:
    await stream.send_all(_HEADER.pack(len(payload)) + payload)


async def receive_frame(stream: ByteStream, max_size: int) -> bytes:
    """One frame of at most ``max_size`` bytes (checked before anything is buffered)."""
    (size,) = _HEADER.unpack(await receive_exactly(stream, _HEADER.size))
    if size > max_size:
        raise RemoteProtocolError(f"frame of {size} bytes exceeds the limit of {max_size}")
    return await receive_exactly(stream, size)
