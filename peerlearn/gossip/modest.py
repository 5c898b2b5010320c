"""MoDeST decentralized sampling as a sans-I/O protocol core (``algorithms.md`` §2).

Each round r, the swarm deterministically orders the active peers by
``sha256(pubkey + b"-" + str(r))``; the first ``s`` *responsive* peers train and the first ``a``
responsive peers aggregate. Every node runs the same ``ModestNode``:

* as a **trainer** of round k it receives ``AggregatedModel(k)``, trains, and sends
  ``TrainedModel(k+1)`` to the available aggregators of round k+1, retrying with the next
  candidates if no ``AggAck`` arrives;
* as an **aggregator** of round k+1 it collects trained models (one per sender, newer round
  cancels older), aggregates after ``ceil(s*sf)`` of them or at ``aggregation_timeout``, acks the
  contributors and sends ``AggregatedModel(k+1)`` to the available trainers of round k+1;
* a watchdog re-distributes the last aggregated model to the next responsive trainers when
  no sign of the following round appears (all chosen trainers died), so rounds continue after
  most of the swarm is gone.

Inputs: ``start``, ``receive(src, msg, now)``, ``training_done``, ``aggregated``,
``handle_timer(now)``. Outputs: ``messages_to_send()`` -> ``[Send]`` and ``next_event()`` ->
``TrainRequest`` / ``CancelTraining`` / ``AggregateRequest`` / ``RoundAggregated``. Models
are opaque; the driver aggregates (off its event loop: a 50 MB model takes a second).
"""

from __future__ import annotations

import hashlib
import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any

from peerlearn.backoff import doubling_delay
from peerlearn.errors import LocalProtocolError, RemoteProtocolError

JOIN = "join"
LEAVE = "leave"


def ordered(round_: int, peers: Iterable[bytes]) -> list[bytes]:
    """The round's pseudo-random order of ``peers``; the same everywhere for the same set."""
    suffix = b"-" + str(round_).encode()
    return sorted(set(peers), key=lambda pk: (hashlib.sha256(pk + suffix).digest(), pk))


def sample(round_: int, peers: Iterable[bytes], size: int) -> list[bytes]:
    return ordered(round_, peers)[:size]


# --- the view -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ViewEntry:
    last_active: int  # last round the peer was seen active in
    index: int  # membership index: bumped on every join/leave of that peer
    status: str  # JOIN or LEAVE

    def merged(self, other: ViewEntry) -> ViewEntry:
        membership = other if other.index > self.index else self
        return ViewEntry(
            max(self.last_active, other.last_active), membership.index, membership.status
        )


class View:
    """Who is in the swarm and when each peer was last active; merged from piggybacked copies."""

    def __init__(self, peers: Iterable[bytes] = ()) -> None:
        self.entries: dict[bytes, ViewEntry] = {pk: ViewEntry(0, 0, JOIN) for pk in peers}
        self.pending: dict[bytes, ViewEntry] = {}

    def merge(self, other: Mapping[bytes, ViewEntry]) -> None:
        for pk, entry in other.items():
            mine = self.entries.get(pk)
            self.entries[pk] = entry if mine is None else mine.merged(entry)

    def seen(self, pk: bytes, round_: int) -> None:
        entry = self.entries.get(pk)
        if entry is None:
            self.entries[pk] = ViewEntry(round_, 0, JOIN)
        elif round_ > entry.last_active:
            self.entries[pk] = ViewEntry(round_, entry.index, entry.status)

    def membership(self, pk: bytes, round_: int, index: int, status: str) -> None:
        """A JOIN is held back until the next flush (so a newcomer is not sampled at once)."""
        entry = ViewEntry(round_, index, status)
        if status == JOIN:
            self.pending[pk] = entry
        else:
            self.merge({pk: entry})

    def flush(self) -> None:
        self.merge(self.pending)
        self.pending.clear()

    def active(self, round_: int, inactivity: int, me: bytes) -> list[bytes]:
        peers = [
            pk
            for pk, e in self.entries.items()
            if e.status == JOIN and e.last_active >= round_ - inactivity
        ]
        return sorted({*peers, me})

    def max_round(self) -> int:
        return max((e.last_active for e in self.entries.values()), default=0)

    def snapshot(self) -> dict[bytes, ViewEntry]:
        return dict(self.entries)


