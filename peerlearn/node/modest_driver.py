"""Drives a MoDeST core (``gossip.modest.ModestNode``) with trio's clock, peers and threads.

The core decides everything (who trains and aggregates, timeouts, retries); this driver
feeds it the swarm state's ``member`` and ``round`` records and what peers send, runs the
training and the round's bookkeeping it asks for, and sends what it wants sent.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import trio

from peerlearn.errors import RemoteProtocolError
from peerlearn.gossip import modest
from peerlearn.gossip.crdt import Entry
from peerlearn.learning.aggregate import StateDict
from peerlearn.node.blob import BlobBusy
from peerlearn.node.learning_transport import MODEST_KIND

if TYPE_CHECKING:
    from peerlearn.node.learner import Learner

logger = logging.getLogger(__name__)

# Opening a libp2p stream costs the receiver real CPU time: with 10 trainers pinging one
# aggregator at once an open took up to 1.4 s, and a 2 s ping timeout split rounds between two
# aggregators. 1.25 s gives a 5 s ping timeout.
MESSAGE_TIME = 1.25


class ModestDriver:
    """One node's MoDeST rounds."""

    def __init__(self, learner: Learner) -> None:
        self.learner = learner
        c = learner.config
        settings = modest.settings_for(
            sample_size=min(c.sample_size, max(1, c.min_members)),
            aggregators=c.aggregators,
            round_time=c.round_interval,
            message_time=MESSAGE_TIME,
        )
        self.core = modest.ModestNode(learner.me, learner.members_pk(), settings)
        self.wakeup = trio.Event()
        self.training: trio.CancelScope | None = None
        self.started = False
        learner.swarm.listeners.append(self._on_crdt_change)
        # What the swarm state held before we listened counts too (a restarted node's first
        # sync may land between its restore and this driver's start).
        self._on_crdt_change(list(learner.swarm.state.entries.values()))

    def current_round(self) -> int:
        return self.core.observed_round

    def _on_crdt_change(self, changed: list[Entry]) -> None:
        now = trio.current_time()
        for entry in changed:
            if entry.name == "member":
                self.core.view.merge({entry.owner: modest.ViewEntry(0, 0, modest.JOIN)})
            elif entry.name == "round" and isinstance(entry.value, dict):
                value = entry.value.get("round")
                if isinstance(value, int) and entry.owner != self.core.me:
                    self.core.observe_round(value, now)
        self.wakeup.set()

    def receive_small(self, src: bytes, body: Any) -> None:
        if not self.started:
            return  # not learning yet: nothing to answer
        self.core.receive(src, modest.decode_small(body), trio.current_time())
        self.wakeup.set()

    def receive_model(self, src: bytes, kind: str, meta: Any, model: StateDict) -> None:
        if kind != MODEST_KIND:
            raise RemoteProtocolError("this node runs MoDeST")
        if not self.started:
            raise BlobBusy("not learning yet")
        self.core.receive(src, modest.decode_model_meta(meta, model), trio.current_time())
        self.wakeup.set()

    async def run(self) -> None:
        learner = self.learner
        learner.transport.on_message = self.receive_small
        async with trio.open_nursery() as nursery:
            if learner.resumed:
                self.core.observe_round(learner.round, trio.current_time())
                self.core.latest_model = learner.model
            self.core.start(learner.model, trio.current_time())
            # Tell the peers this node is (back) in: they lift the penalty a restarted node
            # earned while it was down, and a late joiner becomes active in their views.
            self.core.join(trio.current_time())
            self.started = True
            while not learner.done():
                self._flush(nursery)
                timer = self.core.get_timer()
                with trio.move_on_at(timer if timer is not None else trio.current_time() + 1.0):
                    await self.wakeup.wait()
                self.wakeup = trio.Event()
                self.core.handle_timer(trio.current_time())
            nursery.cancel_scope.cancel()
        await learner.transport.close_message_streams()

    async def _send_small(self, dst: bytes, message: modest.Message) -> None:
        if not await self.learner.transport.send_message(dst, modest.encode_small(message)):
            self.core.send_failed(dst, message, trio.current_time())
            self.wakeup.set()

    def _flush(self, nursery: trio.Nursery) -> None:
        learner = self.learner
        for send in self.core.messages_to_send():
            message = send.message
            if isinstance(message, modest.TrainedModel | modest.AggregatedModel):
                meta = modest.encode_model_meta(message)
                push = learner.transport.push_model
                nursery.start_soon(push, send.dst, message.model, MODEST_KIND, meta)
            else:
                nursery.start_soon(self._send_small, send.dst, message)
        while (event := self.core.next_event()) is not None:
            if isinstance(event, modest.TrainRequest):
                if self.training is not None:
                    self.training.cancel()
                nursery.start_soon(learner.finish_round, event.round, event.model)
                nursery.start_soon(self._train, event.round, event.model)
            elif isinstance(event, modest.AggregateRequest):
                nursery.start_soon(self._aggregate, event)
            elif isinstance(event, modest.CancelTraining) and self.training is not None:
                self.training.cancel()
            elif isinstance(event, modest.RoundAggregated):
                logger.info(
                    "aggregated round %d from %d trained models",
                    event.round,
                    len(event.contributors),
                )
                nursery.start_soon(self._finish_aggregated, event)

    async def _aggregate(self, request: modest.AggregateRequest) -> None:
        learner = self.learner
        model = await learner.offload(learner.rule, learner.model, request.models)
        self.core.aggregated(request, model, trio.current_time())
        self.wakeup.set()

    async def _finish_aggregated(self, event: modest.RoundAggregated) -> None:
        """Our aggregate becomes the round's model; once that is on disk and announced, we
        observe the round ourselves (the swarm state does not tell us our own records)."""
        await self.learner.finish_round(event.round, event.model)
        self.core.observe_round(event.round, trio.current_time())
        self.wakeup.set()

    async def _train(self, round_: int, model: StateDict) -> None:
        with trio.CancelScope() as scope:
            self.training = scope
            trained = await self.learner.train(model)
            self.core.training_done(round_, trained, trio.current_time())
            self.wakeup.set()
        if self.training is scope:
            self.training = None
