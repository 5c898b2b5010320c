"""What the daemon needs from a peer-to-peer host, and the rules every host applies.

``Host`` and ``Stream`` are the narrow interface the daemon's services program against. The
libp2p adapter (``peerlearn.node.host``) is the real one; tests plug in an in-process host
so whole swarms run in virtual time. Whichever host runs, inbound streams pass through
``serve_stream``, so the trust boundary is the same code for both.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol

import trio

from peerlearn.errors import (
    NetworkError,
    Offence,
    RemoteProtocolError,
    TransferTooSlowError,
)
from peerlearn.identity import Identity

MAX_PUBLISH_SIZE = 256 * 1024  # bytes; gossip carries small messages only (pubsub drops > 1 MiB)
REFUSAL_GRACE = 2.0  # seconds a peer whose input we refused has to read why, before the reset
REFUSAL_DRAIN = 64 * 1024  # bytes we read from it meanwhile (and drop), at most

logger = logging.getLogger(__name__)


class Stream(Protocol):
    """A byte stream to one authenticated peer, with trio-like method names."""

    remote_peer_id: str
    remote_public_key: bytes

    @property
    def remote_ip(self) -> str | None:
        """The peer's IP as we see it (its NAT's public address), None when relayed."""
        ...

    @property
    def relayed(self) -> bool: ...

    async def receive_some(self, max_bytes: int = 1 << 20) -> bytes:
        """Up to ``max_bytes`` bytes; ``b""`` once the peer has closed its side;
        ``NetworkError`` when the stream broke."""
        ...

    async def send_all(self, data: bytes) -> None:
        """Send everything; ``NetworkError`` when the stream broke."""
        ...

    async def close(self) -> None:
        """Close our writing side (the peer sees EOF); never raises for a dead stream."""
        ...

    async def reset(self) -> None:
        """Abort the stream in both directions; never raises."""
        ...


StreamHandler = Callable[[Stream], Awaitable[None]]


@dataclass(frozen=True)
class PeerInfo:
    """A connected peer as the control API reports it."""

    peer_id: str
    addrs: list[str]


@dataclass(frozen=True)
class GossipMessage:
    """A pubsub message: the sender (already signature-checked by the host) and its data."""

    sender_id: str
    data: bytes


NextMessage = Callable[[], Awaitable[GossipMessage]]


class Host(Protocol):
    """A running host: identity, addresses, dialing, streams, peers, gossip, DHT, relays."""

    identity: Identity
    peer_id: str
    library_faults: int
    publish_failures: int

    # -- the trust boundary
    def reject(self, peer_id: str, offence: Offence, detail: str) -> None:
        """Count a rejected input; a peer the gate bans is disconnected at once."""
        ...

    def library_fault(self, peer_id: str | None, error: Exception) -> None:
        """The networking library failed on something a peer sent, or in its own task."""
        ...

    # -- peers and streams
    def addrs(self) -> list[str]:
        """Our dialable addresses, each ending in ``/p2p/<peer id>``."""
        ...

    def listen_ports(self) -> list[int]: ...

    async def connect(self, address: str) -> str:
        """Dial ``address`` and return the peer ID; ``NetworkError`` or ``ConfigError``."""
        ...

    async def disconnect(self, peer_id: str) -> None:
        """Close every connection to ``peer_id`` (never raises)."""
        ...

    def connected_peers(self) -> list[PeerInfo]: ...

    def protocols_of(self, peer_id: str) -> list[str] | None:
        """The protocols ``peer_id`` announced; None until it has."""
        ...

    async def open_stream(self, peer_id: str, protocol: str) -> Stream:
        """A new stream; ``ProtocolUnsupportedError`` or ``NetworkError``."""
        ...

    def set_handler(self, protocol: str, handler: StreamHandler) -> None:
        """Serve ``protocol``; every inbound stream goes through ``serve_stream``."""
        ...

    async def ping(self, peer_id: str) -> float:
        """Round-trip time in milliseconds."""
        ...

    def open_streams(self) -> int: ...

    def take_mdns_discoveries(self) -> list[tuple[str, list[str]]]:
        """Peers announced on the local network since the last call, as (peer id, addrs)."""
        ...

    # -- gossip and DHT (hosts opened with swarm services)
    async def publish(self, topic: str, data: bytes) -> bool:
        """Publish ``data``; False (counted) when no peer can receive it."""
        ...

    def subscribe(self, topic: str) -> AbstractAsyncContextManager[NextMessage]:
        """Yields ``next_message()``; our own messages are skipped."""
        ...

    async def provide(self, key: str) -> bool: ...

    async def find_providers(self, key: str) -> list[tuple[str, list[str]]]: ...

    async def put_value(self, key: str, value: bytes) -> None: ...

    async def get_value(self, key: str) -> bytes | None: ...

    @property
    def dht_records_rejected(self) -> int: ...

    def dht_size(self) -> int: ...

    # -- NAT traversal (hosts opened with relay support)
    @property
    def relaying(self) -> bool: ...

    async def reserve_relays(self) -> list[str]: ...

    def paths(self) -> dict[str, str]:
        """``{peer id: "direct" | "relayed"}`` for every connected peer."""
        ...

    async def hole_punch(self, peer_id: str) -> bool: ...


class PeerGate(Protocol):
    """The daemon's rules at the trust boundary, as the host applies them to every stream."""

    def banned(self, peer_id: str) -> bool:
        """Whether ``peer_id`` is banned: its streams of any protocol are reset unread."""
        ...

    async def admits(self, peer_id: str, protocol: str) -> bool:
        """Whether ``peer_id`` may use our ``protocol`` (members-only protocols need a
        member); asked before a byte of the stream is read. The gate counts refusals."""
        ...

    def rejected(self, peer_id: str, offence: Offence, detail: str) -> bool:
        """Count an input of ``peer_id``'s that we rejected; True if the peer is now banned
        (the host then disconnects it)."""
        ...