# --- messages, outputs, events -------------------------------------------------------------


@dataclass(frozen=True)
class Ping:
    round: int
    nonce: int


@dataclass(frozen=True)
class Pong:
    round: int  # the responder's round estimate
    nonce: int


@dataclass(frozen=True)
class Membership:
    round: int
    index: int
    status: str


@dataclass(frozen=True)
class TrainedModel:
    round: int
    model: Any = field(repr=False)
    view: Mapping[bytes, ViewEntry] = field(repr=False)


@dataclass(frozen=True)
class AggregatedModel:
    round: int
    model: Any = field(repr=False)
    view: Mapping[bytes, ViewEntry] = field(repr=False)


@dataclass(frozen=True)
class AggAck:
    round: int
    success: bool


Message = Ping | Pong | Membership | TrainedModel | AggregatedModel | AggAck


@dataclass(frozen=True)
class Send:
    dst: bytes
    message: Message


@dataclass(frozen=True)
class TrainRequest:
    """Train ``model`` for ``round`` and call ``training_done`` (unless cancelled)."""

    round: int
    model: Any = field(repr=False)


@dataclass(frozen=True)
class CancelTraining:
    round: int


@dataclass(frozen=True)
class RoundAggregated:
    round: int
    model: Any = field(repr=False)
    contributors: tuple[bytes, ...]


@dataclass(frozen=True)
class AggregateRequest:
    """Aggregate ``models`` (the driver may take its time), then call ``aggregated``."""

    round: int
    models: list[Any]
    contributors: tuple[bytes, ...]


Event = TrainRequest | CancelTraining | RoundAggregated | AggregateRequest


@dataclass(frozen=True)
class ModestSettings:
    sample_size: int = 10  # s: trainers per round
    aggregators: int = 1  # a: aggregators per round
    success_fraction: float = 1.0  # sf: aggregate after ceil(s*sf) models
    ping_interval: float = 1.0  # seconds between ping resends
    ping_timeout: float = 5.0  # seconds before a candidate counts as unresponsive
    aggregation_timeout: float = 30.0  # seconds an aggregator waits for trained models
    liveness_min_models: int = 1  # at the timeout, aggregate if at least this many arrived
    ack_timeout: float = 60.0  # seconds a trainer waits for AggAck before resending
    max_resends: int = 3  # resends of a trained model / redistributions of an aggregate
    round_timeout: float = 120.0  # seconds without a sign of the next round -> redistribute
    stall_timeout: float = 300.0  # seconds without swarm-wide progress -> first live re-seeds
    inactivity: int = 50  # tau: rounds after which a silent peer is not sampled
    unresponsive_for: float = 30.0  # seconds a missed ping puts a peer last in candidate orders
    max_unresponsive_for: float = 480.0  # the penalty doubles per consecutive miss, up to this


def settings_for(
    *,
    sample_size: int,
    aggregators: int,
    round_time: float,
    message_time: float,
    success_fraction: float = 1.0,
) -> ModestSettings:
    """The one mapping from a swarm's timing to MoDeST's timeouts, for the simulator and the
    daemon alike. ``round_time``: seconds of local training per round; ``message_time``: how
    long the transport may take to deliver a small message (pings are resent that often and
    a peer is unresponsive after four of them)."""
    return ModestSettings(
        sample_size=sample_size,
        aggregators=aggregators,
        success_fraction=success_fraction,
        ping_interval=message_time,
        ping_timeout=4 * message_time,
        aggregation_timeout=10 * round_time,
        ack_timeout=20 * round_time,
        round_timeout=30 * round_time,
        stall_timeout=40 * round_time,
    )


# --- availability checks ------------------------------------------------------------------


