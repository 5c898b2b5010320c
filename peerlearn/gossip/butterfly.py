"""Butterfly all-reduce of one round as a sans-I/O protocol core: who sends which part of the
model to whom, what a peer may send us, and which parts fall back to our own values.

A group of n peers (sorted peer IDs, the same list at every member) averages a model cut
into n parts. Peer i reduces part i: in the REDUCE phase every member sends part i of its
model to peer i, which averages what arrived with its own; in the GATHER phase peer i sends
the averaged part i to every member. Each peer sends 2(n-1)/n of a model per round (all-to-all
sharing sends n-1 models) and ends with the group's average.

Timeouts belong to the driver: when it stops waiting, the reduce averages the parts that
arrived, and a part whose average never came back keeps the peer's own values
(``fallback_parts``), as hivemind does. Models are opaque here; the driver does the torch
work and the I/O. The wire metadata (``{"round", "butterfly", "part", "of"}``) is encoded and
decoded here.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from peerlearn.errors import LocalProtocolError, RemoteProtocolError

MAX_GROUP = 256  # members of one all-reduce group


class Phase(enum.Enum):
    """Where a peer's all-reduce stands."""

    REDUCE = "reduce"  # sending our parts to their reducers, averaging our own part
    GATHER = "gather"  # sending our averaged part to everyone, collecting theirs
    DONE = "done"


@dataclass(frozen=True)
class PartMessage:
    """What a part's wire metadata says: its round, phase, index and the group size."""

    round: int
    phase: Phase
    part: int
    of: int

    def meta(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "butterfly": self.phase.value,
            "part": self.part,
            "of": self.of,
        }

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> PartMessage | None:
        """The part a blob's metadata announces, None for a whole model; malformed
        metadata is a ``RemoteProtocolError``."""
        if "butterfly" not in meta:
            return None
        round_, phase, part, of = (meta.get(k) for k in ("round", "butterfly", "part", "of"))
        if (
            not isinstance(round_, int)
            or not isinstance(part, int)
            or not isinstance(of, int)
            or phase not in ("reduce", "gather")
        ):
            raise RemoteProtocolError(f"malformed all-reduce part metadata {dict(meta)!r}")
        if not (round_ >= 0 and 2 <= of <= MAX_GROUP and 0 <= part < of):
            raise RemoteProtocolError(f"all-reduce part {part} of {of} in round {round_}")
        return cls(round_, Phase(phase), part, of)


def part_bounds(elements: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous [start, end) ranges covering ``elements``, sizes within one."""
    return [(i * elements // parts, (i + 1) * elements // parts) for i in range(parts)]


class Butterfly:
    """One peer's all-reduce of one round.

    Inputs: ``receive(sender, message)`` for every part that arrives, ``gather()`` once the
    reduce is over (all arrived or the driver stopped waiting), ``finish()``. Outputs:
    ``reduce_sends()`` / ``gather_sends()`` (peer, part index), ``reduce_done``,
    ``gather_done``, ``reduced_from``, ``fallback_parts()``."""

    def __init__(self, group: Iterable[str], me: str, round_: int) -> None:
        self.group = sorted(set(group) | {me})
        if not 2 <= len(self.group) <= MAX_GROUP:
            raise LocalProtocolError(f"an all-reduce group needs 2 to {MAX_GROUP} peers")
        self.me, self.round = me, round_
        self.index = self.group.index(me)
        self.phase = Phase.REDUCE
        self.reduced_from: list[str] = []  # senders of our part, in arrival order
        self.gathered: dict[int, str] = {}  # part index -> its reducer, once its average came
        self.late = 0  # reduce parts that came after our reduce was over

    @property
    def size(self) -> int:
        return len(self.group)

    def message(self, phase: Phase, part: int) -> PartMessage:
        return PartMessage(self.round, phase, part, self.size)

    def reduce_sends(self) -> list[tuple[str, int]]:
        """(peer, part): each other member gets its own part of our model."""
        return [(peer, i) for i, peer in enumerate(self.group) if peer != self.me]

    def gather_sends(self) -> list[tuple[str, int]]:
        """(peer, part): every other member gets our averaged part."""
        return [(peer, self.index) for peer in self.group if peer != self.me]

    def receive(self, sender: str, message: PartMessage) -> bool:
        """Record a part; True if the driver should use it, False if it came too late.
        A part that does not fit this round's plan is a ``RemoteProtocolError``."""
        if message.round != self.round or message.of != self.size:
            raise RemoteProtocolError(
                f"part for round {message.round} of {message.of}, expected round {self.round} "
                f"of {self.size}"
            )
        if sender not in self.group or sender == self.me:
            raise RemoteProtocolError(f"{sender} is not in this all-reduce group")
        if message.phase is Phase.REDUCE:
            if message.part != self.index:
                raise RemoteProtocolError(f"sent us part {message.part}; we reduce {self.index}")
            if sender in self.reduced_from:
                raise RemoteProtocolError("sent its part to reduce twice")
            if self.phase is not Phase.REDUCE:
                self.late += 1
                return False
            self.reduced_from.append(sender)
            return True
        if message.part != self.group.index(sender):
            raise RemoteProtocolError(f"sent part {message.part}, but it reduces another")
        if message.part in self.gathered:
            raise RemoteProtocolError("sent its averaged part twice")
        if self.phase is Phase.DONE:
            return False
        self.gathered[message.part] = sender
        return True

    @property
    def reduce_done(self) -> bool:
        return len(self.reduced_from) == self.size - 1

    @property
    def gather_done(self) -> bool:
        return len(self.gathered) == self.size - 1

    def gather(self) -> None:
        """The reduce is over: parts to reduce that come now are late."""
        if self.phase is not Phase.REDUCE:
            raise LocalProtocolError(f"gather() in phase {self.phase.value}")
        self.phase = Phase.GATHER

    def finish(self) -> list[int]:
        """The all-reduce is over; returns ``fallback_parts()``."""
        if self.phase is not Phase.GATHER:
            raise LocalProtocolError(f"finish() in phase {self.phase.value}")
        self.phase = Phase.DONE
        return self.fallback_parts()

    def fallback_parts(self) -> list[int]:
        """Parts whose average never came: they keep our own values."""
        return [i for i in range(self.size) if i != self.index and i not in self.gathered]
