"""The one adapter around py-libp2p 0.8.1. Nothing else in peerlearn imports ``libp2p``.

It configures the library safely:

* security is Noise only; plaintext and secio are never offered, so a plaintext
  dialer is refused during negotiation;
* yamux only, one connection per peer (which also skips the 250 ms happy-eyeballs wait),
  explicit connection limits and no background auto-dialling; a yamux frame is written
  whole or the connection is closed, and window is granted by halves (``WholeFrameYamux``);
* wildcard listen addresses are expanded to concrete interface addresses so that
  ``0.0.0.0`` is never advertised;
* libp2p's loggers are re-attached to ours (see ``peerlearn.node.logs``);
* NAT traversal (``RelaySettings``): circuit relay v2 (a limited relay service on public
  nodes; reservations made explicitly, never left to the library's 300 s timer), dialing
  ``/p2p-circuit`` addresses, and DCUtR hole punching whose result is checked on the
  connections themselves (its return value is unreliable). With relaying on, two
  connections per peer are allowed: the relayed one and the direct one replacing it;
* stream reads translate ``StreamEOF`` into ``b""`` and resets into ``NetworkError``;
  stream-handler exceptions are logged instead of vanishing silently.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import multiaddr
import trio
from libp2p import new_host
from libp2p.connection_types import ConnectionType
from libp2p.crypto.ed25519 import Ed25519PrivateKey as Libp2pEd25519PrivateKey
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.discovery.events.peerDiscovery import peerDiscovery
from libp2p.host.ping import ID as PING_PROTOCOL_ID
from libp2p.host.ping import perform_ping_roundtrip
from libp2p.io.exceptions import IOException
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.network.config import ConnectionConfig
from libp2p.network.stream.exceptions import StreamEOF, StreamError
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.pubsub.gossipsub import PROTOCOL_ID as GOSSIPSUB_V10
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11 as GOSSIPSUB_V11
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.records.validator import NamespacedValidator, Validator
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
from libp2p.relay.circuit_v2.discovery import RelayDiscovery
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.exceptions import MuxedStreamError
from libp2p.stream_muxer.muxer_multistream import MuxerMultistream
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux, YamuxStream
from libp2p.tools.anyio_service.trio_manager import TrioManager
from libp2p.tools.anyio_service.utils import get_task_name
from libp2p.utils.address_validation import get_available_interfaces
from libp2p.utils.connection_shutdown import is_expected_connection_shutdown

from peerlearn.errors import (
    ConfigError,
    LocalProtocolError,
    NetworkError,
    Offence,
    ProtocolUnsupportedError,
    RemoteProtocolError,
)
from peerlearn.gossip import records
from peerlearn.identity import Identity, public_key_from_peer_id
from peerlearn.node.config import check_peer_address, parse_listen_address
from peerlearn.node.host_api import (
    MAX_PUBLISH_SIZE,
    GossipMessage,
    NextMessage,
    OpenGate,
    PeerGate,
    PeerInfo,
    StreamHandler,
    serve_stream,
)
from peerlearn.node.logs import reattach_library_logging

GOSSIP_DEGREE = (4, 6, 12)  # mesh degree low, target, high
GOSSIP_HEARTBEAT = 1  # seconds (the library default is 120)
GOSSIP_RATE_LIMIT = 200.0  # messages per topic per second per peer, raised on purpose
SHUTDOWN_SERVICES_TIMEOUT = 5.0  # seconds for connections, mDNS and UPnP to close
DIAL_TIMEOUT = 15.0  # seconds for TCP, Noise and yamux (the library has no handshake timeout)
FRAME_WRITE_TIMEOUT = 30.0  # seconds for one yamux frame to go out; then the connection closes
MAX_QUEUED_REPLIES = 1024  # yamux replies (12-byte ACK, RST, pong frames) waiting to go out
MAX_INBOUND_STREAMS_PER_PEER = 64  # streams a peer may hold open to us at once (all protocols)

logger = logging.getLogger(__name__)

_STREAM_ERRORS = (StreamError, MuxedStreamError, trio.BrokenResourceError, trio.ClosedResourceError)


def parse_peer_multiaddr(address: str) -> tuple[str, Any]:
    """Validate a ``/ip4/.../tcp/.../p2p/<id>`` address; returns (peer id, libp2p PeerInfo)."""
    check_peer_address(address)
    try:
        info = info_from_p2p_addr(multiaddr.Multiaddr(address))
    except Exception as exc:
        raise ConfigError(
            f"invalid peer address {address!r}: {exc} "
            "(expected e.g. /ip4/127.0.0.1/tcp/4001/p2p/12D3KooW...)"
        ) from exc
    return info.peer_id.to_base58(), info


def _causes(error: BaseException) -> list[BaseException]:
    """``error``, what caused it, and the members of exception groups and libp2p's
    ``MultiError`` along the way."""
    seen: list[BaseException] = []
    pending = [error]
    while pending and len(seen) < 64:
        current = pending.pop()
        if any(current is s for s in seen):
            continue
        seen.append(current)
        pending.extend(getattr(current, "exceptions", None) or [])
        pending.extend(getattr(current, "errors", None) or [])
        for nested in (current.__cause__, current.__context__):
            if nested is not None:
                pending.append(nested)
    return seen


def dial_failure(error: BaseException) -> str:
    """Why a dial failed, in plain words: refused, unreachable, timed out, or the peer at
    that address is another peer than the address says."""
    causes = _causes(error)
    for cause in causes:
        if type(cause).__name__ == "PeerIDMismatchesPubkey":
            actual = str(cause).rpartition("remote_peer_id_from_pubkey=")[2].strip()
            return f"peer ID mismatch: the node at that address is {actual or 'another peer'}"
    for cause in causes:
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused (nothing listens on that port)"
    for cause in causes:
        if isinstance(cause, OSError) and cause.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
            return "network unreachable from here"
    for cause in causes:
        if isinstance(cause, TimeoutError | trio.TooSlowError):
            return "timed out"
    for cause in causes:
        if type(cause).__name__ in ("SecurityUpgradeFailure", "HandshakeFailure"):
            return "the encrypted handshake failed (not a peerlearn/libp2p node, or it hung up)"
    deepest = causes[-1]
    return str(deepest) or type(deepest).__name__


def _peer_of(fn: Any, args: Sequence[Any]) -> str | None:
    """The remote peer a library task works for, when its target or arguments say."""
    for candidate in (getattr(fn, "__self__", None), *args):
        for holder in (candidate, getattr(candidate, "muxed_conn", None)):
            peer = getattr(holder, "peer_id", None)
            if isinstance(peer, ID):
                return str(peer.to_base58())
        if isinstance(candidate, ID):
            return str(candidate.to_base58())
    return None


class _ContainedManager(TrioManager):  # type: ignore[misc]
    """py-libp2p's service manager, except that a per-peer task that fails on what a peer
    sent (a gossipsub RPC protobuf cannot parse, say) is reported to ``on_fault`` instead
    of cancelling the whole service, and with it the daemon. The service's own main task
    and its long-running daemon tasks keep the library's behaviour."""

    def __init__(self, service: Any, on_fault: Callable[[str | None, Exception], None]) -> None:
        super().__init__(service)
        self._on_fault = on_fault

    def run_task(
        self,
        async_fn: Callable[..., Awaitable[Any]],
        *args: Any,
        daemon: bool = False,
        name: str | None = None,
        _internal: bool = False,
    ) -> None:
        if daemon or _internal:
            super().run_task(async_fn, *args, daemon=daemon, name=name, _internal=_internal)
            return
        on_fault = self._on_fault

        async def contained(*task_args: Any) -> None:
            try:
                await async_fn(*task_args)
            except Exception as exc:
                if is_expected_connection_shutdown(exc):
                    raise
                on_fault(_peer_of(async_fn, task_args), exc)

        super().run_task(contained, *args, name=get_task_name(async_fn, name))


