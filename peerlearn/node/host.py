"""The one adapter around py-libp2p 0.8.1. Nothing else in peerlearn imports ``libp2p``.

It configures the library safely (see ``shared/research/py-libp2p-evaluation.md``):

* security is Noise only; plaintext and secio are never offered, so a plaintext
  dialer is refused during negotiation;
* yamux only, one connection per peer (which also skips the 250 ms happy-eyeballs wait),
  explicit connection limits and no background auto-dialling;
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

import logging
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
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
from libp2p.relay.circuit_v2.discovery import RelayDiscovery
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
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


StreamHandler = Callable[[Stream], Awaitable[None]]


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
        self._relay: _Relay | None = None

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
            await self._host.connect(info)
        except Exception as exc:
            raise NetworkError(f"cannot connect to {address}: {exc}") from exc
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
            raise NetworkError(f"cannot connect through the relay to {address}: {exc}") from exc
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


@asynccontextmanager
async def _relay_services(host: P2PHost, settings: RelaySettings | None) -> AsyncIterator[None]:
    if settings is None:
        yield
        return
    relay = _Relay(host._host, settings)
    async with AsyncExitStack() as services:
        for service in (relay.protocol, relay.discovery, relay.dcutr):
            if service is not None:
                await services.enter_async_context(background_trio_service(service))
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
    relay: RelaySettings | None = None,
    upnp: bool = False,
) -> AsyncIterator[P2PHost]:
    """Start a libp2p host listening on ``listen``; it is closed when the block exits.

    With ``swarm_services`` it also runs the Kademlia DHT and gossipsub; with ``mdns`` it
    announces itself and notes peers announced on the local network (never on loopback);
    with ``relay`` it runs circuit relay v2 (and DCUtR if asked).
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
    try:
        async with raw.run(addrs):
            host = P2PHost(raw, identity)
            if mdns:
                peerDiscovery.register_peer_discovered_handler(host._on_mdns_peer)
            try:
                async with _relay_services(host, relay):
                    if not swarm_services:
                        yield host
                        return
                    async with _swarm_services(host, all_loopback(addrs)):
                        yield host
            finally:
                peerDiscovery.unregister_peer_discovered_handler(host._on_mdns_peer)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {list(listen)}: {exc}") from exc
