"""The one adapter around py-libp2p 0.8.1. Nothing else in peerlearn imports ``libp2p``.

It configures the library safely (see ``shared/research/py-libp2p-evaluation.md``):

* security is Noise only; plaintext and secio are never offered, so a plaintext
  dialer is refused during negotiation;
* yamux only, one connection per peer (which also skips the 250 ms happy-eyeballs wait),
  explicit connection limits and no background auto-dialling;
* wildcard listen addresses are expanded to concrete interface addresses so that
  ``0.0.0.0`` is never advertised;
* libp2p's loggers are re-attached to ours (see ``peerlearn.node.logs``);
* stream reads translate ``StreamEOF`` into ``b""`` and resets into ``NetworkError``;
  stream-handler exceptions are logged instead of vanishing silently.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import multiaddr
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import Ed25519PrivateKey as Libp2pEd25519PrivateKey
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.discovery.events.peerDiscovery import peerDiscovery
from libp2p.host.ping import ID as PING_PROTOCOL_ID
from libp2p.host.ping import perform_ping_roundtrip
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.network.config import ConnectionConfig
from libp2p.network.stream.exceptions import StreamEOF, StreamError
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.pubsub.gossipsub import PROTOCOL_ID as GOSSIPSUB_V10
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11 as GOSSIPSUB_V11
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V12 as GOSSIPSUB_V12
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.records.validator import NamespacedValidator, Validator
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.exceptions import MuxedStreamError
from libp2p.tools.anyio_service import background_trio_service
from libp2p.utils.address_validation import get_available_interfaces

from peerlearn.errors import ConfigError, LocalProtocolError, NetworkError, RemoteProtocolError
from peerlearn.gossip import records
from peerlearn.identity import PUBLIC_KEY_SIZE, Identity
from peerlearn.node.logs import reattach_library_logging

MAX_PUBLISH_SIZE = 256 * 1024  # bytes; gossip carries small messages only (pubsub drops > 1 MiB)
GOSSIP_DEGREE = (4, 6, 12)  # mesh degree low, target, high
GOSSIP_HEARTBEAT = 1  # seconds (the library default is 120)
GOSSIP_RATE_LIMIT = 200.0  # messages per topic per second per peer, raised on purpose
SUBSCRIPTION_BUFFER = 256  # messages queued per subscription before we report drops

logger = logging.getLogger(__name__)

_IDENTITY_PEER_ID_PREFIX = b"\x00\x24\x08\x01\x12\x20"  # identity multihash of an Ed25519 key
_STREAM_ERRORS = (StreamError, MuxedStreamError, trio.BrokenResourceError, trio.ClosedResourceError)


def public_key_from_peer_id(peer_id: str) -> bytes:
    """The raw Ed25519 key inlined in an Ed25519 peer ID (raises ``ValueError`` otherwise)."""
    raw = ID.from_base58(peer_id).to_bytes()
    if not raw.startswith(_IDENTITY_PEER_ID_PREFIX) or len(raw) != 6 + PUBLIC_KEY_SIZE:
        raise ValueError(f"{peer_id} is not an Ed25519 peer ID")
    return bytes(raw[len(_IDENTITY_PEER_ID_PREFIX) :])


def parse_peer_multiaddr(address: str) -> tuple[str, Any]:
    """Validate a ``/ip4/.../tcp/.../p2p/<id>`` address; returns (peer id, libp2p PeerInfo)."""
    try:
        info = info_from_p2p_addr(multiaddr.Multiaddr(address))
    except Exception as exc:
        raise ConfigError(
            f"invalid peer address {address!r}: {exc} "
            "(expected e.g. /ip4/127.0.0.1/tcp/4001/p2p/12D3KooW...)"
        ) from exc
    return info.peer_id.to_base58(), info


class Stream:
    """A byte stream to one peer, with trio-like method names."""

    def __init__(self, raw: Any) -> None:
        self._raw = raw
        muxed = raw.muxed_conn
        self.remote_peer_id: str = muxed.peer_id.to_base58()
        self.remote_public_key: bytes = public_key_from_peer_id(self.remote_peer_id)

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


StreamHandler = Callable[[Stream], Awaitable[None]]


@dataclass(frozen=True)
class PeerInfo:
    """A connected peer as the control API reports it."""

    peer_id: str
    addrs: list[str]


def _expand_listen_addrs(listen: Sequence[str]) -> list[Any]:
    out: list[Any] = []
    for text in listen:
        try:
            addr = multiaddr.Multiaddr(text)
            host_ip = addr.value_for_protocol("ip4")
            port = int(addr.value_for_protocol("tcp"))
        except Exception as exc:
            raise ConfigError(
                f"invalid listen address {text!r}: {exc} (expected /ip4/<ip>/tcp/<port>)"
            ) from exc
        if host_ip == "0.0.0.0":
            out.extend(a for a in get_available_interfaces(port) if "/ip4/" in str(a))
        else:
            out.append(addr)
    return out


class _RecordValidator(Validator):  # type: ignore[misc]
    """libp2p's validator interface over ``peerlearn.gossip.records``."""

    def validate(self, key: str, value: bytes) -> None:
        try:
            records.validate_record(key, value)
        except RemoteProtocolError as exc:
            raise ValueError(str(exc)) from exc

    def select(self, key: str, values: list[bytes]) -> int:
        return records.select_record(key, values)


