"""Drives a gossip / D-PSGD core (``gossip.rounds.RoundsNode``) with trio's clock and peers.

The core decides when a round's phases begin and end, which received models a merge takes
and whom the trained model goes to; this driver has the learner train and merge (off the
event loop) and pushes the models. The core draws targets among the members the learner can
reach, less those whose last push failed (tried again after ``PUSH_RETRY_FIRST`` seconds,
doubling). Pushes run beside the rounds, at most one per peer at a time: a peer that
stopped answering (crashed, partitioned) is skipped while its push is stuck, instead of
holding every round up until ``blob_timeout``.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

import trio

from peerlearn.backoff import Backoff
from peerlearn.errors import RemoteProtocolError
from peerlearn.gossip import rounds
from peerlearn.learning.aggregate import StateDict
from peerlearn.node.learning_transport import MODEL_KIND

if TYPE_CHECKING:
    from peerlearn.node.learner import Learner

PUSH_DRAIN = 10.0  # seconds the last round's pushes may still take after learning ends
PUSH_RETRY_FIRST = 2.0  # seconds a peer whose push failed gets no models; doubles per failure
PUSH_RETRY_MAX = 120.0  # seconds
ATTACKER_VIEW_ROUNDS = 5  # an experiment's attacker estimates the honest models from each
# peer's latest model of this many past rounds (the literature's attacker knows them all)


class PeersModels:
    """Experiments: an attacker's estimate of the round's honest models, each peer's latest
    model from the last ``ATTACKER_VIEW_ROUNDS`` rounds (at most one model per member)."""

    def __init__(self) -> None:
        self._latest: dict[bytes, tuple[int, StateDict]] = {}

    def merged(self, event: rounds.MergeRound) -> None:
        for src, model in zip(event.senders, event.received, strict=True):
            self._latest[src] = (event.round, model)

    def recent(self, round_: int) -> list[StateDict]:
        oldest = round_ - ATTACKER_VIEW_ROUNDS
        self._latest = {s: (r, m) for s, (r, m) in self._latest.items() if r >= oldest}
        return [m for _, m in self._latest.values()]


class RoundsDriver:
    """One node's gossip / D-PSGD rounds."""

    def __init__(self, learner: Learner, rng: random.Random) -> None:
        self.learner = learner
        c = learner.config
        settings = rounds.RoundSettings(c.algo, c.fanout, c.round_interval, c.max_rounds)
        self.core = rounds.RoundsNode(learner.me, settings, rng, completed_rounds=learner.round)
        self.pushing: set[bytes] = set()  # peers a model is on its way to
        self.pushes_skipped = 0
        self.failing = Backoff(PUSH_RETRY_FIRST, PUSH_RETRY_MAX)  # by peer key, hex

    def current_round(self) -> int:
        return self.core.completed

    def receive_model(self, src: bytes, kind: str, meta: Any, model: StateDict) -> None:
        if kind != MODEL_KIND:
            raise RemoteProtocolError(f"this node runs {self.learner.config.algo}, not MoDeST")
        self.core.receive(src, rounds.decode_meta(meta, model), trio.current_time())

    async def run(self) -> None:
        learner = self.learner
        core = self.core
        core.start(trio.current_time())
        trained: StateDict = learner.model
        seen = PeersModels()  # kept by an experiment's attacker only
        async with trio.open_nursery() as pushes:
            while core.phase is not rounds.Phase.FINISHED:
                timer = core.get_timer()
                if timer is not None:
                    await trio.sleep_until(timer)
                now = trio.current_time()
                core.set_members(m for m in learner.members_pk() if self.failing.due(m.hex(), now))
                core.handle_timer(trio.current_time())
                event = core.next_event()
                if isinstance(event, rounds.TrainRound):
                    trained = await learner.train(learner.model)
                    shared = learner.poison(trained, seen.recent(event.round))
                    core.trained(event.round, shared, trio.current_time())
                    self._push_all(pushes)
                elif isinstance(event, rounds.MergeRound):
                    merged = await learner.merge(trained, event.received)
                    if learner.poisons_models:
                        seen.merged(event)
                    await learner.finish_round(event.round, merged)
                    core.merged(event.round, trio.current_time())
            pushes.cancel_scope.deadline = trio.current_time() + PUSH_DRAIN

    def _push_all(self, pushes: trio.Nursery) -> None:
        for send in self.core.messages_to_send():
            if send.dst in self.pushing:
                self.pushes_skipped += 1
                continue
            self.pushing.add(send.dst)
            pushes.start_soon(self._push, send)

    async def _push(self, send: rounds.Send) -> None:
        try:
            meta = rounds.encode_meta(send)
            pushed = await self.learner.transport.push_model(send.dst, send.model, MODEL_KIND, meta)
        finally:
            self.pushing.discard(send.dst)
        if pushed:
            self.failing.reset(send.dst.hex())
        else:
            self.failing.failed(send.dst.hex(), trio.current_time())
