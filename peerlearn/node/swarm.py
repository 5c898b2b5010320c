"""Swarm membership and shared state in the daemon: DHT discovery, CRDT anti-entropy and deltas.

* Discovery: every member provides the swarm key in the DHT and publishes a signed peer
  record; a loop connects to the providers it finds and to every member listed in the CRDT.
  An address that cannot be dialled (malformed, a relay address without relay support, a
  dead host) fails alone; the other addresses and peers go on.
* State: ``SwarmState`` (``peerlearn.gossip.crdt``). Local writes are signed and published
  as deltas over gossipsub (bare lists of signed entries: each entry is signed by its owner
  and idempotent, so a replayed delta changes nothing). On every new connection the node
  pulls what it lacks from the peer over ``/peerlearn/sync/2`` (``peerlearn.gossip.sync``),
  and every ``ANTI_ENTROPY_INTERVAL`` from ``ANTI_ENTROPY_PEERS`` peers picked at random,
  which repairs what gossip dropped (with every peer it was about a tenth of a busy
  16-node daemon's samples in py-spy).
* Remote entries are triaged on the event loop (cheap checks), their signatures verified in
  a worker thread, then merged; whatever is rejected is counted against the peer it came
  from. Peers whose identify shows no ``/peerlearn/sync/2`` are not peerlearn nodes: they
  are left alone.
* Strangers: a gossip message carries its publisher's own records only (each node gossips
  its own writes; anything else is refused), newcomers arrive at the rate each introducer
  is allowed (``peerlearn.gossip.joins``, by peer and by IP address), and a member we met in
  a sync session is established (never evicted for members we only heard of). Models go
  only to members we are connected to (``reachable_members``): a member record nobody can
  reach takes no pushes.
"""

from __future__ import annotations

import logging
import random
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from peerlearn import wire
from peerlearn.backoff import Backoff
from peerlearn.errors import (
    NetworkError,
    Offence,
    PeerlearnError,
    ProtocolUnsupportedError,
    RemoteProtocolError,
)
from peerlearn.gossip import records, sync
from peerlearn.gossip.admission import AdmissionMode, solve_pow
from peerlearn.gossip.crdt import (
    DigestPage,
    Entry,
    SwarmState,
    decode_entries,
    decode_snapshot,
    encode_snapshot,
    entries_to_wire,
    verify_entries,
)
from peerlearn.gossip.schemas import RECORD_NAMES
from peerlearn.identity import peer_id_from_public_key, public_key_from_peer_id
from peerlearn.node.checkpoints import CheckpointError, CheckpointStore
from peerlearn.node.framing import DEFAULT_PACE, Pace, receive_frame, send_frame
from peerlearn.node.host_api import MAX_PUBLISH_SIZE, Host, Stream
from peerlearn.node.offload import Offload, in_thread

logger = logging.getLogger(__name__)

SYNC_PROTOCOL = sync.SYNC_PROTOCOL
GOSSIP_LIMITS = wire.Limits(max_message_size=MAX_PUBLISH_SIZE, max_array_len=4096, max_map_len=64)
DISCOVERY_FAST = 0.5  # seconds between discovery rounds while joining
DISCOVERY_SLOW = 5.0  # seconds between discovery rounds afterwards
ANTI_ENTROPY_INTERVAL = 10.0  # seconds
ANTI_ENTROPY_PEERS = 3  # random peers pulled from each interval
HEARTBEAT_INTERVAL = 30.0  # seconds (liveness is coarse; each one is gossiped to everyone)
SYNC_TIMEOUT = 120.0  # seconds for one whole anti-entropy session (frames keep a pace too)
DIAL_TIMEOUT = 10.0  # seconds per dial
MAX_SYNC_SESSIONS = 32  # sessions served at once (one per peer)
MAX_DIALS_IN_FLIGHT = 16
DIAL_STAGGER = 0.5  # seconds between starting dials to a peer's successive addresses
FIRST_SYNC_GRACE = 2.0  # seconds a joining node waits for its first sync before dialling others
DIAL_RETRY_FIRST = 1.0  # seconds before redialling a peer whose dial failed; doubles per failure
DIAL_RETRY_MAX = 60.0  # seconds
INLINE_VERIFY = 16  # entries verified on the event loop; larger batches go to a thread
ACCEPT_SLICE = 256  # remote entries triaged and merged at a time
STATE_FILE = "swarm-state.msgpack"
SAVE_INTERVAL = 30.0  # seconds between saves of a changing swarm state
SAVE_AT_SHUTDOWN = 5.0  # seconds the last save may take