@dataclass(frozen=True)
class GossipMessage:
    """A pubsub message: the libp2p-level sender (already signature-checked) and its data."""

    sender_id: str
    data: bytes


class P2PHost:
    """A running libp2p host: identity, listen addresses, dialing, streams, peers,
    and (when a swarm is given) the Kademlia DHT and gossipsub."""

    def __init__(self, raw_host: Any, identity: Identity) -> None:
        self._host = raw_host
        self.identity = identity
        self.peer_id = identity.peer_id
        self._dht: Any = None
        self._pubsub: Any = None
        self.publish_failures = 0
        self._mdns_found: list[tuple[str, list[str]]] = []

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
    async def subscribe(self, topic: str) -> AsyncIterator[Callable[[], Awaitable[GossipMessage]]]:
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
        """Our dialable multiaddrs, each ending in ``/p2p/<peer id>``."""
        return [str(a) for a in self._host.get_addrs()]

    async def connect(self, address: str) -> str:
        """Dial ``address`` (with ``/p2p/<id>``) and return the peer ID; raises ``NetworkError``."""
        peer_id, info = parse_peer_multiaddr(address)
        if peer_id == self.peer_id:
            raise ConfigError(f"{address} is this node itself")
        self._host.get_network().unblock_peer(info.peer_id)
        try:
            await self._host.connect(info)
        except Exception as exc:
            raise NetworkError(f"cannot connect to {address}: {exc}") from exc
        return peer_id

    async def open_stream(self, peer_id: str, protocol: str) -> Stream:
        try:
            raw = await self._host.new_stream(ID.from_base58(peer_id), [TProtocol(protocol)])
        except Exception as exc:
            raise NetworkError(f"cannot open {protocol} stream to {peer_id}: {exc}") from exc
        return Stream(raw)

    def set_handler(self, protocol: str, handler: StreamHandler) -> None:
        """Serve ``protocol``; the handler's errors are logged and the stream is reset."""

        async def run(raw: Any) -> None:
            stream = Stream(raw)
            try:
                await handler(stream)
            except Exception:
                logger.exception("%s handler failed for %s", protocol, stream.remote_peer_id)
                await stream.reset()

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


def _all_loopback(addrs: Sequence[Any]) -> bool:
    return all(str(a).startswith("/ip4/127.") for a in addrs)


@asynccontextmanager
async def _swarm_services(host: P2PHost, loopback: bool) -> AsyncIterator[None]:
    """Kademlia (server mode, strict /peerlearn/ validation) and gossipsub on ``host``."""
    validator = NamespacedValidator({records.NAMESPACE: _RecordValidator()}, strict_validation=True)
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
        protocols=[GOSSIPSUB_V12, GOSSIPSUB_V11, GOSSIPSUB_V10],
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
        background_trio_service(dht),
        background_trio_service(pubsub),
        background_trio_service(router),
    ):
        await pubsub.wait_until_ready()
        host._dht, host._pubsub = dht, pubsub
        try:
            yield
        finally:
            host._dht = host._pubsub = None


@asynccontextmanager
async def open_host(
    identity: Identity,
    listen: Sequence[str],
    *,
    max_connections: int = 256,
    swarm_services: bool = False,
    mdns: bool = False,
) -> AsyncIterator[P2PHost]:
    """Start a libp2p host listening on ``listen``; it is closed when the block exits.

    With ``swarm_services`` it also runs the Kademlia DHT and gossipsub; with ``mdns`` it
    announces itself and notes peers announced on the local network (never on loopback).
    """
    reattach_library_logging()
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
        max_connections_per_peer=1,
    )
    addrs = _expand_listen_addrs(listen)
    mdns = mdns and not _all_loopback(addrs)
    raw = new_host(
        enable_mDNS=mdns,
        key_pair=key_pair,
        sec_opt=security,
        muxer_preference="YAMUX",
        listen_addrs=addrs,
        connection_config=connections,
    )
    try:
        async with raw.run(addrs):
            host = P2PHost(raw, identity)
            if mdns:
                peerDiscovery.register_peer_discovered_handler(host._on_mdns_peer)
            try:
                if not swarm_services:
                    yield host
                    return
                async with _swarm_services(host, _all_loopback(addrs)):
                    yield host
            finally:
                peerDiscovery.unregister_peer_discovered_handler(host._on_mdns_peer)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {list(listen)}: {exc}") from exc