@asynccontextmanager
async def _contained_service(
    service: Any, on_fault: Callable[[str | None, Exception], None]
) -> AsyncIterator[None]:
    """``background_trio_service`` with ``_ContainedManager``."""
    async with trio.open_nursery() as nursery:
        manager = _ContainedManager(service, on_fault)
        service._manager = manager
        nursery.start_soon(manager.run)
        await manager.wait_started()
        try:
            yield
        finally:
            await manager.stop()


class Libp2pStream:
    """A libp2p stream as a ``host_api.Stream``."""

    def __init__(self, raw: Any) -> None:
        self._raw = raw
        muxed = raw.muxed_conn
        self.remote_peer_id: str = muxed.peer_id.to_base58()
        self.remote_public_key: bytes = public_key_from_peer_id(self.remote_peer_id)

    @property
    def remote_ip(self) -> str | None:
        """The peer's IP as we see it (its NAT's public address), None when relayed."""
        if self.relayed:
            return None
        try:
            address = self._raw.get_remote_address()
        except Exception:
            return None
        return str(address[0]) if address else None

    @property
    def relayed(self) -> bool:
        return not _is_direct(self._raw.muxed_conn)

    async def receive_some(self, max_bytes: int = 1 << 20) -> bytes:
        """Up to ``max_bytes`` bytes; ``b""`` once the peer has closed its side."""
        try:
            data: bytes = await self._raw.read(max_bytes)
        except StreamEOF:
            return b""
        except _STREAM_ERRORS as exc:
            raise NetworkError(f"stream from {self.remote_peer_id} broke: {exc}") from exc
        return data

    async def send_all(self, data: bytes) -> None:
        try:
            await self._raw.write(data)
        except _STREAM_ERRORS as exc:
            raise NetworkError(f"stream to {self.remote_peer_id} broke: {exc}") from exc

    async def close(self) -> None:
        """Close our writing side (the peer sees EOF); never raises for a dead stream."""
        try:
            await self._raw.close()
        except (*_STREAM_ERRORS, OSError) as exc:
            logger.debug("closing stream to %s: %s", self.remote_peer_id, exc)

    async def reset(self) -> None:
        try:
            await self._raw.reset()
        except (*_STREAM_ERRORS, OSError) as exc:
            logger.debug("resetting stream to %s: %s", self.remote_peer_id, exc)