class OpenGate:
    """Admits everyone and only logs rejections (tests and tools without a daemon)."""

    def banned(self, peer_id: str) -> bool:
        return False

    async def admits(self, peer_id: str, protocol: str) -> bool:
        return True

    def rejected(self, peer_id: str, offence: Offence, detail: str) -> bool:
        logger.info("rejected input from %s (%s): %s", peer_id, offence, detail)
        return False


async def serve_stream(
    host: Host, gate: PeerGate, protocol: str, handler: StreamHandler, stream: Stream
) -> None:
    """Run ``handler`` on an inbound stream. The gate may refuse the peer before a byte is
    read. A handler raises ``RemoteProtocolError`` for input it rejects and
    ``TransferTooSlowError`` for a peer that does not keep pace: the peer is scored for it
    and the stream is reset (after a refusal, once the peer could read why). Other errors are
    logged; none reaches the host."""
    peer = stream.remote_peer_id
    if not await gate.admits(peer, protocol):
        await stream.reset()
        return
    refused = False
    try:
        await handler(stream)
    except RemoteProtocolError as exc:
        host.reject(peer, exc.offence, f"{protocol}: {exc}")
        refused = True  # ended below, once the error (and what its frames hold) is gone
    except TransferTooSlowError as exc:
        host.reject(peer, Offence.TOO_SLOW, f"{protocol}: {exc}")
        await stream.reset()
    except NetworkError as exc:
        logger.debug("%s stream from %s broke: %s", protocol, peer, exc)
        await stream.reset()
    except Exception:
        logger.exception("%s handler failed for %s", protocol, peer)
        await stream.reset()
    if refused:
        await _end_refused(stream)


async def _end_refused(stream: Stream) -> None:
    """End a stream whose input we refused. A reset at once would drop the reason a
    handler may have just sent (the peer's muxer discards what it has not read yet), so
    close our side first and reset once the peer closes its own, sends more than
    ``REFUSAL_DRAIN`` bytes, or ``REFUSAL_GRACE`` passes."""
    await stream.close()
    dropped = 0
    with trio.move_on_after(REFUSAL_GRACE):
        while dropped <= REFUSAL_DRAIN:
            try:
                chunk = await stream.receive_some(REFUSAL_DRAIN)
            except NetworkError:
                break
            if not chunk:
                break
            dropped += len(chunk)
    await stream.reset()