class _AvailabilityCheck:
    """Ping candidates in order until ``count`` answered (or candidates run out)."""

    def __init__(
        self,
        node: ModestNode,
        round_: int,
        candidates: Sequence[bytes],
        count: int,
        on_done: Callable[[list[bytes], int], None],
        now: float,
    ) -> None:
        self.node = node
        self.round = round_
        self.candidates = list(candidates)
        self.count = count
        self.on_done = on_done
        self.available: list[bytes] = []
        self.pending: dict[bytes, tuple[float, float, int]] = {}  # pk -> (first, last, nonce)
        self.next = 0
        self.max_round_seen = -1
        self.nonces: list[int] = []
        self.finished = False
        self._fill(now)

    def _fill(self, now: float) -> None:
        """Ping the next candidates, ``count`` answers' worth at a time. Candidates that
        recently missed a ping (they come last) are pinged all together: a check waits at
        most one ping timeout for peers that are probably gone, not one per ``count``."""
        unresponsive = self.node.unresponsive
        while self.next < len(self.candidates):
            hopeful = sum(1 for pk in self.pending if pk not in unresponsive)
            if len(self.available) + hopeful >= self.count:
                break
            pk = self.candidates[self.next]
            self.next += 1
            if pk == self.node.me:
                self.available.append(pk)
                continue
            nonce = self.node._register_ping(self)
            self.nonces.append(nonce)
            self.pending[pk] = (now, now, nonce)
            self.node._send(pk, Ping(self.node.round_estimate(), nonce))
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        if self.finished:
            return
        if len(self.available) >= self.count or (
            not self.pending and self.next >= len(self.candidates)
        ):
            self.finished = True
            for nonce in self.nonces:
                self.node._ping_routes.pop(nonce, None)
            ordered_available = [pk for pk in self.candidates if pk in set(self.available)]
            self.on_done(ordered_available[: self.count], self.max_round_seen)

    def on_pong(self, src: bytes, pong: Pong, now: float) -> None:
        entry = self.pending.get(src)
        if entry is None or entry[2] != pong.nonce or self.finished:
            return
        del self.pending[src]
        self.max_round_seen = max(self.max_round_seen, pong.round)
        self.available.append(src)
        self._maybe_finish()

    def missed(self, pk: bytes, now: float) -> None:
        """``pk`` cannot answer (our ping could not even be sent): move on without waiting."""
        if pk in self.pending and not self.finished:
            del self.pending[pk]
            self.node.missed_ping(pk, now)
            self._fill(now)

    def handle_timer(self, now: float) -> None:
        settings = self.node.settings
        for pk, (first, last, nonce) in list(self.pending.items()):
            if now >= first + settings.ping_timeout:
                del self.pending[pk]
                self.node.missed_ping(pk, now)
            elif now >= last + settings.ping_interval:
                self.pending[pk] = (first, now, nonce)
                self.node._send(pk, Ping(self.node.round_estimate(), nonce))
        self._fill(now)

    def timer(self) -> float | None:
        settings = self.node.settings
        times = [
            min(first + settings.ping_timeout, last + settings.ping_interval)
            for first, last, _ in self.pending.values()
        ]
        return min(times) if times else None


@dataclass
class _Session:
    """An aggregator's state for one round."""

    round: int
    deadline: float
    models: dict[bytes, Any] = field(default_factory=dict)
    done: bool = False


@dataclass
class _Delivery:
    """A trained model waiting for an aggregator's ack."""

    round: int
    model: Any
    tried: set[bytes]
    deadline: float
    resends: int = 0
    acked: bool = False


@dataclass
class _Distribution:
    """The last aggregate this node sent, watched until the next round shows up."""

    round: int
    model: Any
    sent_to: set[bytes]
    deadline: float
    unacked: tuple[bytes, ...] = ()  # contributors, acked once the aggregate is handed on
    redistributions: int = 0


# --- the node -----------------------------------------------------------------------------


