"""An in-process host, so that whole swarms of real daemons run in one trio run, in virtual
time (trio's ``MockClock``), in seconds.

``MemoryHost`` implements ``peerlearn.node.host_api.Host`` over memory: connections are links
in a shared ``MemoryNetwork``, streams are pairs of byte pipes, gossip floods the connected
peers that subscribe to the topic, and the DHT is one shared table that applies the same
record rules as the real one. Dialing and opening a stream cost ``latency`` seconds of
trio's clock. Inbound streams go through ``host_api.serve_stream``, like the libp2p host's,
so the daemon's trust boundary is the real one. Everything else the daemon runs is real:
its services, its protocol cores, its tasks, its checkpoints on disk.

``RecordingGate`` admits everyone and keeps every rejection a host reports (for any host).
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import trio

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
from peerlearn.node.config import NodeConfig
from peerlearn.node.host_api import (
    MAX_PUBLISH_SIZE,
    GossipMessage,
    Host,
    NextMessage,
    OpenGate,
    PeerGate,
    PeerInfo,
    StreamHandler,
    serve_stream,
)
from peerlearn.node.offload import inline
from peerlearn.node.runtime import Runtime

WALL_CLOCK_EPOCH = 1_800_000_000.0  # the wall clock's reading at virtual time 0


class RecordingGate(OpenGate):
    """A gate that admits everyone and keeps every rejection it hears of."""

    def __init__(self) -> None:
        self.rejections: list[tuple[str, Offence, str]] = []

    def rejected(self, peer_id: str, offence: Offence, detail: str) -> bool:
        self.rejections.append((peer_id, offence, detail))
        return False

    async def got(self, peer_id: str, offence: Offence, detail: str) -> None:
        """Wait (10 s at most) for a rejection of ``peer_id`` for ``offence`` whose detail
        contains ``detail``."""
        with trio.fail_after(10):
            while not any(  # noqa: ASYNC110 (a list, not an event)
                (p, o) == (peer_id, offence) and detail in d for p, o, d in self.rejections
            ):
                await trio.sleep(0.01)


class _Pipe:
    """One direction of a stream: bytes in order, then end of stream (close) or an error
    (reset)."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.eof = False
        self.broken = False
        self._waiting = trio.lowlevel.ParkingLot()

    def write(self, data: bytes) -> None:
        if self.broken or self.eof:
            raise NetworkError("stream closed" if self.eof else "stream reset")
        self.data += data
        self._waiting.unpark_all()

    async def read(self, max_bytes: int) -> bytes:
        while not (self.data or self.eof or self.broken):
            await self._waiting.park()
        if self.broken:
            raise NetworkError("stream reset")
        out = bytes(self.data[:max_bytes])
        del self.data[:max_bytes]
        return out

    def end(self, *, broken: bool) -> None:
        self.eof = True
        self.broken = self.broken or broken
        self._waiting.unpark_all()


class MemoryStream:
    """One end of an in-memory stream (a ``host_api.Stream``)."""

    def __init__(self, incoming: _Pipe, outgoing: _Pipe, remote: Identity) -> None:
        self._in, self._out = incoming, outgoing
        self.remote_peer_id = remote.peer_id
        self.remote_public_key = public_key_from_peer_id(remote.peer_id)

    @property
    def remote_ip(self) -> str | None:
        return "198.18.0.1"

    @property
    def relayed(self) -> bool:
        return False

    @property
    def done(self) -> bool:
        return self._in.eof and self._out.eof

    async def receive_some(self, max_bytes: int = 1 << 20) -> bytes:
        await trio.lowlevel.checkpoint()
        return await self._in.read(max_bytes)

    async def send_all(self, data: bytes) -> None:
        await trio.lowlevel.checkpoint()
        self._out.write(data)

    async def close(self) -> None:
        self._out.end(broken=False)

    async def reset(self) -> None:
        self._in.end(broken=True)
        self._out.end(broken=True)