def topic(swarm: str) -> str:
    return f"/peerlearn/{swarm}/crdt/1"


def _introducers(peer_id: str, ip: str | None) -> tuple[str, ...]:
    """Whom newcomers handed over by ``peer_id`` count against: the peer and its address."""
    return (peer_id,) if ip is None else (peer_id, f"ip:{ip}")


class SwarmService:
    """Runs discovery, heartbeats, gossip and anti-entropy for one node."""

    def __init__(
        self,
        host: Host,
        state: SwarmState,
        sequence: wire.SequenceCounter,
        *,
        max_peers: int,
        invite: bytes | None = None,
        pace: Pace = DEFAULT_PACE,
        store: CheckpointStore | None = None,
        wall_clock: Callable[[], float] = time.time,
        offload: Offload = in_thread,
    ) -> None:
        """``sequence`` is the node's single counter for everything its identity signs;
        ``invite`` (token admission) goes into our member record; ``pace`` is what peers
        must keep on our streams; ``store`` keeps the state across restarts (restored here,
        saved every ``SAVE_INTERVAL`` while it changes and at shutdown); ``wall_clock`` dates
        what we sign and judges what others dated; ``offload`` runs big signature checks and
        the saving of the state. Timers read trio's clock."""

        self.host = host
        self.state = state
        self.max_peers = max_peers
        self.invite = invite
        self.pace = pace
        self.wall_clock = wall_clock
        self.offload = offload
        self.join_started: float | None = None  # first moment we had a peer
        self.join_seconds: float | None = None  # from then until all members were connected
        self.synced_with: set[str] = set()
        self.foreign_peers: set[str] = set()  # connected, but not peerlearn nodes
        self.listeners: list[Callable[[list[Entry]], None]] = []
        self._pending: list[Entry] = []
        self._publish_wakeup = trio.Event()
        self._discovery_wakeup = trio.Event()
        self._providers: dict[str, list[str]] = {}  # from the DHT
        self._busy: set[str] = set()  # peers being dialled or synced by discovery
        self._serving: set[str] = set()  # peers whose sync session we serve right now
        self._backoff = Backoff(DIAL_RETRY_FIRST, DIAL_RETRY_MAX)
        self._random = random.Random()
        self._sequence = sequence
        self._store = store
        self._changed = trio.Event()
        self._pow: bytes | None = None  # our member record's proof of work, if asked
        if store is not None:
            self._restore(store)
        host.set_handler(SYNC_PROTOCOL, self._serve_sync)

    @property
    def swarm(self) -> str:
        return self.state.swarm

    # -- local writes ---------------------------------------------------------------------

    def write(self, name: str, value: Any) -> None:
        """Sign and merge one of our records; it is gossiped shortly after."""
        entry = self.state.write(self.host.identity, name, value, self.wall_clock())
        self._pending.append(entry)
        self._publish_wakeup.set()
        self._notify([entry])

    def announce_addrs(self) -> None:
        """Re-publish our member record after our addresses changed (e.g. a relay slot)."""
        current = self.state.get(self.host.identity.public_key, "member")
        if current is not None:
            self.write("member", {**current, "addrs": self.host.addrs()})

    def members(self) -> list[str]:
        """Peer IDs of every member that published a member record (ourselves included)."""
        return sorted(peer_id_from_public_key(o) for o in self.state.records("member"))

    def reachable_members(self) -> list[bytes]:
        """Public keys of the members we are connected to, and ours: where models can go."""
        connected = {p.peer_id for p in self.host.connected_peers()}
        members = [self.host.identity.public_key]
        for peer_id in sorted(connected - self.foreign_peers):
            try:
                key = public_key_from_peer_id(peer_id)
            except ValueError:
                continue
            if self.state.is_member(key):
                members.append(key)
        return sorted(members)

    def establish(self, peer_id: str) -> None:
        """``peer_id`` proved itself (it delivered a model we accepted): never evicted."""
        self.state.establish(public_key_from_peer_id(peer_id))

    def member_count(self) -> int:
        return len(self.state.records("member"))

    def is_member(self, peer_id: str) -> bool:
        try:
            return self.state.is_member(public_key_from_peer_id(peer_id))
        except ValueError:
            return False

    def status(self) -> dict[str, Any]:
        joins = self.state.joins
        return {
            "entries": len(self.state.entries),
            "members": self.member_count(),
            "established": self.state.established_count(),
            "evicted_owners": self.state.evicted_owners,
            "joins_deferred": joins.deferred if joins is not None else 0,
            "admission": self.state.admission.mode.value,
            "foreign_peers": len(self.foreign_peers),
        }

    def versions(self) -> list[list[Any]]:
        """``[[owner hex, record, clock], ...]``: lets observers compare replicas."""
        return [[o.hex(), n, e.clock] for (o, n), e in sorted(self.state.entries.items())]

    def _notify(self, changed: list[Entry]) -> None:
        self._changed.set()
        for entry in changed:
            if entry.name == "member":  # a new member, or new addresses: dial it now
                self._backoff.reset(peer_id_from_public_key(entry.owner))
                self._discovery_wakeup.set()
        for listener in self.listeners:
            listener(changed)

    # -- remote entries -------------------------------------------------------------------

    async def accept(
        self, entries: list[Entry], source: str, source_ip: str | None = None
    ) -> list[Entry]:
        """Triage, verify and merge entries that came from ``source`` (a peer ID, connected
        from ``source_ip`` if known); what is rejected is counted against ``source``, once
        per kind of offence per batch; newcomers arrive at the rate ``source`` and its IP
        may introduce them. Large batches are taken a slice at a time, so the event loop
        is never held for long."""
        if len(entries) > ACCEPT_SLICE:
            changed = []
            for start in range(0, len(entries), ACCEPT_SLICE):
                part = entries[start : start + ACCEPT_SLICE]
                changed += await self.accept(part, source, source_ip)
                await trio.lowlevel.checkpoint()
            return changed
        triage = self.state.triage(entries, self.wall_clock(), _introducers(source, source_ip))
        offences: dict[Offence, list[str]] = defaultdict(list)
        for _, error in triage.rejected:
            offences[error.offence].append(str(error))
        if len(triage.candidates) <= INLINE_VERIFY:
            verified, forged = verify_entries(self.swarm, triage.candidates)
        else:
            verified, forged = await self.offload(verify_entries, self.swarm, triage.candidates)
        if forged:
            offences[Offence.FORGED].append(f"{forged[0].name} record with a bad signature")
        for offence, reasons in offences.items():
            detail = f"{len(reasons)} swarm records rejected, e.g. {reasons[0]}"
            self.host.reject(source, offence, detail)
        changed = self.state.merge(verified, self.wall_clock())
        if changed:
            self._notify(changed)
        return changed

    def _restore(self, store: CheckpointStore) -> None:
        """Our saved state (before any peer): checked like any remote entries. A damaged
        file costs nothing the peers cannot give back, so it is reported, not fatal."""
        try:
            loaded = store.load(lambda data: decode_snapshot(data, self._max_entries))
        except CheckpointError as exc:
            logger.warning("starting with an empty swarm state: %s", exc)
            return
        if loaded is None:
            return
        entries = loaded.value
        triage = self.state.triage(entries, self.wall_clock())
        verified, _ = verify_entries(self.swarm, triage.candidates)
        kept = self.state.merge(verified, self.wall_clock())
        dropped = len(entries) - len(kept) - triage.known
        logger.info("restored %d swarm records (%d invalid dropped)", len(kept), dropped)

    @property
    def _max_entries(self) -> int:
        return self.state.max_owners * len(RECORD_NAMES)

    async def _persist(self, store: CheckpointStore) -> None:
        """Save the state when it changed, at most every ``SAVE_INTERVAL`` seconds, and once
        more at shutdown (within a bounded time)."""
        try:
            while True:
                await self._changed.wait()
                self._changed = trio.Event()
                await self._save(store)
                await trio.sleep(SAVE_INTERVAL)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(SAVE_AT_SHUTDOWN):
                await self._save(store)

    async def _save(self, store: CheckpointStore) -> None:
        snapshot = list(self.state.entries.values())
        await self.offload(lambda: store.save(encode_snapshot(snapshot)))

    # -- tasks ----------------------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        if self.host.connected_peers():
            self.join_started = trio.current_time()
        bits = self.state.admission.pow_bits
        if bits:
            logger.info("finding this node's proof of work (%d bits, ~2**%d hashes)", bits, bits)
            owner = self.host.identity.public_key
            self._pow = await self.offload(solve_pow, self.swarm, owner, bits)
        self.write("member", self._member_value())
        self.write("heartbeat", {"t": self.wall_clock()})
        async with self.host.subscribe(topic(self.swarm)) as next_message, trio.open_nursery() as n:
            n.start_soon(self._receive_gossip, next_message)
            n.start_soon(self._publisher)
            n.start_soon(self._heartbeats)
            n.start_soon(self._discovery)
            n.start_soon(self._anti_entropy)
            if self._store is not None:
                n.start_soon(self._persist, self._store)
            task_status.started()

    def _member_value(self) -> dict[str, Any]:
        value: dict[str, Any] = {"addrs": self.host.addrs()}
        if self.invite is not None:
            value["invite"] = self.invite
        if self._pow is not None:
            value["pow"] = self._pow
        return value

    async def _receive_gossip(self, next_message: Callable[[], Awaitable[Any]]) -> None:
        """Each node gossips its own writes only, so a message holding another owner's
        records is refused whole (records of others travel by anti-entropy)."""
        while True:
            message = await next_message()
            try:
                entries = decode_entries(message.data, GOSSIP_LIMITS)
                publisher = public_key_from_peer_id(message.sender_id)
                if any(entry.owner != publisher for entry in entries):
                    raise RemoteProtocolError("gossip carries records of another owner")
            except (RemoteProtocolError, ValueError) as exc:
                offence = getattr(exc, "offence", Offence.MALFORMED)
                self.host.reject(message.sender_id, offence, f"swarm gossip: {exc}")
                continue
            await self.accept(entries, message.sender_id)

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
            self.write("heartbeat", {"t": self.wall_clock()})

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
            now = self.wall_clock()
            record_key, value = records.make_peer_record(
                self.host.identity, self.swarm, self.host.addrs(), self._sequence.next(now), now
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
            self.join_started = trio.current_time()
        for peer_id in connected:
            self._backoff.reset(peer_id)  # they reached us
        # Sync with the peers we have first (a restarted node's 15 dials would slow its first
        # sync to seconds), unless that takes too long.
        started = self.join_started
        if not self.synced_with and started and trio.current_time() - started < FIRST_SYNC_GRACE:
            candidates: dict[str, list[str]] = {}
        else:
            candidates = self._dial_candidates()
        room = min(MAX_DIALS_IN_FLIGHT - len(self._busy), self.max_peers - len(connected))
        now = trio.current_time()
        skip = connected | self._busy | {self.host.peer_id}
        due = [
            (peer_id, addrs)
            for peer_id, addrs in candidates.items()
            if peer_id not in skip and self._backoff.due(peer_id, now)
        ]
        for peer_id, addrs in sorted(due)[: max(room, 0)]:
            self._busy.add(peer_id)
            nursery.start_soon(self._dial, peer_id, addrs)
        for peer_id in sorted(connected - self.synced_with - self._busy - self.foreign_peers):
            self._busy.add(peer_id)
            nursery.start_soon(self._sync_new, peer_id)
        self._check_joined()

    def _dial_candidates(self) -> dict[str, list[str]]:
        """{peer: addresses} from the DHT, mDNS and member records (these win: signed);
        peers without an address we could dial are left out."""
        candidates = dict(self._providers)
        for peer_id, addrs in self.host.take_mdns_discoveries():
            candidates.setdefault(peer_id, addrs)  # not members yet: sync decides
        for owner, value in self.state.records("member").items():
            if value["addrs"]:
                candidates[peer_id_from_public_key(owner)] = list(value["addrs"])
        relaying = self.host.relaying  # circuit addresses need relay support
        usable = {
            peer: [a for a in addrs if relaying or "/p2p-circuit" not in a]
            for peer, addrs in candidates.items()
        }
        return {peer: addrs for peer, addrs in usable.items() if addrs}

    def _check_joined(self) -> None:
        """Joined = synced with someone and connected to every member we know of, except
        members we dialled and could not reach (gone, or not reachable from here). Checked
        after every sync and failed dial: one slow dial must not delay the verdict."""
        if self.join_seconds is not None or self.join_started is None or not self.synced_with:
            return
        members = {
            peer_id_from_public_key(owner)
            for owner, value in self.state.records("member").items()
            if value["addrs"]  # a member without an address cannot be dialled
        }
        members -= {self.host.peer_id} | self._backoff.unreachable
        now_connected = {p.peer_id for p in self.host.connected_peers()}
        if members <= now_connected:
            self.join_seconds = trio.current_time() - self.join_started
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
        first connection wins and the other attempts are cancelled. Each address fails on
        its own, whatever is wrong with it."""
        won: list[str] = []

        async def attempt(delay: float, full: str, cancel: trio.CancelScope) -> None:
            await trio.sleep(delay)
            started = trio.current_time()
            try:
                with trio.fail_after(DIAL_TIMEOUT):
                    await self.host.connect(full)
            except (PeerlearnError, trio.TooSlowError) as exc:
                logger.debug("dial %s: %s", full[:200], exc)
                return
            logger.debug("connected to %s in %.2f s", full, trio.current_time() - started)
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
            self._backoff.failed(peer_id, trio.current_time())
            self._check_joined()

    async def _anti_entropy(self) -> None:
        while True:
            await trio.sleep(ANTI_ENTROPY_INTERVAL)
            peers = [
                p.peer_id
                for p in self.host.connected_peers()
                if p.peer_id not in self.foreign_peers
            ]
            chosen = self._random.sample(peers, min(ANTI_ENTROPY_PEERS, len(peers)))
            async with trio.open_nursery() as nursery:
                for peer_id in chosen:
                    nursery.start_soon(self.sync_with, peer_id)

    # -- anti-entropy protocol ------------------------------------------------------------

    def _foreign(self, peer_id: str) -> None:
        if peer_id not in self.foreign_peers:
            logger.debug("%s does not speak %s: leaving it alone", peer_id, SYNC_PROTOCOL)
            self.foreign_peers.add(peer_id)

    async def sync_with(self, peer_id: str) -> None:
        """Pull what ``peer_id`` holds and we lack (``peerlearn.gossip.sync``). Peers whose
        identify, or whose answer to our stream, shows they do not speak the protocol are
        not peerlearn nodes and are left alone from then on."""
        protocols = self.host.protocols_of(peer_id)
        if peer_id in self.foreign_peers or (protocols and SYNC_PROTOCOL not in protocols):
            self._foreign(peer_id)
            return
        started = trio.current_time()
        try:
            with trio.fail_after(SYNC_TIMEOUT):
                stream = await self.host.open_stream(peer_id, SYNC_PROTOCOL)
                try:
                    pulled = await self._pull(stream)
                finally:
                    await stream.close()
        except ProtocolUnsupportedError:
            self._foreign(peer_id)
            return
        except RemoteProtocolError as exc:
            self.host.reject(peer_id, exc.offence, f"anti-entropy: {exc}")
            return
        except (NetworkError, trio.TooSlowError) as exc:
            logger.debug("anti-entropy with %s failed: %s", peer_id, exc)
            return
        if pulled:
            logger.debug("synced with %s in %.2f s", peer_id, trio.current_time() - started)
            self._synced(peer_id)

    async def _pull(self, stream: Stream) -> bool:
        """One pull session as the initiator. In an open swarm there is nothing to keep
        from a non-member, so the first digest page goes out with our hello (one round
        trip less on a busy peer); otherwise only after the peer's hello admitted it."""
        me = self.state.entries.get((self.host.identity.public_key, "member"))
        if me is None:
            return False  # not started yet
        pages = iter(self.state.digest_pages(sync.OWNERS_PER_PAGE))
        first = next(pages)
        eager = self.state.admission.mode is AdmissionMode.OPEN
        await send_frame(stream, sync.encode_hello(me))
        if eager:
            await send_frame(stream, sync.encode_want(first))
        frame = await self._next_frame(stream)
        if isinstance(frame, sync.Refused):
            logger.info("%s refused to sync with us: %s", stream.remote_peer_id, frame.reason)
            return False
        if not isinstance(frame, sync.Hello):
            raise RemoteProtocolError(f"expected hello, got {type(frame).__name__}")
        await self._introduce(frame.member, stream)
        if not eager:
            await send_frame(stream, sync.encode_want(first))
        page: DigestPage | None = first
        budget = self._max_entries  # entries a whole state can hold
        while page is not None:
            more = True
            while more:
                frame = sync.decode_frame(
                    await receive_frame(stream, sync.MAX_SYNC_FRAME, self.pace)
                )
                if not isinstance(frame, sync.Entries):
                    raise RemoteProtocolError(f"expected entries, got {type(frame).__name__}")
                budget -= len(frame.entries)
                if budget < 0:
                    raise RemoteProtocolError(
                        "sent more records than a swarm holds", Offence.OVERSIZED
                    )
                await self.accept(frame.entries, stream.remote_peer_id, stream.remote_ip)
                more = frame.more
            page = next(pages, None)
            if page is not None:
                await send_frame(stream, sync.encode_want(page))
        return True

    async def _introduce(self, member: Entry, stream: Stream) -> None:
        """Admit the peer's member record from a hello, or raise why not. A peer that
        introduces itself on its own authenticated stream is established (never evicted in
        favour of members we only heard of); its IP address may bring only so many."""
        peer_id = stream.remote_peer_id
        if member.owner != public_key_from_peer_id(peer_id):
            raise RemoteProtocolError("hello carries someone else's member record", Offence.FORGED)
        introducers = _introducers(peer_id, stream.remote_ip)
        triage = self.state.triage([member], self.wall_clock(), introducers)
        if triage.rejected:
            raise triage.rejected[0][1]
        if triage.deferred:
            raise NetworkError("too many newcomers from that address right now; try later")
        verified, forged = verify_entries(self.swarm, triage.candidates)
        if forged:
            raise RemoteProtocolError("hello member record has a bad signature", Offence.FORGED)
        changed = self.state.merge(verified, self.wall_clock())
        self.state.establish(member.owner)
        if changed:
            self._notify(changed)

    async def _next_frame(self, stream: Stream) -> sync.Frame:
        return sync.decode_frame(await receive_frame(stream, sync.MAX_SYNC_FRAME, self.pace))

    def _synced(self, peer_id: str) -> None:
        if not self.synced_with:
            self._discovery_wakeup.set()  # the dials held back for the first sync
        self.synced_with.add(peer_id)
        self._check_joined()

    async def _serve_sync(self, stream: Stream) -> None:
        """Serve one pull. Raises ``RemoteProtocolError`` for what the peer got wrong (the
        host counts it); a busy node refuses politely."""
        peer = stream.remote_peer_id
        if peer in self._serving or len(self._serving) >= MAX_SYNC_SESSIONS:
            await send_frame(stream, sync.encode_refused("busy"))
            await stream.close()
            return
        self._serving.add(peer)
        try:
            with trio.fail_after(SYNC_TIMEOUT):
                frame = sync.decode_frame(
                    await receive_frame(stream, sync.MAX_SYNC_FRAME, self.pace)
                )
                if not isinstance(frame, sync.Hello):
                    raise RemoteProtocolError(f"expected hello, got {type(frame).__name__}")
                me = self.state.entries.get((self.host.identity.public_key, "member"))
                if me is None:
                    await send_frame(stream, sync.encode_refused("starting"))
                    return
                try:
                    await self._introduce(frame.member, stream)
                except RemoteProtocolError as exc:
                    await send_frame(stream, sync.encode_refused(str(exc)))
                    raise
                except NetworkError as exc:
                    await send_frame(stream, sync.encode_refused(str(exc)))
                    return
                await send_frame(stream, sync.encode_hello(me))
                await self._serve_pages(stream)
        except trio.TooSlowError:
            logger.debug("anti-entropy from %s took longer than %.0f s", peer, SYNC_TIMEOUT)
            return
        finally:
            self._serving.discard(peer)
            await stream.close()
        self._synced(peer)

    async def _serve_pages(self, stream: Stream) -> None:
        while True:
            frame = await self._next_frame(stream)
            if not isinstance(frame, sync.Want):
                raise RemoteProtocolError(f"expected want, got {type(frame).__name__}")
            for data in sync.encode_entries(self.state.missing_for(frame.page)):
                await send_frame(stream, data)
            if frame.page.hi is None:
                return