class ModestNode:
    """One peer's MoDeST protocol state machine (both roles)."""

    def __init__(
        self,
        me: bytes,
        peers: Iterable[bytes],
        settings: ModestSettings,
    ) -> None:
        self.me = me
        self.settings = settings
        self.view = View([*peers, me])
        self.train_round = 0
        self.training = False
        self.session: _Session | None = None
        self.delivery: _Delivery | None = None
        self.distribution: _Distribution | None = None
        self.unresponsive: dict[bytes, float] = {}  # peer -> until when it goes last
        self._misses: dict[bytes, int] = {}  # consecutive missed pings per peer
        self._checks: list[_AvailabilityCheck] = []
        self._ping_routes: dict[int, _AvailabilityCheck] = {}
        self._nonce = 0
        self._outbox: list[Send] = []
        self._events: deque[Event] = deque()
        self._membership_index = 0
        self.latest_model: Any = None  # the newest model this node holds (for re-seeding)
        self.observed_round = 0
        self._stall_at: float | None = None

    # -- public inputs ----------------------------------------------------------------------

    def start(self, initial_model: Any, now: float) -> None:
        """Begin round 1: its sample trains the shared initial model."""
        trainers = sample(
            1, self.view.active(1, self.settings.inactivity, self.me), self.settings.sample_size
        )
        if self.me in trainers:
            self._on_aggregated(self.me, AggregatedModel(1, initial_model, {}), now)

    def join(self, now: float) -> None:
        """Advertise that this node (re)joins: sent to the peers it knows."""
        self._membership_index += 1
        for pk in self.view.active(self.round_estimate(), self.settings.inactivity, self.me):
            if pk != self.me:
                self._send(pk, Membership(self.round_estimate(), self._membership_index, JOIN))

    def leave(self) -> None:
        """Advertise a graceful leave."""
        self._membership_index += 1
        for pk in self.view.active(self.round_estimate(), self.settings.inactivity, self.me):
            if pk != self.me:
                self._send(pk, Membership(self.round_estimate(), self._membership_index, LEAVE))

    def observe_round(self, round_: int, now: float) -> None:
        """Swarm-wide progress: round ``round_`` was aggregated somewhere (from the CRDT state).

        If no further round is observed for ``stall_timeout`` seconds and this node is the
        first live candidate of the next round's order, it re-seeds the round with the newest
        model it holds. This keeps the swarm going even when an aggregator and all its
        trainers die at once.
        """
        if round_ < self.observed_round:
            return
        self.observed_round = round_
        if self.latest_model is not None:
            self._stall_at = now + self.settings.stall_timeout

    def receive(self, src: bytes, message: Message, now: float) -> None:
        if src != self.me:
            self.unresponsive.pop(src, None)
            self._misses.pop(src, None)
        if isinstance(message, Ping):
            self.view.seen(src, message.round)
            self._send(src, Pong(self.round_estimate(), message.nonce))
        elif isinstance(message, Pong):
            self.view.seen(src, message.round)
            self._on_round_seen(message.round)
            check = self._ping_routes.get(message.nonce)
            if check is not None:
                check.on_pong(src, message, now)
        elif isinstance(message, Membership):
            self.view.membership(src, message.round, message.index, message.status)
        elif isinstance(message, TrainedModel):
            self._on_trained(src, message, now)
        elif isinstance(message, AggregatedModel):
            self._on_aggregated(src, message, now)
        elif isinstance(message, AggAck) and (
            self.delivery is not None and self.delivery.round == message.round and message.success
        ):
            self.delivery.acked = True

    def training_done(self, round_: int, model: Any, now: float) -> None:
        if round_ != self.train_round or not self.training:
            return  # cancelled meanwhile
        self.training = False
        self.latest_model = model
        self.delivery = _Delivery(round_ + 1, model, set(), now + self.settings.ack_timeout)
        self._send_trained(now)

    def send_failed(self, dst: bytes, message: Message, now: float) -> None:
        """The transport could not deliver ``message`` to ``dst`` (nobody listens there, say):
        a ping to it counts as missed at once instead of after ``ping_timeout``."""
        if isinstance(message, Ping):
            for check in list(self._checks):
                check.missed(dst, now)

    def handle_timer(self, now: float) -> None:
        for check in list(self._checks):
            check.handle_timer(now)
        session = self.session
        if session is not None and not session.done and now >= session.deadline:
            if len(session.models) >= self.settings.liveness_min_models:
                self._finish_session(session, now)
            else:
                session.done = True
        delivery = self.delivery
        if delivery is not None and not delivery.acked and now >= delivery.deadline:
            if delivery.resends < self.settings.max_resends:
                delivery.resends += 1
                delivery.deadline = now + self.settings.ack_timeout
                self._send_trained(now)
            else:
                self.delivery = None
        dist = self.distribution
        if dist is not None and now >= dist.deadline:
            if dist.redistributions < self.settings.max_resends:
                dist.redistributions += 1
                dist.deadline = now + self.settings.round_timeout
                self._distribute(dist, now)
            else:
                self.distribution = None
        if self._stall_at is not None and now >= self._stall_at:
            self._on_stall(now)
        self._checks = [c for c in self._checks if not c.finished]

    def get_timer(self) -> float | None:
        times = [t for c in self._checks if (t := c.timer()) is not None]
        if self.session is not None and not self.session.done:
            times.append(self.session.deadline)
        if self.delivery is not None and not self.delivery.acked:
            times.append(self.delivery.deadline)
        if self.distribution is not None:
            times.append(self.distribution.deadline)
        if self._stall_at is not None:
            times.append(self._stall_at)
        return min(times) if times else None

    def messages_to_send(self) -> list[Send]:
        out, self._outbox = self._outbox, []
        return out

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def round_estimate(self) -> int:
        agg = self.session.round if self.session else 0
        return max(self.train_round, agg, self.view.max_round())

    # -- internals --------------------------------------------------------------------------

    def _send(self, dst: bytes, message: Message) -> None:
        self._outbox.append(Send(dst, message))

    def missed_ping(self, pk: bytes, now: float) -> None:
        """``pk`` did not answer a ping in time: it goes last in candidate orders for a while."""
        misses = self._misses.get(pk, 0) + 1
        self._misses[pk] = misses
        settings = self.settings
        penalty = doubling_delay(settings.unresponsive_for, misses, settings.max_unresponsive_for)
        self.unresponsive[pk] = now + penalty

    def _register_ping(self, check: _AvailabilityCheck) -> int:
        self._nonce += 1
        self._ping_routes[self._nonce] = check
        return self._nonce

    def _candidates(
        self, round_: int, now: float, exclude: AbstractSet[bytes] = frozenset()
    ) -> list[bytes]:
        """The round's order, minus ``exclude``; peers that missed a ping go last while their
        penalty (``unresponsive_for`` at first) lasts. The penalty expires: a peer that was
        merely slow once (e.g. while starting) must not be demoted for good, or nodes that saw
        different pings would disagree about the round's aggregator for ever. It doubles with
        every further miss, so a dead peer stops costing a ping timeout every few rounds."""
        for pk in [pk for pk, until in self.unresponsive.items() if until <= now]:
            del self.unresponsive[pk]
        active = self.view.active(round_, self.settings.inactivity, self.me)
        order = [pk for pk in ordered(round_, active) if pk not in exclude]
        return [pk for pk in order if pk not in self.unresponsive] + [
            pk for pk in order if pk in self.unresponsive
        ]

    def _check(
        self,
        round_: int,
        candidates: list[bytes],
        count: int,
        on_done: Callable[[list[bytes], int], None],
        now: float,
    ) -> None:
        check = _AvailabilityCheck(self, round_, candidates, count, on_done, now)
        if not check.finished:
            self._checks.append(check)

    def _on_round_seen(self, round_: int) -> None:
        if self.distribution is not None and round_ > self.distribution.round:
            self.distribution = None

    def _send_trained(self, now: float) -> None:
        delivery = self.delivery
        assert delivery is not None
        round_ = delivery.round

        def send(aggregators: list[bytes], _: int) -> None:
            if self.delivery is not delivery:
                return
            delivery.tried.update(aggregators)
            self.view.flush()
            for pk in aggregators:
                message = TrainedModel(round_, delivery.model, self.view.snapshot())
                if pk == self.me:
                    self._on_trained(self.me, message, now)
                else:
                    self._send(pk, message)

        self._check(
            round_,
            self._candidates(round_, now, delivery.tried),
            self.settings.aggregators,
            send,
            now,
        )

    def _on_trained(self, src: bytes, message: TrainedModel, now: float) -> None:
        self.view.merge(message.view)
        self.view.seen(src, message.round)
        self._on_round_seen(message.round)
        session = self.session
        if session is None or message.round > session.round:
            session = self.session = _Session(
                message.round, now + self.settings.aggregation_timeout
            )
        elif message.round < session.round or session.done:
            if src != self.me:
                self._send(src, AggAck(message.round, False))
            return
        session.models.setdefault(src, message.model)
        needed = math.ceil(self.settings.sample_size * self.settings.success_fraction)
        if len(session.models) >= needed:
            self._finish_session(session, now)

    def _finish_session(self, session: _Session, now: float) -> None:
        session.done = True
        contributors = tuple(sorted(session.models))
        models = [session.models[pk] for pk in contributors]
        self._events.append(AggregateRequest(session.round, models, contributors))

    def aggregated(self, request: AggregateRequest, model: Any, now: float) -> None:
        """The driver aggregated ``request``'s models into ``model`` (at its own pace, e.g.
        in a worker thread): announce the round and distribute it to the next trainers."""
        self._events.append(RoundAggregated(request.round, model, request.contributors))
        dist = _Distribution(
            request.round, model, set(), now + self.settings.round_timeout, request.contributors
        )
        self.distribution = dist
        self._distribute(dist, now)

    def _on_stall(self, now: float) -> None:
        """No new round for ``stall_timeout``: the first live candidate of the next round's
        order re-seeds it. Found by pinging down the order (a gone peer costs one ping
        timeout, or nothing when the transport reports it gone); the others look again one
        period later, so a re-seeder that died too is replaced."""
        self._stall_at = None
        round_ = self.observed_round + 1

        def decide(first: list[bytes], _: int) -> None:
            if not first or first[0] == self.me:
                self._reseed(now)
            else:
                self._stall_at = now + self.settings.stall_timeout

        self._check(round_, self._candidates(round_, now), 1, decide, now)

    def _reseed(self, now: float) -> None:
        round_ = max(self.observed_round, self.round_estimate()) + 1
        dist = _Distribution(round_, self.latest_model, set(), now + self.settings.round_timeout)
        self.distribution = dist
        self._distribute(dist, now)

    def _acknowledge(self, dist: _Distribution) -> None:
        """Ack contributors once the aggregate is handed on: if this aggregator dies before,
        the unacknowledged trainers resend their models to the next aggregator."""
        for pk in dist.unacked:
            if pk == self.me:
                if self.delivery is not None and self.delivery.round == dist.round:
                    self.delivery.acked = True
            else:
                self._send(pk, AggAck(dist.round, True))
        dist.unacked = ()

    def _distribute(self, dist: _Distribution, now: float) -> None:
        round_ = dist.round

        def send(trainers: list[bytes], max_round_seen: int) -> None:
            self._acknowledge(dist)
            if max_round_seen > round_:
                self._on_round_seen(max_round_seen)
                return
            self.view.flush()
            for pk in trainers:
                dist.sent_to.add(pk)
                message = AggregatedModel(round_, dist.model, self.view.snapshot())
                if pk == self.me:
                    self._on_aggregated(self.me, message, now)
                else:
                    self._send(pk, message)

        self._check(
            round_,
            self._candidates(round_, now, dist.sent_to),
            self.settings.sample_size,
            send,
            now,
        )

    def _on_aggregated(self, src: bytes, message: AggregatedModel, now: float) -> None:
        self.view.merge(message.view)
        self.view.seen(src, message.round)
        self.view.seen(self.me, message.round)
        if message.round > self.train_round:
            if self.training:
                self._events.append(CancelTraining(self.train_round))
            self.train_round = message.round
            self.latest_model = message.model
            self.training = True
            self._events.append(TrainRequest(message.round, message.model))
        # same or older round: a duplicate from another aggregator, ignored