class MemoryNetwork:
    """The hosts of one in-process swarm, their links, and the shared DHT table."""

    def __init__(self, latency: float = 0.005) -> None:
        self.latency = latency
        self.hosts: dict[str, MemoryHost] = {}
        self.providers: dict[str, dict[str, list[str]]] = defaultdict(dict)
        self.values: dict[str, bytes] = {}
        self._numbers = itertools.count(1)

    def runtime(self) -> Runtime:
        """A daemon's surroundings on this network, in virtual time: work runs inline and
        the wall clock follows trio's clock."""
        return Runtime(
            open_host=self.open_host,
            wall_clock=lambda: WALL_CLOCK_EPOCH + trio.current_time(),
            offload=inline,
            bulk_path=lambda config: None,
        )

    def open_host(
        self, identity: Identity, config: NodeConfig, gate: PeerGate
    ) -> AbstractAsyncContextManager[Host]:
        return self._open(identity, gate, swarm_services=bool(config.swarm))

    @asynccontextmanager
    async def _open(
        self, identity: Identity, gate: PeerGate, *, swarm_services: bool
    ) -> AsyncIterator[Host]:
        if identity.peer_id in self.hosts:
            raise ConfigError(f"{identity.peer_id} is already on this network")
        async with trio.open_nursery() as nursery:
            host = MemoryHost(self, identity, gate, nursery, next(self._numbers), swarm_services)
            self.hosts[host.peer_id] = host
            try:
                yield host
            finally:
                del self.hosts[host.peer_id]
                for peer in sorted(host.peers):
                    self.unlink(host.peer_id, peer)
                nursery.cancel_scope.cancel()

    def link(self, a: str, b: str) -> None:
        self.hosts[a].peers.add(b)
        self.hosts[b].peers.add(a)

    def unlink(self, a: str, b: str) -> None:
        for one, other in ((a, b), (b, a)):
            host = self.hosts.get(one)
            if host is not None:
                host.peers.discard(other)
                host.reset_streams_with(other)