@dataclass(frozen=True)
class RelaySettings:
    """Circuit relay v2 and hole punching; see ``NodeConfig`` for each setting."""

    service: bool = False
    hole_punch: bool = True
    circuit_seconds: int = 600
    circuit_bytes: int = 16 * 2**20
    max_reservations: int = 128
    max_circuits: int = 64


def _is_direct(conn: Any) -> bool:
    try:
        return bool(conn.get_connection_type() == ConnectionType.DIRECT)
    except Exception:
        try:
            addrs = conn.get_transport_addresses()
        except Exception:
            return True
        return not any("/p2p-circuit" in str(a) for a in addrs)


class _BatchedWindowStream(YamuxStream):  # type: ignore[misc]
    """A yamux stream that gives its peer more window as go-yamux does: once half of the
    window has been read. The library sends a WINDOW_UPDATE frame after every read, and
    reads a gossip message's length one byte at a time: three or four frames to write, and
    for the peer to handle, per message received."""

    async def _auto_tune_and_send_window_update(self, *, bytes_read: int = 0) -> None:
        async with self.window_lock:
            buffered = len(self.conn.stream_buffers.get(self.stream_id, b""))
            read_since_update = self.target_recv_window - (self.recv_window + buffered)
            if read_since_update < self._grow_threshold():
                return
        await super()._auto_tune_and_send_window_update()


class _StreamTable(dict[int, YamuxStream]):
    """The connection's streams; every stream the library creates joins as a
    ``_BatchedWindowStream`` (the library builds its streams in place)."""

    def __setitem__(self, stream_id: int, stream: YamuxStream) -> None:
        if type(stream) is YamuxStream:
            stream.__class__ = _BatchedWindowStream
        super().__setitem__(stream_id, stream)


class WholeFrameYamux(Yamux):  # type: ignore[misc]
    """py-libp2p's yamux, except that frames are written whole, that the reader never waits
    to write, and that window updates are batched (``_BatchedWindowStream``).

    * In the library a cancelled stream write (any timeout around a push) can stop Noise
      between encrypting a frame and sending it. The peer's decryption nonce is then behind
      for good: every later frame fails authentication, and streams on that connection, old
      or new, stall until it is torn down. Here a frame's write is shielded from
      cancellation, so it goes out whole (the caller is cancelled right after); a frame that
      cannot go out within ``FRAME_WRITE_TIMEOUT`` means the peer reads nothing, and the
      connection is closed.
    * In the library the task that reads the connection also writes its replies (the ACK of
      a stream the peer opened, RST, pong) and waits for the connection's write lock to do
      so. When both peers send a model at once, each side's writer holds that lock while its
      socket is full, and each side's reader waits for it: neither reads again, and both
      connections freeze. Here the reader queues its replies (at most
      ``MAX_QUEUED_REPLIES``); the next frame written, or a task of their own, sends them
      first, so a stream's ACK still goes out before its data.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.streams = _StreamTable()
        self._reader: trio.lowlevel.Task | None = None
        self._replies: list[bytes] = []
        self._replies_queued = trio.Event()

    async def _handle_incoming_with_ready_signal(
        self, task_status: Any = trio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        self._reader = trio.lowlevel.current_task()
        try:
            async with trio.open_nursery() as replies:
                replies.start_soon(self._send_replies)
                await self.handle_incoming()
                replies.cancel_scope.cancel()
        finally:
            if self._nursery is not None:  # as the library does when its reader ends
                self._nursery.cancel_scope.cancel()

    async def _write_frame(self, data: bytes) -> None:
        if trio.lowlevel.current_task() is self._reader:
            if len(self._replies) >= MAX_QUEUED_REPLIES:
                raise MuxedStreamError(f"the peer read none of {MAX_QUEUED_REPLIES} replies")
            self._replies.append(data)
            self._replies_queued.set()
        else:
            await self._write_whole(data)
        await trio.lowlevel.checkpoint()

    async def _send_replies(self) -> None:
        while True:
            await self._replies_queued.wait()
            self._replies_queued = trio.Event()
            try:
                await self._write_whole(b"")
            except (MuxedStreamError, IOException, trio.BrokenResourceError,
                    trio.ClosedResourceError):  # fmt: skip
                return  # the connection is closing; its reader sees why

    async def _write_whole(self, data: bytes) -> None:
        """Queued replies, then ``data``, written whole under the connection's write lock."""
        async with self._write_lock:
            if self._replies:
                data = b"".join(self._replies) + data
                self._replies = []
            if not data:
                return
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + FRAME_WRITE_TIMEOUT
                await self.secured_conn.write(data)
            if scope.cancelled_caught:
                self.event_shutting_down.set()
                await self.secured_conn.close()
                raise MuxedStreamError(f"the peer read nothing for {FRAME_WRITE_TIMEOUT:.0f} s")


