"""Swarm membership and shared state in the daemon: DHT discovery, CRDT anti-entropy and deltas.

* Discovery: every member provides the swarm key in the DHT and publishes a signed peer
  record; a loop connects to the providers it finds and to every member listed in the CRDT.
* State: ``SwarmState`` (``peerlearn.gossip.crdt``). Local writes are signed and published
  as deltas over gossipsub; on every new connection, and periodically, the two sides run
  anti-entropy over ``/peerlearn/sync/1`` (digest -> missing entries, both ways), which also
  repairs anything gossip dropped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from peerlearn import wire
from peerlearn.backoff import doubling_delay
from peerlearn.errors import NetworkError, RemoteProtocolError
from peerlearn.gossip import records
from peerlearn.gossip.crdt import SwarmState, entries_from_wire, entries_to_wire
from peerlearn.identity import peer_id_from_public_key
from peerlearn.node.framing import receive_frame, send_frame
from peerlearn.node.host import P2PHost, Stream

logger = logging.getLogger(__name__)

SYNC_PROTOCOL = "/peerlearn/sync/1"
MAX_SYNC_FRAME = 8 * 2**20  # bytes
SYNC_LIMITS = wire.Limits(max_message_size=MAX_SYNC_FRAME, max_array_len=100_000, max_map_len=64)
DISCOVERY_FAST = 0.5  # seconds between discovery rounds while joining
DISCOVERY_SLOW = 5.0  # seconds between discovery rounds afterwards
ANTI_ENTROPY_INTERVAL = 10.0  # seconds
HEARTBEAT_INTERVAL = 30.0  # seconds (liveness is coarse; each one is gossiped to everyone)
SYNC_TIMEOUT = 10.0  # seconds per anti-entropy exchange
MAX_DIALS_IN_FLIGHT = 16
DIAL_STAGGER = 0.5  # seconds between starting dials to a peer's successive addresses
FIRST_SYNC_GRACE = 2.0  # seconds a joining node waits for its first sync before dialling others
DIAL_RETRY_FIRST = 1.0  # seconds before redialling a peer whose dial failed; doubles per failure
DIAL_RETRY_MAX = 60.0  # seconds


@dataclass
class DialBackoff:
    """When to dial a peer again after failed dials: ``DIAL_RETRY_FIRST`` seconds, doubling
    per failure up to ``DIAL_RETRY_MAX`` (a dead member is not dialled every half second)."""

    failures: dict[str, tuple[int, float]] = field(default_factory=dict)  # peer: (n, retry at)

    def due(self, peer: str, now: float) -> bool:
        return now >= self.failures.get(peer, (0, now))[1]

    def failed(self, peer: str, now: float) -> None:
        n = self.failures.get(peer, (0, now))[0] + 1
        self.failures[peer] = (n, now + doubling_delay(DIAL_RETRY_FIRST, n, DIAL_RETRY_MAX))

    def reset(self, peer: str) -> None:
        """Connected, or its addresses changed: dial it at once next time."""
        self.failures.pop(peer, None)

    @property
    def unreachable(self) -> set[str]:
        """Peers whose last dial failed."""
        return set(self.failures)


def topic(swarm: str) -> str:
    return f"/peerlearn/{swarm}/crdt/1"


class SwarmService:
    """Runs discovery, heartbeats, gossip and anti-entropy for one node."""

    def __init__(
        self,
        host: P2PHost,
        state: SwarmState,
        sequence: wire.SequenceCounter,
        *,
        max_peers: int,
    ) -> None:
        """``sequence`` is the node's single counter for everything its identity signs."""

        self.host = host
        self.state = state
        self.max_peers = max_peers
        self.join_started: float | None = None  # first moment we had a peer
        self.join_seconds: float | None = None  # from then until all members were connected
        self.synced_with: set[str] = set()
        self.rejected_entries = 0
        self.listeners: list[Callable[[list[Any]], None]] = []
        self._pending: list[Any] = []
        self._publish_wakeup = trio.Event()
        self._discovery_wakeup = trio.Event()
        self._providers: dict[str, list[str]] = {}  # from the DHT
        self._busy: set[str] = set()  # peers being dialled or synced by discovery
        self._backoff = DialBackoff()
        self._sequence = sequence
        host.set_handler(SYNC_PROTOCOL, self._serve_sync)

    @property
    def swarm(self) -> str:
        return self.state.swarm

    # -- local writes ---------------------------------------------------------------------

    def write(self, name: str, value: Any) -> None:
        """Sign and merge one of our records; it is gossiped shortly after."""
        entry = self.state.write(self.host.identity, name, value)
        self._pending.append(entry)
        self._publish_wakeup.set()
        self._notify([entry])

    def announce_addrs(self) -> None:
        """Re-publish our member record after our addresses changed (e.g. a relay slot)."""
        if self.state.get(self.host.identity.public_key, "member") is not None:
            self.write("member", {"addrs": self.host.addrs()})

    def versions(self) -> dict[str, int]:
        """``{"<owner hex prefix>/<record>": lamport}``: lets observers compare replicas."""
        return {f"{o.hex()[:16]}/{n}": e.lamport for (o, n), e in self.state.entries.items()}

    def members(self) -> list[str]:
        """Peer IDs of every member that published a member record (ourselves included)."""
        return sorted(peer_id_from_public_key(o) for o in self.state.records("member"))

    def _notify(self, changed: list[Any]) -> None:
        for entry in changed:
            if entry.name == "member":  # a new member, or new addresses: dial it now
                self._backoff.reset(peer_id_from_public_key(entry.owner))
                self._discovery_wakeup.set()
        for listener in self.listeners:
            listener(changed)

    def _merge(self, data: bytes, source: str) -> int:
        try:
            entries = entries_from_wire(data, self.swarm, SYNC_LIMITS)
        except RemoteProtocolError as exc:
            self.rejected_entries += 1
            logger.warning("rejected swarm state from %s: %s", source, exc)
            return 0
        changed = self.state.merge(entries)
        if changed:
            self._notify(changed)
        return len(changed)

    # -- tasks ----------------------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        if self.host.connected_peers():
            self.join_started = time.monotonic()
        self.write("member", {"addrs": self.host.addrs()})
        self.write("heartbeat", {"t": time.time()})
        async with self.host.subscribe(topic(self.swarm)) as next_message, trio.open_nursery() as n:
            n.start_soon(self._receive_gossip, next_message)
            n.start_soon(self._publisher)
            n.start_soon(self._heartbeats)
            n.start_soon(self._discovery)
            n.start_soon(self._anti_entropy)
            task_status.started()

    async def _receive_gossip(self, next_message: Callable[[], Awaitable[Any]]) -> None:
        while True:
            message = await next_message()
            self._merge(message.data, f"gossip from {message.sender_id}")

    async def _publisher(self) -> None:
        """Batches local writes into one gossip message (keeps under the rate limit)."""
        while True:
            await self._publish_wakeup.wait()
            self._publish_wakeup = trio.Event()
            batch, self._pending = self._pending, []
            if batch:
                await self.host.publish(topic(self.swarm), entries_to_wire(batch))
            await trio.sleep(0.05)

    async def _heartbeats(self) -> None:
        while True:
            await trio.sleep(HEARTBEAT_INTERVAL)
            self.write("heartbeat", {"t": time.time()})

    async def _discovery(self) -> None:
        """Dials every member we learn of as soon as we learn of it: a new member record
        (gossip or sync) wakes the loop, and no dial or DHT query waits for another."""
        key = records.swarm_provider_key(self.swarm)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._announce, key)
            nursery.start_soon(self._find_providers, key)
            while True:
                self._discovery_wakeup = trio.Event()
                self._start_dials(nursery)
                with trio.move_on_after(self._discovery_interval):
                    await self._discovery_wakeup.wait()

    @property
    def _discovery_interval(self) -> float:
        return DISCOVERY_SLOW if self.join_seconds is not None else DISCOVERY_FAST

    async def _announce(self, key: str) -> None:
        """Provide the swarm key and publish our peer record in the DHT (once)."""
        try:
            await self.host.provide(key)
            record_key, value = records.make_peer_record(
                self.host.identity, self.swarm, self.host.addrs(), self._sequence.next(time.time())
            )
            await self.host.put_value(record_key, value)
        except NetworkError as exc:
            logger.warning("DHT announcement failed (members still find us by gossip): %s", exc)

    async def _find_providers(self, key: str) -> None:
        """Keeps ``_providers`` (swarm members found through the DHT) fresh."""
        while True:
            try:
                found = dict(await self.host.find_providers(key))
            except NetworkError as exc:
                logger.debug("find_providers: %s", exc)
            else:
                if set(found) - set(self._providers):
                    self._discovery_wakeup.set()
                self._providers = found
            await trio.sleep(self._discovery_interval)

    def _start_dials(self, nursery: trio.Nursery) -> None:
        connected = {p.peer_id for p in self.host.connected_peers()}
        if connected and self.join_started is None:
            self.join_started = time.monotonic()
        for peer_id in connected:
            self._backoff.reset(peer_id)  # they reached us
        # Sync with the peers we have first (a restarted node's 15 dials would slow its first
        # sync to seconds), unless that takes too long.
        started = self.join_started
        if not self.synced_with and started and time.monotonic() - started < FIRST_SYNC_GRACE:
            candidates: dict[str, list[str]] = {}
        else:
            candidates = self._dial_candidates()
        room = min(MAX_DIALS_IN_FLIGHT - len(self._busy), self.max_peers - len(connected))
        for peer_id, addrs in sorted(candidates.items()):
            if room <= 0:
                break
            if peer_id == self.host.peer_id or peer_id in connected or peer_id in self._busy:
                continue
            if not self._backoff.due(peer_id, time.monotonic()):
                continue
            if addrs:
                self._busy.add(peer_id)
                nursery.start_soon(self._dial, peer_id, addrs)
                room -= 1
        for peer_id in sorted(connected - self.synced_with - self._busy):
            self._busy.add(peer_id)
            nursery.start_soon(self._sync_new, peer_id)
        self._check_joined()

    def _dial_candidates(self) -> dict[str, list[str]]:
        """{peer: addresses} from the DHT, mDNS and member records (these win: signed)."""
        candidates = dict(self._providers)
        for peer_id, addrs in self.host.take_mdns_discoveries():
            candidates.setdefault(peer_id, addrs)  # not members yet: sync decides
        for owner, value in self.state.records("member").items():
            listed = value.get("addrs") if isinstance(value, dict) else None
            if isinstance(listed, list):
                candidates[peer_id_from_public_key(owner)] = [str(a) for a in listed]
        return candidates

    def _check_joined(self) -> None:
        """Joined = synced with someone and connected to every member we know of, except
        members we dialled and could not reach (gone, or not reachable from here). Checked
        after every sync and failed dial: one slow dial must not delay the verdict."""
        if self.join_seconds is not None or self.join_started is None or not self.synced_with:
            return
        members = set(self.members()) - {self.host.peer_id} - self._backoff.unreachable
        now_connected = {p.peer_id for p in self.host.connected_peers()}
        if members <= now_connected:
            self.join_seconds = time.monotonic() - self.join_started
            logger.info(
                "joined swarm %s in %.2f s: %d members connected, %d unreachable",
                self.swarm,
                self.join_seconds,
                len(members),
                len(self._backoff.unreachable),
            )

    async def _sync_new(self, peer_id: str) -> None:
        try:
            await self.sync_with(peer_id)
        finally:
            self._busy.discard(peer_id)

    async def _dial(self, peer_id: str, addrs: list[str]) -> None:
        try:
            await self._dial_addrs(peer_id, addrs)
        finally:
            self._busy.discard(peer_id)

    async def _dial_addrs(self, peer_id: str, addrs: list[str]) -> None:
        """Tries the addresses in order, each ``DIAL_STAGGER`` after the one before without
        waiting for it to fail (a LAN address behind another NAT only ever times out); the
        first connection wins and the other attempts are cancelled."""
        won: list[str] = []

        async def attempt(delay: float, full: str, cancel: trio.CancelScope) -> None:
            await trio.sleep(delay)
            started = time.monotonic()
            try:
                with trio.fail_after(SYNC_TIMEOUT):
                    await self.host.connect(full)
            except (NetworkError, trio.TooSlowError) as exc:
                logger.debug("dial %s: %s", full, exc)
                return
            logger.debug("connected to %s in %.2f s", full, time.monotonic() - started)
            won.append(full)
            cancel.cancel()
            self._check_joined()

        async with trio.open_nursery() as nursery:
            for i, addr in enumerate(addrs):
                full = addr if "/p2p/" in addr else f"{addr}/p2p/{peer_id}"
                nursery.start_soon(attempt, i * DIAL_STAGGER, full, nursery.cancel_scope)
        if won:
            self._backoff.reset(peer_id)
            await self.sync_with(peer_id)
        else:
            self._backoff.failed(peer_id, time.monotonic())
            self._check_joined()

    async def _anti_entropy(self) -> None:
        while True:
            await trio.sleep(ANTI_ENTROPY_INTERVAL)
            async with trio.open_nursery() as nursery:
                for peer in self.host.connected_peers():
                    nursery.start_soon(self.sync_with, peer.peer_id)

    # -- anti-entropy protocol ------------------------------------------------------------

    async def sync_with(self, peer_id: str) -> None:
        """digest -> their missing entries + their digest -> our missing entries."""
        started = time.monotonic()
        try:
            with trio.fail_after(SYNC_TIMEOUT):
                stream = await self.host.open_stream(peer_id, SYNC_PROTOCOL)
                try:
                    await send_frame(stream, wire.pack(self.state.digest()))
                    self._merge(await receive_frame(stream, MAX_SYNC_FRAME), peer_id)
                    their_digest = wire.unpack(
                        await receive_frame(stream, MAX_SYNC_FRAME), SYNC_LIMITS
                    )
                    await send_frame(stream, entries_to_wire(self.state.missing_for(their_digest)))
                finally:
                    await stream.close()
        except (NetworkError, RemoteProtocolError, trio.TooSlowError) as exc:
            logger.debug("anti-entropy with %s failed: %s", peer_id, exc)
            return
        logger.debug("synced with %s in %.2f s", peer_id, time.monotonic() - started)
        self._synced(peer_id)

    def _synced(self, peer_id: str) -> None:
        if not self.synced_with:
            self._discovery_wakeup.set()  # the dials held back for the first sync
        self.synced_with.add(peer_id)
        self._check_joined()

    async def _serve_sync(self, stream: Stream) -> None:
        try:
            with trio.fail_after(SYNC_TIMEOUT):
                their_digest = wire.unpack(await receive_frame(stream, MAX_SYNC_FRAME), SYNC_LIMITS)
                await send_frame(stream, entries_to_wire(self.state.missing_for(their_digest)))
                await send_frame(stream, wire.pack(self.state.digest()))
                self._merge(await receive_frame(stream, MAX_SYNC_FRAME), stream.remote_peer_id)
        except (NetworkError, RemoteProtocolError, trio.TooSlowError) as exc:
            logger.debug("anti-entropy from %s failed: %s", stream.remote_peer_id, exc)
            return
        finally:
            await stream.close()
        self._synced(stream.remote_peer_id)
