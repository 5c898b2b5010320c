"""Gossip learning and D-PSGD rounds as a sans-I/O protocol core.

Every round a node (1) trains its model, (2) sends the trained model to its round's targets,
(3) collects what peers send until ``round_interval`` after the round began, (4) merges what
it collected into its trained model: that is the round's model, evaluated and announced.
The next round starts from it. The core decides *when* each phase begins and ends (``now``
is passed in), *which* received models a merge takes (the latest from each peer), *whom* it
sends to and *when* it is done; the driver does the I/O and the torch work (training and
merging, which are not the core's business: models are opaque).

* ``gossip`` / ``gossip-vca``: ``fanout`` peers drawn at random from the members every round.
* ``dpsgd``: a fixed ~``fanout``-regular graph every member computes alike from the member
  list (``ring_neighbours``), so the simulator and the daemon wire the same swarm the same way.

Inputs: ``set_members``, ``start(now)``, ``receive(src, Received, now)``,
``trained(round, model, now)``, ``merged(round, now)``, ``handle_timer(now)``. Outputs:
``next_event()`` -> ``TrainRound`` / ``MergeRound``, ``messages_to_send()`` -> ``[Send]``,
``get_timer()``. The model's wire metadata
(``{"round": r}``) is encoded and decoded here.
"""

from __future__ import annotations

import enum
import hashlib
import random
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from peerlearn.errors import LocalProtocolError, RemoteProtocolError

GOSSIP_ALGORITHMS = ("gossip", "gossip-vca", "dpsgd")
MAX_ROUND = 2**53  # a round number a peer may announce


class Phase(enum.Enum):
    """Where a node's round loop stands."""

    IDLE = "idle"  # waiting for the next round's start
    TRAINING = "training"  # the driver trains the round's model
    COLLECTING = "collecting"  # trained model sent; collecting peers' until the round ends
    MERGING = "merging"  # the driver merges what was collected
    FINISHED = "finished"  # max_rounds reached


@dataclass(frozen=True)
class RoundSettings:
    algo: str = "gossip-vca"  # gossip, gossip-vca or dpsgd
    fanout: int = 4  # peers per round (gossip), graph degree (dpsgd)
    round_interval: float = 2.0  # seconds from one round's start to the next
    max_rounds: int = 0  # 0: never finish

    def __post_init__(self) -> None:
        if self.algo not in GOSSIP_ALGORITHMS:
            raise LocalProtocolError(f"the rounds core runs {GOSSIP_ALGORITHMS}, not {self.algo}")


@dataclass(frozen=True)
class TrainRound:
    """Train the node's model for ``round``, then call ``trained``."""

    round: int


@dataclass(frozen=True)
class MergeRound:
    """Merge ``received`` into the trained model (the round's model), then call ``merged``."""

    round: int
    received: list[Any]
    senders: list[bytes]


Event = TrainRound | MergeRound


@dataclass(frozen=True)
class Send:
    dst: bytes
    round: int
    model: Any


@dataclass(frozen=True)
class Received:
    round: int
    model: Any


def gossip_targets(
    me: bytes, members: Sequence[bytes], fanout: int, rng: random.Random
) -> list[bytes]:
    """``fanout`` random peers other than ``me``."""
    others = sorted(m for m in members if m != me)
    return rng.sample(others, min(fanout, len(others)))