class _WholeFrameMuxers(MuxerMultistream):  # type: ignore[misc]
    """Muxer negotiation that builds ``WholeFrameYamux`` connections (the library builds its
    own ``Yamux`` whatever class is registered for yamux's protocol)."""

    async def new_conn(self, conn: Any, peer_id: ID) -> Any:
        protocol, _ = await self._selector.select(conn, conn.is_initiator, self.negotiate_timeout)
        if protocol != YAMUX_PROTOCOL_ID:
            raise MuxedStreamError(f"muxer {protocol} negotiated, only yamux is offered")
        muxed = WholeFrameYamux(conn, peer_id, is_initiator=conn.is_initiator)
        return self._annotate_connection(muxed, conn, protocol)


class _LedDCUtR(DCUtRProtocol):  # type: ignore[misc]
    """DCUtR that only punches when asked. The library's own loop starts a session to every
    relayed peer from both sides at once, and two crossing sessions defeat each other;
    ``NatTraversal`` decides which side of a pair leads (``peerlearn.nat.policy``)."""

    async def _auto_drive_loop(self) -> None:
        await trio.sleep_forever()


class _Relay:
    """The relay v2 protocol, its transport and discovery, and DCUtR, of one host."""

    def __init__(self, raw_host: Any, settings: RelaySettings) -> None:
        limits = RelayLimits(
            duration=settings.circuit_seconds,
            data=settings.circuit_bytes,
            max_circuit_conns=settings.max_circuits,
            max_reservations=settings.max_reservations,
        )
        self.protocol = CircuitV2Protocol(raw_host, limits=limits, allow_hop=settings.service)
        roles = RelayRole.STOP | RelayRole.CLIENT
        if settings.service:
            roles |= RelayRole.HOP
        # auto_reserve off: reservations are made by reserve_relays(), on our schedule.
        self.transport = CircuitV2Transport(
            raw_host, self.protocol, RelayConfig(roles=roles, limits=limits)
        )
        self.discovery = RelayDiscovery(raw_host, auto_reserve=False, max_relays=4)
        self.transport.discovery = self.discovery
        # The unilateral direct dial DCUtR tries first waits dial_timeout on a dropping NAT
        # (library default 10 s); 2 s keeps a whole punch well inside 30 s.
        self.dcutr = _LedDCUtR(raw_host, dial_timeout=2) if settings.hole_punch else None
        self.circuit_addrs: list[str] = []


def _expand_listen_addrs(listen: Sequence[str]) -> list[Any]:
    out: list[Any] = []
    for text in listen:
        host_ip, port = parse_listen_address(text)
        addr = multiaddr.Multiaddr(text)
        if host_ip == "0.0.0.0":
            out.extend(a for a in get_available_interfaces(port) if "/ip4/" in str(a))
        else:
            out.append(addr)
    return out


class _RecordValidator(Validator):  # type: ignore[misc]
    """libp2p's validator interface over ``peerlearn.gossip.records``. The library does not
    say which peer sent a record, so refusals are counted, not scored."""

    def __init__(self) -> None:
        self.rejected = 0

    def validate(self, key: str, value: bytes) -> None:
        try:
            records.validate_record(key, value)
        except RemoteProtocolError as exc:
            self.rejected += 1
            raise ValueError(str(exc)) from exc

    def select(self, key: str, values: list[bytes]) -> int:
        return records.select_record(key, values)