class MemoryHost:
    """A ``host_api.Host`` on a ``MemoryNetwork``."""

    def __init__(
        self,
        network: MemoryNetwork,
        identity: Identity,
        gate: PeerGate,
        nursery: trio.Nursery,
        number: int,
        swarm_services: bool,
    ) -> None:
        self.network = network
        self.identity = identity
        self.peer_id = identity.peer_id
        self.gate = gate
        self.library_faults = 0
        self.publish_failures = 0
        self.peers: set[str] = set()
        self.address = f"/memory/{number}/p2p/{self.peer_id}"
        self._nursery = nursery
        self._swarm_services = swarm_services
        self._handlers: dict[str, StreamHandler] = {}
        self._subscriptions: dict[str, trio.MemorySendChannel[GossipMessage]] = {}
        self._streams: dict[str, list[MemoryStream]] = defaultdict(list)
        self._dht_rejected = 0

    # -- the trust boundary
    def reject(self, peer_id: str, offence: Offence, detail: str) -> None:
        if self.gate.rejected(peer_id, offence, detail):
            self._nursery.start_soon(self.disconnect, peer_id)

    def library_fault(self, peer_id: str | None, error: Exception) -> None:
        self.library_faults += 1

    # -- peers and streams
    def addrs(self) -> list[str]:
        return [self.address]

    def listen_ports(self) -> list[int]:
        return []

    async def connect(self, address: str) -> str:
        peer_id = address.rsplit("/p2p/", 1)[-1]
        if peer_id == self.peer_id:
            raise ConfigError(f"{address} is this node itself")
        await trio.sleep(self.network.latency)
        remote = self.network.hosts.get(peer_id)
        if remote is None or remote.address != address:
            raise NetworkError(f"cannot connect to {address}: nobody answers there")
        self.network.link(self.peer_id, peer_id)
        return peer_id

    async def disconnect(self, peer_id: str) -> None:
        self.network.unlink(self.peer_id, peer_id)

    def connected_peers(self) -> list[PeerInfo]:
        hosts = self.network.hosts
        return sorted(
            (PeerInfo(p, hosts[p].addrs()) for p in self.peers if p in hosts),
            key=lambda p: p.peer_id,
        )

    def protocols_of(self, peer_id: str) -> list[str] | None:
        remote = self.network.hosts.get(peer_id)
        if remote is None or peer_id not in self.peers:
            return None
        return list(remote._handlers)

    async def open_stream(self, peer_id: str, protocol: str) -> MemoryStream:
        await trio.sleep(self.network.latency)
        remote = self.network.hosts.get(peer_id)
        if remote is None or peer_id not in self.peers:
            raise NetworkError(f"cannot open {protocol} stream to {peer_id}: not connected")
        handler = remote._handlers.get(protocol)
        if handler is None:
            raise ProtocolUnsupportedError(f"{peer_id} does not serve {protocol}")
        there, back = _Pipe(), _Pipe()
        ours = MemoryStream(back, there, remote.identity)
        theirs = MemoryStream(there, back, self.identity)
        self._track(peer_id, ours)
        remote._track(self.peer_id, theirs)
        remote._nursery.start_soon(remote._serve, protocol, handler, theirs)
        return ours

    async def _serve(self, protocol: str, handler: StreamHandler, stream: MemoryStream) -> None:
        if self.gate.banned(stream.remote_peer_id):
            await stream.reset()
            await self.disconnect(stream.remote_peer_id)
            return
        await serve_stream(self, self.gate, protocol, handler, stream)

    def _track(self, peer_id: str, stream: MemoryStream) -> None:
        live = [s for s in self._streams[peer_id] if not s.done]
        self._streams[peer_id] = [*live, stream]

    def reset_streams_with(self, peer_id: str) -> None:
        for stream in self._streams.pop(peer_id, []):
            stream._in.end(broken=True)
            stream._out.end(broken=True)

    def set_handler(self, protocol: str, handler: StreamHandler) -> None:
        self._handlers[protocol] = handler

    async def ping(self, peer_id: str) -> float:
        if peer_id not in self.peers:
            raise NetworkError(f"ping to {peer_id} failed: not connected")
        await trio.sleep(2 * self.network.latency)
        return 2000 * self.network.latency

    def open_streams(self) -> int:
        return sum(not s.done for streams in self._streams.values() for s in streams)

    def take_mdns_discoveries(self) -> list[tuple[str, list[str]]]:
        return []

    # -- gossip: flooded over links between subscribers
    def _require_swarm_services(self) -> None:
        if not self._swarm_services:
            raise LocalProtocolError("this host was opened without a swarm (no DHT/gossip)")

    async def publish(self, topic: str, data: bytes) -> bool:
        self._require_swarm_services()
        if len(data) > MAX_PUBLISH_SIZE:
            raise LocalProtocolError(
                f"gossip message of {len(data)} bytes exceeds {MAX_PUBLISH_SIZE}"
            )
        hosts = self.network.hosts
        reached, frontier = {self.peer_id}, [self.peer_id]
        while frontier:
            here = hosts[frontier.pop()]
            for peer in sorted(here.peers - reached):
                if peer in hosts and topic in hosts[peer]._subscriptions:
                    reached.add(peer)
                    frontier.append(peer)
        reached.discard(self.peer_id)
        if not reached:
            self.publish_failures += 1
            return False
        for peer in sorted(reached):
            hosts[peer]._subscriptions[topic].send_nowait(GossipMessage(self.peer_id, data))
        await trio.lowlevel.checkpoint()
        return True

    @asynccontextmanager
    async def subscribe(self, topic: str) -> AsyncIterator[NextMessage]:
        self._require_swarm_services()
        send, receive = trio.open_memory_channel[GossipMessage](float("inf"))
        self._subscriptions[topic] = send
        try:
            yield receive.receive
        finally:
            del self._subscriptions[topic]

    # -- DHT: one shared table
    async def provide(self, key: str) -> bool:
        self._require_swarm_services()
        await trio.sleep(self.network.latency)
        self.network.providers[key][self.peer_id] = self.addrs()
        return True

    async def find_providers(self, key: str) -> list[tuple[str, list[str]]]:
        self._require_swarm_services()
        await trio.sleep(self.network.latency)
        found = self.network.providers.get(key, {})
        return [(p, addrs) for p, addrs in found.items() if p != self.peer_id]

    async def put_value(self, key: str, value: bytes) -> None:
        self._require_swarm_services()
        await trio.sleep(self.network.latency)
        try:
            records.validate_record(key, value)
        except RemoteProtocolError as exc:
            self._dht_rejected += 1
            raise NetworkError(f"DHT put of {key} failed: {exc}") from exc
        current = self.network.values.get(key)
        candidates = [value] if current is None else [current, value]
        self.network.values[key] = candidates[records.select_record(key, candidates)]

    async def get_value(self, key: str) -> bytes | None:
        self._require_swarm_services()
        await trio.sleep(self.network.latency)
        return self.network.values.get(key)

    @property
    def dht_records_rejected(self) -> int:
        return self._dht_rejected

    def dht_size(self) -> int:
        return len(self.peers)

    # -- NAT traversal: every path is direct here
    @property
    def relaying(self) -> bool:
        return False

    async def reserve_relays(self) -> list[str]:
        raise LocalProtocolError("this host was opened without relay support")

    def paths(self) -> dict[str, str]:
        return dict.fromkeys(sorted(self.peers), "direct")

    async def hole_punch(self, peer_id: str) -> bool:
        raise LocalProtocolError("this host was opened without relay support")