# --- the wire codec ---------------------------------------------------------------------------
# Small messages travel as signed envelope bodies; models as blobs whose offer carries
# ``encode_model_meta``. Decoding any input gives a message or a ``RemoteProtocolError``.

MAX_VIEW = 100_000  # entries in a piggybacked view


def encode_small(message: Message) -> dict[str, Any]:
    """A ping, pong, ack or membership message as a msgpack-able map."""
    if isinstance(message, Ping):
        return {"kind": "ping", "round": message.round, "nonce": message.nonce}
    if isinstance(message, Pong):
        return {"kind": "pong", "round": message.round, "nonce": message.nonce}
    if isinstance(message, AggAck):
        return {"kind": "ack", "round": message.round, "success": message.success}
    if isinstance(message, Membership):
        return {
            "kind": "membership",
            "round": message.round,
            "index": message.index,
            "status": message.status,
        }
    raise LocalProtocolError(f"not a small message: {type(message).__name__}")


def _int(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**63:
        raise RemoteProtocolError(f"MoDeST {what} must be a non-negative integer")
    return value


def decode_small(body: Any) -> Message:
    """The inverse of ``encode_small``."""
    if not isinstance(body, dict) or not all(isinstance(k, str) for k in body):
        raise RemoteProtocolError("a MoDeST message is a map")
    kind = body.get("kind")
    fields = {
        "ping": {"kind", "round", "nonce"},
        "pong": {"kind", "round", "nonce"},
        "ack": {"kind", "round", "success"},
        "membership": {"kind", "round", "index", "status"},
    }.get(kind if isinstance(kind, str) else "")
    if fields is None or body.keys() != fields:
        raise RemoteProtocolError(f"unknown or malformed MoDeST message {str(kind)[:20]!r}")
    round_ = _int(body["round"], "round")
    if kind == "ping":
        return Ping(round_, _int(body["nonce"], "nonce"))
    if kind == "pong":
        return Pong(round_, _int(body["nonce"], "nonce"))
    if kind == "ack":
        if not isinstance(body["success"], bool):
            raise RemoteProtocolError("MoDeST ack success must be a bool")
        return AggAck(round_, body["success"])
    if body["status"] not in (JOIN, LEAVE):
        raise RemoteProtocolError("MoDeST membership status must be join or leave")
    return Membership(round_, _int(body["index"], "index"), body["status"])


def encode_view(view: Mapping[bytes, ViewEntry]) -> list[list[Any]]:
    return [[pk, e.last_active, e.index, e.status] for pk, e in sorted(view.items())]


def decode_view(raw: Any) -> dict[bytes, ViewEntry]:
    if not isinstance(raw, list) or len(raw) > MAX_VIEW:
        raise RemoteProtocolError("a MoDeST view is a list")
    out: dict[bytes, ViewEntry] = {}
    for item in raw:
        if (
            not isinstance(item, list)
            or len(item) != 4
            or not isinstance(item[0], bytes)
            or len(item[0]) != 32
            or item[3] not in (JOIN, LEAVE)
        ):
            raise RemoteProtocolError("malformed MoDeST view entry")
        out[item[0]] = ViewEntry(_int(item[1], "last_active"), _int(item[2], "index"), item[3])
    return out


def encode_model_meta(message: TrainedModel | AggregatedModel) -> dict[str, Any]:
    kind = "trained" if isinstance(message, TrainedModel) else "aggregated"
    return {"type": kind, "round": message.round, "view": encode_view(message.view)}


def decode_model_meta(meta: Any, model: Any) -> TrainedModel | AggregatedModel:
    """The message a model blob's offer ``meta`` describes, carrying ``model``."""
    if not isinstance(meta, dict) or meta.keys() != {"type", "round", "view"}:
        raise RemoteProtocolError("malformed MoDeST model metadata")
    round_ = _int(meta["round"], "round")
    view = decode_view(meta["view"])
    if meta["type"] == "trained":
        return TrainedModel(round_, model, view)
    if meta["type"] == "aggregated":
        return AggregatedModel(round_, model, view)
    raise RemoteProtocolError("MoDeST model type must be trained or aggregated")