class P2PHost:
    """A running libp2p host: identity, listen addresses, dialing, streams, peers,
    and (when a swarm is given) the Kademlia DHT and gossipsub."""

    def __init__(
        self, raw_host: Any, identity: Identity, gate: PeerGate, nursery: trio.Nursery
    ) -> None:
        self._host = raw_host
        self.identity = identity
        self.peer_id = identity.peer_id
        self.gate = gate
        self._nursery = nursery  # for disconnecting peers the gate banned
        self._dht: Any = None
        self._pubsub: Any = None
        self.publish_failures = 0
        self.library_faults = 0
        self._records_validator: _RecordValidator | None = None
        self._mdns_found: list[tuple[str, list[str]]] = []
        self._relay: _Relay | None = None
        self._inbound_streams: Counter[str] = Counter()
        network = raw_host.get_network()
        network.set_stream_handler(self._guard_dispatch(network.common_stream_handler))

    # -- the trust boundary -------------------------------------------------------------------

    def reject(self, peer_id: str, offence: Offence, detail: str) -> None:
        """Count a rejected input; a peer the gate bans is disconnected at once."""
        if self.gate.rejected(peer_id, offence, detail):
            self._nursery.start_soon(self.disconnect, peer_id)

    def library_fault(self, peer_id: str | None, error: Exception) -> None:
        """py-libp2p failed on something (in a task or a stream handler of its own)."""
        self.library_faults += 1
        detail = f"{type(error).__name__}: {error}"
        if peer_id is None:
            logger.warning("networking library task failed: %s", detail)
        else:
            self.reject(peer_id, Offence.LIBRARY_ERROR, detail)

    def _guard_dispatch(
        self, dispatch: Callable[[Any], Awaitable[None]]
    ) -> Callable[[Any], Awaitable[None]]:
        """Wraps every inbound stream, of any protocol (the library's included): banned
        peers and peers over their stream budget are reset before negotiation, and an
        exception from a handler ends that stream only, never the connection or the host."""

        async def guarded(net_stream: Any) -> None:
            peer = net_stream.muxed_conn.peer_id.to_base58()
            if self.gate.banned(peer):
                await _reset_quietly(net_stream)
                self._nursery.start_soon(self.disconnect, peer)
                return
            if self._inbound_streams[peer] >= MAX_INBOUND_STREAMS_PER_PEER:
                await _reset_quietly(net_stream)
                self.reject(peer, Offence.OVERSIZED, "too many streams open at once")
                return
            self._inbound_streams[peer] += 1
            try:
                await dispatch(net_stream)
            except Exception as exc:
                if not is_expected_connection_shutdown(exc):
                    self.library_fault(peer, exc)
                await _reset_quietly(net_stream)
            finally:
                self._inbound_streams[peer] -= 1
                if self._inbound_streams[peer] <= 0:
                    del self._inbound_streams[peer]

        return guarded

    async def disconnect(self, peer_id: str) -> None:
        """Close every connection to ``peer_id`` (never raises)."""
        try:
            await self._host.get_network().close_peer(ID.from_base58(peer_id))
        except Exception as exc:
            logger.debug("disconnecting %s: %s", peer_id, exc)

    def protocols_of(self, peer_id: str) -> list[str] | None:
        """The protocols ``peer_id`` announced with identify; None until it has."""
        try:
            protocols = self._host.get_peerstore().get_protocols(ID.from_base58(peer_id))
        except Exception:
            return None
        return [str(p) for p in protocols] or None

    def take_mdns_discoveries(self) -> list[tuple[str, list[str]]]:
        """Peers announced over mDNS since the last call, as (peer id, addrs)."""
        found, self._mdns_found = self._mdns_found, []
        return found

    def _on_mdns_peer(self, info: Any) -> None:  # runs on zeroconf's thread
        self._mdns_found.append((info.peer_id.to_base58(), [str(a) for a in info.addrs]))

    # -- DHT ----------------------------------------------------------------------------

    def _require_dht(self) -> Any:
        if self._dht is None:
            raise LocalProtocolError("this host was opened without a swarm (no DHT/gossip)")
        return self._dht

    async def provide(self, key: str) -> bool:
        try:
            return bool(await self._require_dht().provide(key))
        except LocalProtocolError:
            raise
        except Exception as exc:
            raise NetworkError(f"DHT provide failed: {exc}") from exc

    async def find_providers(self, key: str) -> list[tuple[str, list[str]]]:
        """Unique providers of ``key`` (py-libp2p returns duplicates) as (peer id, addrs)."""
        try:
            found = await self._require_dht().find_providers(key)
        except LocalProtocolError:
            raise
        except Exception as exc:
            raise NetworkError(f"DHT find_providers failed: {exc}") from exc
        unique: dict[str, list[str]] = {}
        for info in found:
            unique.setdefault(info.peer_id.to_base58(), [str(a) for a in info.addrs])
        return sorted(unique.items())

    async def put_value(self, key: str, value: bytes) -> None:
        try:
            await self._require_dht().put_value(key, value)
        except LocalProtocolError:
            raise
        except Exception as exc:
            raise NetworkError(f"DHT put of {key} failed: {exc}") from exc

    async def get_value(self, key: str) -> bytes | None:
        try:
            value: bytes | None = await self._require_dht().get_value(key)
        except LocalProtocolError:
            raise
        except Exception as exc:
            raise NetworkError(f"DHT get of {key} failed: {exc}") from exc
        return value

    @property
    def dht_records_rejected(self) -> int:
        validator = self._records_validator
        return validator.rejected if validator is not None else 0

    def dht_size(self) -> int:
        return int(self._dht.get_routing_table_size()) if self._dht is not None else 0

    # -- gossipsub ----------------------------------------------------------------------

    async def publish(self, topic: str, data: bytes) -> bool:
        """Publish ``data``; False (logged and counted) when no peer can receive it."""
        if len(data) > MAX_PUBLISH_SIZE:
            raise LocalProtocolError(
                f"gossip message of {len(data)} bytes exceeds {MAX_PUBLISH_SIZE}"
            )
        pubsub = self._pubsub
        if pubsub is None:
            raise LocalProtocolError("this host was opened without a swarm (no DHT/gossip)")
        if not pubsub.peer_topics.get(topic):
            self.publish_failures += 1  # reported in `status`; anti-entropy repairs it
            logger.debug("gossip on %s not delivered: no subscribed peer yet", topic)
            return False
        try:
            await pubsub.publish(topic, data)
        except Exception as exc:
            self.publish_failures += 1
            logger.warning("gossip publish on %s failed: %s", topic, exc)
            return False
        return True

    @asynccontextmanager
    async def subscribe(self, topic: str) -> AsyncIterator[NextMessage]:
        """Yields ``next_message()``; messages from ourselves are skipped."""
        pubsub = self._pubsub
        if pubsub is None:
            raise LocalProtocolError("this host was opened without a swarm (no DHT/gossip)")
        subscription = await pubsub.subscribe(topic)
        me = ID.from_base58(self.peer_id).to_bytes()

        async def next_message() -> GossipMessage:
            while True:
                message = await subscription.get()
                if message.from_id != me:
                    return GossipMessage(ID(message.from_id).to_base58(), bytes(message.data))

        try:
            yield next_message
        finally:
            with trio.CancelScope(shield=True):
                try:
                    await pubsub.unsubscribe(topic)
                except Exception as exc:
                    logger.debug("unsubscribe %s: %s", topic, exc)

    def addrs(self) -> list[str]:
        """Our dialable multiaddrs, each ending in ``/p2p/<peer id>``: the direct ones,
        then the ``/p2p-circuit`` ones through relays we hold a reservation on."""
        direct = [str(a) for a in self._host.get_addrs() if "/p2p-circuit" not in str(a)]
        return direct + (self._relay.circuit_addrs if self._relay is not None else [])

    def listen_ports(self) -> list[int]:
        ports = []
        for addr in self._host.get_addrs():
            try:
                ports.append(int(addr.value_for_protocol("tcp")))
            except Exception:
                continue
        return sorted(set(ports))

    async def connect(self, address: str) -> str:
        """Dial ``address`` (with ``/p2p/<id>``, or a ``/p2p-circuit`` address through a
        relay) and return the peer ID; raises ``NetworkError``."""
        if "/p2p-circuit" in address:
            return await self._connect_via_relay(address)
        peer_id, info = parse_peer_multiaddr(address)
        if peer_id == self.peer_id:
            raise ConfigError(f"{address} is this node itself")
        self._host.get_network().unblock_peer(info.peer_id)
        try:
            with trio.fail_after(DIAL_TIMEOUT):
                await self._host.connect(info)
        except trio.TooSlowError:
            raise NetworkError(
                f"cannot connect to {address}: timed out after {DIAL_TIMEOUT:.0f} s "
                "(something accepted the connection but never completed the handshake)"
            ) from None
        except Exception as exc:
            raise NetworkError(f"cannot connect to {address}: {dial_failure(exc)}") from exc
        return peer_id

    # -- NAT traversal ----------------------------------------------------------------------

    @property
    def relaying(self) -> bool:
        """Whether circuit relay v2 (and hole punching) runs on this host."""
        return self._relay is not None

    def _require_relay(self) -> _Relay:
        if self._relay is None:
            raise LocalProtocolError("this host was opened without relay support")
        return self._relay

    async def _connect_via_relay(self, address: str) -> str:
        relay = self._require_relay()
        try:
            maddr = multiaddr.Multiaddr(address)
            peer_id = address.rsplit("/p2p/", 1)[1]
            ID.from_base58(peer_id)
        except Exception as exc:
            raise ConfigError(f"invalid relay address {address!r}: {exc}") from exc
        if peer_id == self.peer_id:
            raise ConfigError(f"{address} is this node itself")
        try:
            await relay.transport.dial(maddr)
        except Exception as exc:
            raise NetworkError(
                f"cannot connect through the relay to {address}: {dial_failure(exc)}"
            ) from exc
        return peer_id

    async def reserve_relays(self) -> list[str]:
        """Find relays among connected peers and (re)reserve a slot on each; returns our
        ``/p2p-circuit`` addresses (also included in ``addrs()`` from now on)."""
        relay = self._require_relay()
        try:
            await relay.discovery.discover_relays()
        except Exception as exc:
            raise NetworkError(f"relay discovery failed: {exc}") from exc
        peerstore = self._host.get_peerstore()
        circuit = []
        for relay_id in relay.discovery.get_relays():
            if not await relay.discovery.make_reservation(relay_id):
                logger.warning("relay %s refused our reservation", relay_id)
                continue
            try:
                relay_addrs = [a for a in peerstore.addrs(relay_id) if "/p2p-circuit" not in str(a)]
            except Exception:
                relay_addrs = []
            for addr in relay_addrs[:1]:
                base = str(addr).split("/p2p/")[0]
                circuit.append(f"{base}/p2p/{relay_id}/p2p-circuit/p2p/{self.peer_id}")
        relay.circuit_addrs = circuit
        return list(circuit)

    def _connections(self) -> list[tuple[Any, list[Any]]]:
        """(peer ID, its connections); the swarm keeps one or a list per peer."""
        return [
            (peer, conns if isinstance(conns, list) else [conns])
            for peer, conns in self._host.get_network().connections.items()
        ]

    def open_streams(self) -> int:
        """Streams open on all our connections (to spot leaks)."""
        total = 0
        for _, conns in self._connections():
            for conn in conns:
                try:
                    total += len(conn.get_streams())
                except Exception:
                    continue
        return total

    def paths(self) -> dict[str, str]:
        """``{peer id: "direct" | "relayed"}`` for every connected peer."""
        return {
            peer.to_base58(): "direct" if any(_is_direct(c) for c in conns) else "relayed"
            for peer, conns in self._connections()
            if conns
        }

    async def hole_punch(self, peer_id: str) -> bool:
        """One DCUtR attempt to replace our relayed connection to ``peer_id`` by a direct
        one; True if a direct connection exists afterwards."""
        relay = self._require_relay()
        if relay.dcutr is None:
            return False
        try:
            await relay.dcutr.initiate_hole_punch(ID.from_base58(peer_id))
        except Exception as exc:
            logger.debug("hole punch to %s: %s", peer_id, exc)
        return self.paths().get(peer_id) == "direct"

    async def open_stream(self, peer_id: str, protocol: str) -> Libp2pStream:
        """A new stream of ``protocol``; ``ProtocolUnsupportedError`` if the peer does not
        serve it, ``NetworkError`` for anything else that goes wrong."""
        try:
            raw = await self._host.new_stream(ID.from_base58(peer_id), [TProtocol(protocol)])
        except Exception as exc:
            why = str(exc.__cause__ or exc)  # the library's own message names only the peer
            if "not supported" in why:
                raise ProtocolUnsupportedError(f"{peer_id} does not serve {protocol}") from exc
            raise NetworkError(f"cannot open {protocol} stream to {peer_id}: {why}") from exc
        return Libp2pStream(raw)

    def set_handler(self, protocol: str, handler: StreamHandler) -> None:
        """Serve ``protocol``; inbound streams go through ``host_api.serve_stream``."""

        async def run(raw: Any) -> None:
            await serve_stream(self, self.gate, protocol, handler, Libp2pStream(raw))

        self._host.set_stream_handler(TProtocol(protocol), run)

    def connected_peers(self) -> list[PeerInfo]:
        peerstore = self._host.get_peerstore()
        peers = []
        for peer in self._host.get_connected_peers():
            try:
                addrs = [str(a) for a in peerstore.addrs(peer)]
            except Exception:
                addrs = []
            peers.append(PeerInfo(peer.to_base58(), addrs))
        return sorted(peers, key=lambda p: p.peer_id)

    async def ping(self, peer_id: str) -> float:
        """Round-trip time in milliseconds over ``/ipfs/ping/1.0.0``."""
        stream = await self.open_stream(peer_id, str(PING_PROTOCOL_ID))
        try:
            rtt: int = await perform_ping_roundtrip(stream._raw)
        except Exception as exc:
            raise NetworkError(f"ping to {peer_id} failed: {exc}") from exc
        finally:
            await stream.close()
        return float(rtt)