def ring_neighbours(me: bytes, members: Iterable[bytes], degree: int) -> list[bytes]:
    """A deterministic ~``degree``-regular graph every member computes alike.

    Members are placed on ``degree // 2`` rings, each ordered by a different hash; a node's
    neighbours are its predecessor and successor on each ring.
    """
    everyone = sorted(set(members) | {me})
    if len(everyone) < 2:
        return []
    out: set[bytes] = set()
    for ring in range(max(1, degree // 2)):
        order = sorted(everyone, key=lambda pk: hashlib.sha256(pk + bytes([ring])).digest())
        i = order.index(me)
        out.update({order[i - 1], order[(i + 1) % len(order)]})
    out.discard(me)
    return sorted(out)


class RoundsNode:
    """One node's gossip / D-PSGD round loop."""

    def __init__(
        self,
        me: bytes,
        settings: RoundSettings,
        rng: random.Random,
        *,
        completed_rounds: int = 0,
    ) -> None:
        """``completed_rounds``: the round a restarted node resumes after."""
        self.me = me
        self.settings = settings
        self.rng = rng
        self.round = completed_rounds
        self.members: list[bytes] = [me]
        self.phase = Phase.IDLE if not self._done() else Phase.FINISHED
        self._inbox: dict[bytes, Received] = {}
        self._timer_at: float | None = None
        self._round_started = 0.0
        self._events: deque[Event] = deque()
        self._sends: list[Send] = []

    # -- inputs -------------------------------------------------------------------------

    def set_members(self, members: Iterable[bytes]) -> None:
        self.members = sorted(set(members) | {self.me})

    def start(self, now: float) -> None:
        """Begin: the first round starts at once."""
        if self.phase is Phase.IDLE and self._timer_at is None:
            self._timer_at = now

    def receive(self, src: bytes, received: Received, now: float) -> None:
        """A peer's model (the latest from each peer since our last round is kept)."""
        del now
        if src != self.me and self.phase is not Phase.FINISHED:
            self._inbox[src] = received

    def handle_timer(self, now: float) -> None:
        due = self._timer_at
        if due is None or now < due:
            return
        if self.phase is Phase.IDLE:
            self.round += 1
            self.phase = Phase.TRAINING
            self._round_started = now
            self._timer_at = None
            self._events.append(TrainRound(self.round))
        elif self.phase is Phase.COLLECTING:
            self.phase = Phase.MERGING
            self._timer_at = None
            senders = sorted(self._inbox)
            received = [self._inbox[s].model for s in senders]
            self._inbox = {}
            self._events.append(MergeRound(self.round, received, senders))

    def trained(self, round_: int, model: Any, now: float) -> None:
        """The driver trained ``round_``'s model: send ``model`` to the round's targets and
        collect peers' models until the round's time is up."""
        if self.phase is not Phase.TRAINING or round_ != self.round:
            raise LocalProtocolError(f"round {round_} was not being trained")
        for dst in self.targets():
            self._sends.append(Send(dst, round_, model))
        self.phase = Phase.COLLECTING
        self._timer_at = max(now, self._round_started + self.settings.round_interval)

    def merged(self, round_: int, now: float) -> None:
        """The driver merged ``round_``: the next round begins (or the node is done)."""
        if self.phase is not Phase.MERGING or round_ != self.round:
            raise LocalProtocolError(f"round {round_} was not being merged")
        if self._done():
            self.phase = Phase.FINISHED
            return
        self.phase = Phase.IDLE
        self._timer_at = now

    # -- outputs ------------------------------------------------------------------------

    @property
    def completed(self) -> int:
        """Rounds merged so far (the round in progress not counted)."""
        return self.round if self.phase in (Phase.IDLE, Phase.FINISHED) else self.round - 1

    def targets(self) -> list[bytes]:
        """This round's receivers: random members (gossip) or graph neighbours (D-PSGD)."""
        if self.settings.algo == "dpsgd":
            return ring_neighbours(self.me, self.members, self.settings.fanout)
        return gossip_targets(self.me, self.members, self.settings.fanout, self.rng)

    def get_timer(self) -> float | None:
        """When ``handle_timer`` has something to do (None: waiting for the driver)."""
        return self._timer_at

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def messages_to_send(self) -> list[Send]:
        sends, self._sends = self._sends, []
        return sends

    def _done(self) -> bool:
        return bool(self.settings.max_rounds) and self.round >= self.settings.max_rounds


def encode_meta(send: Send) -> dict[str, Any]:
    """The metadata travelling with a round's model (inside the signed blob offer)."""
    return {"round": send.round}


def decode_meta(meta: Any, model: Any) -> Received:
    """``encode_meta``'s output and the model that came with it; RemoteProtocolError."""
    if not isinstance(meta, dict) or set(meta) != {"round"}:
        raise RemoteProtocolError("gossip model metadata must be {round}")
    round_ = meta["round"]
    if not isinstance(round_, int) or isinstance(round_, bool) or not 0 < round_ <= MAX_ROUND:
        raise RemoteProtocolError(f"gossip model round {round_!r:.20} is invalid")
    return Received(round_, model)