@asynccontextmanager
async def _relay_services(host: P2PHost, settings: RelaySettings | None) -> AsyncIterator[None]:
    if settings is None:
        yield
        return
    relay = _Relay(host._host, settings)
    async with AsyncExitStack() as services:
        for service in (relay.protocol, relay.discovery, relay.dcutr):
            if service is not None:
                await services.enter_async_context(_contained_service(service, host.library_fault))
        host._relay = relay
        try:
            yield
        finally:
            host._relay = None


def all_loopback(addrs: Sequence[Any]) -> bool:
    """Whether every address (multiaddr or its text) is an IPv4 loopback one."""
    return all(str(a).startswith("/ip4/127.") for a in addrs)


@asynccontextmanager
async def _swarm_services(host: P2PHost, loopback: bool) -> AsyncIterator[None]:
    """Kademlia (server mode, strict /peerlearn/ validation) and gossipsub on ``host``."""
    records_validator = _RecordValidator()
    validator = NamespacedValidator({records.NAMESPACE: records_validator}, strict_validation=True)
    dht = KadDHT(
        host._host,
        DHTMode.SERVER,
        validator=validator,
        validator_changed=True,
        strict_validation=True,
        # Subnet diversity guards against eclipse attacks on the Internet; on loopback every
        # peer shares 127.0.0.1 and the guard would keep the routing table empty.
        max_peers_per_subnet=0 if loopback else None,
    )
    low, degree, high = GOSSIP_DEGREE
    router = GossipSub(
        # Not v1.2: the library sends an IDONTWANT to every mesh peer for every message,
        # however small (go-libp2p only above 1 KiB), and our records are small. With it,
        # the MoDeST rounds of 16 daemons on 2 cores took 8.5 s; without it 3.9-4.7 s
        # (testnet/baseline.toml).
        protocols=[GOSSIPSUB_V11, GOSSIPSUB_V10],
        degree=degree,
        degree_low=low,
        degree_high=high,
        heartbeat_interval=GOSSIP_HEARTBEAT,
        spam_protection_enabled=True,
        max_messages_per_topic_per_second=GOSSIP_RATE_LIMIT,
        eclipse_protection_enabled=not loopback,
    )
    pubsub = Pubsub(host._host, router)
    async with (
        _contained_service(dht, host.library_fault),
        _contained_service(pubsub, host.library_fault),
        _contained_service(router, host.library_fault),
    ):
        await pubsub.wait_until_ready()
        host._dht, host._pubsub = dht, pubsub
        host._records_validator = records_validator
        try:
            yield
        finally:
            host._dht = host._pubsub = None


def refuse_ports_in_use(listen: Sequence[str]) -> None:
    """``ConfigError`` if another process listens on one of our fixed TCP ports.

    py-libp2p binds with SO_REUSEPORT, so a second daemon on a taken port would start and
    silently share the incoming connections with the first one; a plain bind tells.
    """
    for text in listen:
        ip, port = parse_listen_address(text)
        if port == 0:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((ip, port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise ConfigError(
                        f"TCP port {port} on {ip} is already in use by another process; "
                        "stop it or choose another --listen port"
                    ) from None
                raise ConfigError(f"cannot listen on {text}: {exc.strerror}") from None


@asynccontextmanager
async def _run_network(raw: Any, addrs: list[Any], host: P2PHost) -> AsyncIterator[None]:
    """py-libp2p's ``BasicHost.run``, with the network service under ``_ContainedManager``."""
    network = raw.get_network()
    async with _contained_service(network, host.library_fault):
        try:
            await network.listen(*addrs)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {[str(a) for a in addrs]}: {exc}") from exc
        if raw.mDNS is not None:
            raw.mDNS.start()
        if raw.upnp is not None and await raw.upnp.discover():
            for addr in raw.get_transport_addrs():
                if port := addr.value_for_protocol("tcp"):
                    await raw.upnp.add_port_mapping(int(port), "TCP")
        try:
            yield
        finally:
            # Close connections (and mDNS, UPnP) before the network service is stopped: the
            # service's own shutdown closes them in an already cancelled scope, so their
            # sockets would leak.
            with trio.CancelScope(shield=True), trio.move_on_after(SHUTDOWN_SERVICES_TIMEOUT):
                await raw.close()


async def _reset_quietly(net_stream: Any) -> None:
    try:
        await net_stream.reset()
    except Exception as exc:
        logger.debug("resetting a stream: %s", exc)


@asynccontextmanager
async def open_host(
    identity: Identity,
    listen: Sequence[str],
    *,
    max_connections: int = 256,
    swarm_services: bool = False,
    mdns: bool = False,
    relay: RelaySettings | None = None,
    upnp: bool = False,
    gate: PeerGate | None = None,
) -> AsyncIterator[P2PHost]:
    """Start a libp2p host listening on ``listen``; it is closed when the block exits.

    With ``swarm_services`` it also runs the Kademlia DHT and gossipsub; with ``mdns`` it
    announces itself and notes peers announced on the local network (never on loopback);
    with ``relay`` it runs circuit relay v2 (and DCUtR if asked). ``gate`` decides who may
    open streams and counts what is rejected (default: everyone; rejections logged).
    """
    reattach_library_logging()
    refuse_ports_in_use(listen)
    key = Libp2pEd25519PrivateKey.from_bytes(identity.private_bytes)
    key_pair = KeyPair(key, key.get_public_key())
    security = {
        NOISE_PROTOCOL_ID: NoiseTransport(
            key_pair, noise_privkey=create_x25519_key_pair().private_key
        )
    }
    connections = ConnectionConfig(
        max_connections=max_connections,
        min_connections=0,
        low_watermark=0,
        high_watermark=max_connections,
        max_connections_per_peer=2 if relay is not None else 1,
    )
    addrs = _expand_listen_addrs(listen)
    mdns = mdns and not all_loopback(addrs)
    raw = new_host(
        enable_mDNS=mdns,
        enable_upnp=upnp,
        key_pair=key_pair,
        sec_opt=security,
        muxer_preference="YAMUX",
        listen_addrs=addrs,
        connection_config=connections,
    )
    upgrader = raw.get_network().upgrader
    upgrader.muxer_multistream = _WholeFrameMuxers(
        {TProtocol(YAMUX_PROTOCOL_ID): WholeFrameYamux},
        upgrader.muxer_multistream.negotiate_timeout,
    )
    async with trio.open_nursery() as nursery:
        host = P2PHost(raw, identity, gate or OpenGate(), nursery)
        async with _run_network(raw, addrs, host):
            if mdns:
                peerDiscovery.register_peer_discovered_handler(host._on_mdns_peer)
            try:
                async with _relay_services(host, relay):
                    if not swarm_services:
                        yield host
                    else:
                        async with _swarm_services(host, all_loopback(addrs)):
                            yield host
            finally:
                peerDiscovery.unregister_peer_discovered_handler(host._on_mdns_peer)
        nursery.cancel_scope.cancel()
