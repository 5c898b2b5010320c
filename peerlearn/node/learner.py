"""Learning inside the daemon: the simulator's sans-I/O cores driven by real time and real peers.

* ``gossip``/``gossip-vca``/``dpsgd``: every ``round_interval`` the node merges the models it
  received (``protocols.merge_received`` / ``neighbourhood_mean``), trains, evaluates, and
  pushes its model over ``/peerlearn/blob/1`` to random members (gossip) or to its ring
  neighbours (D-PSGD).
* ``modest``: a ``ModestNode`` core; its small messages travel as signed envelopes over
  ``/peerlearn/msg/1``, its models as blobs; swarm-wide round progress comes from the CRDT.

The model, its data and its training come from the node's ``Task`` (``--task``), held by a
``TaskModel``. Progress is announced in the CRDT (``round``, ``model``, ``metrics`` records)
and a checkpoint (model, optimizer, task state, round, metrics) is written atomically after
every round.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import trio

from peerlearn import wire
from peerlearn.errors import NetworkError, RemoteProtocolError
from peerlearn.gossip.crdt import Entry
from peerlearn.identity import peer_id_from_public_key, public_key_from_peer_id
from peerlearn.learning import attacks, modest, protocols, robust
from peerlearn.learning.aggregate import StateDict
from peerlearn.learning.hygiene import check_received
from peerlearn.learning.task import TaskContext, Training, create_task, parse_task_options
from peerlearn.learning.task_model import TaskModel
from peerlearn.node import blob
from peerlearn.node.checkpoints import CheckpointStore
from peerlearn.node.config import NodeConfig, parse_shard
from peerlearn.node.framing import receive_frame, send_frame
from peerlearn.node.host import P2PHost, Stream
from peerlearn.node.swarm import SwarmService
from peerlearn.tensors import state_dict_from_bytes, state_dict_to_bytes

logger = logging.getLogger(__name__)

MSG_PROTOCOL = "/peerlearn/msg/1"
MODEL_KIND = "model"
MODEST_KIND = "modest"
MODEST_MESSAGE = "modest"
CHECKPOINT_FILE = "checkpoint.msgpack"
SHARD_SEED = 1234  # every node must cut the training set into the same shards
MODEL_SIZE_SLACK = 4096  # bytes a peer's encoding of our model's layout may differ by
MESSAGE_TIMEOUT = 10.0  # seconds per small message
PUSH_DRAIN = 10.0  # seconds the last round's pushes may still take after learning ends
_MSG_LIMITS = wire.Limits(max_message_size=4096)


def task_context(config: NodeConfig, seed: int) -> TaskContext:
    """What the node's settings tell its task."""
    index, count = parse_shard(config.data_shard)
    return TaskContext(
        shard=index,
        shards=count,
        partition=config.partition,
        classes_per_node=config.classes_per_node,
        data_seed=SHARD_SEED,
        seed=seed,
        training=Training(config.local_steps, config.batch_size, config.lr),
        device=config.device,
        options=parse_task_options(config.task_options),
        poison_labels=config.attack == "label-flip",
        bristle=config.filter == "bristle",
    )


class Learner:
    """One node's learning loop (any algorithm) and its network plumbing."""

    def __init__(
        self,
        config: NodeConfig,
        host: P2PHost,
        swarm: SwarmService,
        data_dir: Path,
        on_bytes: Callable[[int, int], None],
        sequence: wire.SequenceCounter,
        replay_guard: wire.ReplayGuard,
    ) -> None:
        """``sequence`` and ``replay_guard`` are the node's own: one per identity."""
        self.config = config
        self.host = host
        self.swarm = swarm
        self.on_bytes = on_bytes
        seed = int.from_bytes(hashlib.sha256(host.identity.public_key).digest()[:8], "big")
        self.generator = torch.Generator().manual_seed(seed)  # attacks
        self.rng = random.Random(seed)
        # MoDeST starts every node from the same model; gossip/D-PSGD from independent ones.
        swarm_seed = int.from_bytes(hashlib.sha256(config.swarm.encode()).digest()[:8], "big")
        self.learning = TaskModel(
            create_task(config.task, task_context(config, seed)),
            torch.Generator().manual_seed(swarm_seed if config.algo == "modest" else seed),
            lr=config.lr,
            device=config.device,
            bristle_rng=self.rng if config.filter == "bristle" else None,
        )
        self.model: StateDict = self.learning.state()
        self.rule = robust.create_rule(
            "mean" if config.filter == "bristle" else config.filter, f=config.byzantine_bound
        )
        self.round = 0  # the last round whose checkpoint is on disk
        self.accuracy: float | None = None  # the task's metric
        self.metrics: dict[str, float] = {}
        self._finish_lock = trio.Lock()
        self.phase = "waiting for members"
        self.inbox: dict[bytes, StateDict] = {}
        self.models_sent = 0
        self.models_received = 0
        self.pushing: set[bytes] = set()  # peers a model is on its way to
        self.pushes_skipped = 0
        self.sequence = sequence
        self.replay_guard = replay_guard

        self.modest: _ModestDriver | None = None
        self._model_bytes = len(state_dict_to_bytes(self.model))
        self.checkpoints = CheckpointStore(data_dir / CHECKPOINT_FILE)
        self.resumed = self._load_checkpoint()
        host.set_handler(MSG_PROTOCOL, self._serve_message)

    # -- status -----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {
            "algo": self.config.algo,
            "filter": self.config.filter,
            "phase": self.phase,
            "round": self.current_round(),
            "task": self.config.task,
            "metric": self.learning.task.metric,
            "accuracy": self.accuracy,
            "metrics": self.metrics,
            "members": self.swarm.member_count(),
            "join_seconds": self.swarm.join_seconds,
            "models_sent": self.models_sent,
            "models_received": self.models_received,
            "pushes_skipped": self.pushes_skipped,
            "train_samples": getattr(self.learning.task, "train_samples", None),
            "resumed_from_round": self.resumed,
            "attack": self.config.attack,
            "gossip_undelivered": self.host.publish_failures,
        }

    # -- checkpoints ------------------------------------------------------------------------

    def _load_checkpoint(self) -> int | None:
        """Resume from the newest usable checkpoint (see ``CheckpointStore``); None when
        there is none. Raises ``CheckpointError`` when one exists but none can be used."""
        if self.config.fresh:
            for moved in self.checkpoints.discard():
                logger.warning("starting fresh: set %s aside", moved)
        loaded = self.checkpoints.load(self.learning.restore)
        if loaded is None:
            return None
        restored = loaded.value
        self.model, self.round, self.metrics = restored.state, restored.round, restored.metrics
        self.accuracy = restored.metrics.get(self.learning.task.metric)
        logger.info("resumed from %s at round %d", loaded.path.name, self.round)
        return self.round

    def _save_checkpoint(self, round_: int, model: StateDict, metrics: dict[str, float]) -> None:
        """Runs in a worker thread. The swarm state is saved by the swarm service, on its
        own schedule: writing 10,000 members' records every round held the event loop."""
        self.checkpoints.save(self.learning.checkpoint(round_, model, metrics))

    # -- shared steps -----------------------------------------------------------------------

    async def _train(self, model: StateDict) -> StateDict:
        trained, _ = await trio.to_thread.run_sync(self.learning.train, model)
        return trained

    async def _finish_round(self, round_: int, model: StateDict) -> None:
        """Adopt ``model`` as round ``round_``'s: evaluate, checkpoint, then announce.

        The round becomes visible (status, CRDT) only once its checkpoint is on disk, so a
        node killed right after reporting round r restarts from round r.
        """
        async with self._finish_lock:
            if round_ <= self.round and self.config.algo == "modest":
                return  # MoDeST: an aggregate we already know (as trainer and aggregator)
            metrics = await trio.to_thread.run_sync(self.learning.evaluate, model)
            await trio.to_thread.run_sync(self._save_checkpoint, round_, model, metrics)
            score = self.learning.score(metrics)
            self.round, self.model, self.metrics, self.accuracy = round_, model, metrics, score
            model_bytes = await trio.to_thread.run_sync(state_dict_to_bytes, model)
            digest = hashlib.sha256(model_bytes).hexdigest()
            self.swarm.write("round", {"round": round_})
            self.swarm.write("model", {"version": round_, "sha256": digest})
            self.swarm.write("metrics", {"accuracy": round(score, 4), "round": round_})
        logger.info("round %d: %s %.3f", round_, self.learning.task.metric, score)

    def _members_pk(self) -> list[bytes]:
        return sorted(self.swarm.state.records("member"))

    async def push_model(
        self, peer_pk: bytes, model: StateDict, kind: str, meta: dict[str, Any]
    ) -> bool:
        """Send a model to one peer over the blob protocol; False (logged) if not delivered."""
        peer_id = peer_id_from_public_key(peer_pk)
        payload = await trio.to_thread.run_sync(state_dict_to_bytes, model)
        error = await blob.deliver(
            self.host,
            self.sequence,
            peer_id,
            payload,
            kind=kind,
            meta=meta,
            timeout=self.config.blob_timeout,
            chunk_size=self.config.blob_chunk_size,
            relay_blobs=self.config.relay_blobs,
        )
        if error is not None:
            logger.info("model to %s not delivered: %s", peer_id, error)
            return False
        self.models_sent += 1
        self.on_bytes(len(payload), 0)
        return True

    @property
    def max_model_bytes(self) -> int:
        """The size of our model on the wire: a peer's model of the same layout has it too."""
        return self._model_bytes + MODEL_SIZE_SLACK

    async def accept_blob(self, received: blob.ReceivedBlob) -> None:
        """Called by the daemon for blobs of kind ``model`` or ``modest``: the model must
        pass ``hygiene.check_received`` against ours before it can reach any merge."""
        model = state_dict_from_bytes(received.data, self.max_model_bytes)
        check_received(model, self.model, max_update_ratio=self.config.max_update_ratio)
        pk = public_key_from_peer_id(received.sender_id)  # checked against the signed offer
        if received.offer.kind == MODEL_KIND:
            self.inbox[pk] = model
        elif self.config.algo != "modest":
            raise RemoteProtocolError("this node does not run MoDeST")
        elif self.modest is None:
            raise blob.BlobBusy("not learning yet")
        else:
            self.modest.receive_model(pk, received.offer.meta, model)
        self.models_received += 1
        self.on_bytes(0, received.offer.size)

    # -- main loop --------------------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        enough = trio.Event()

        def check_members(changed: list[Entry]) -> None:
            if self.swarm.member_count() >= self.config.min_members:
                enough.set()

        self.swarm.listeners.append(check_members)
        check_members([])
        await enough.wait()
        self.swarm.listeners.remove(check_members)
        self.phase = "learning"
        if self.config.algo == "modest":
            self.modest = _ModestDriver(self)
            await self.modest.run()
        else:
            await self._rounds()
        self.phase = "finished"

    def current_round(self) -> int:
        """Our last round, or the swarm's latest one MoDeST told us about."""
        observed = self.modest.core.observed_round if self.modest is not None else 0
        return max(self.round, observed)

    def _done(self) -> bool:
        return bool(self.config.max_rounds) and self.current_round() >= self.config.max_rounds

    async def _rounds(self) -> None:
        """Gossip / D-PSGD rounds. Pushes run beside the rounds, at most one per peer at a
        time: a peer that stopped answering (crashed, partitioned) is skipped while its push
        is stuck, instead of holding every round up until ``blob_timeout``."""
        async with trio.open_nursery() as pushes:
            await self._round_loop(pushes)
            pushes.cancel_scope.deadline = trio.current_time() + PUSH_DRAIN

    async def _push_once(self, pk: bytes, model: StateDict, round_: int) -> None:
        try:
            await self.push_model(pk, model, MODEL_KIND, {"round": round_})
        finally:
            self.pushing.discard(pk)

    async def _round_loop(self, pushes: trio.Nursery) -> None:
        c = self.config
        me = self.host.identity.public_key
        while not self._done():
            started = trio.current_time()
            received, self.inbox = list(self.inbox.values()), {}
            if self.learning.merger is not None:
                merged = await trio.to_thread.run_sync(self.learning.merger, self.model, received)
            elif c.algo == "dpsgd":
                merged = protocols.neighbourhood_mean(self.model, received, rule=self.rule)
            else:
                merged = protocols.merge_received(
                    self.model,
                    received,
                    rule=self.rule,
                    beta=c.beta,
                    variance_correction=c.algo == "gossip-vca",
                )
            trained = await self._train(merged)
            shared = self._poison(trained, received)
            members = self._members_pk()
            if c.algo == "dpsgd":
                targets = protocols.ring_neighbours(me, members, c.fanout)
            else:
                targets = protocols.gossip_targets(me, members, c.fanout, self.rng)
            round_ = self.round + 1
            for pk in targets:
                if pk in self.pushing:
                    self.pushes_skipped += 1
                    continue
                self.pushing.add(pk)
                pushes.start_soon(self._push_once, pk, shared, round_)
            await self._finish_round(round_, trained)
            await trio.sleep_until(started + c.round_interval)

    def _poison(self, trained: StateDict, received: list[StateDict]) -> StateDict:
        """Experiments: what a ``--attack`` node sends instead of its honest model."""
        members = max(len(self._members_pk()), 2)
        attack = attacks.model_attack(
            self.config.attack, nodes=members, byzantine=self.config.byzantine_bound
        )
        if attack is None:
            return trained
        return attack(trained, [*received, trained], self.generator)

    # -- small messages ---------------------------------------------------------------------

    async def send_message(self, peer_pk: bytes, body: dict[str, Any]) -> bool:
        peer_id = peer_id_from_public_key(peer_pk)
        envelope = wire.seal(
            self.host.identity,
            MODEST_MESSAGE,
            body,
            seq=self.sequence.next(time.time()),
            timestamp=time.time(),
        )
        try:
            with trio.fail_after(MESSAGE_TIMEOUT):
                stream = await self.host.open_stream(peer_id, MSG_PROTOCOL)
                try:
                    await send_frame(stream, envelope)
                finally:
                    await stream.close()
        except (NetworkError, trio.TooSlowError) as exc:
            logger.debug("message to %s not delivered: %s", peer_id, exc)
            return False
        return True

    async def _serve_message(self, stream: Stream) -> None:
        """One small signed message; what is wrong with it is raised for the host to count."""
        try:
            data = await receive_frame(stream, _MSG_LIMITS.max_message_size, self.swarm.pace)
            envelope = wire.open_envelope(
                data, _MSG_LIMITS, expected_sender=stream.remote_public_key
            )
            self.replay_guard.check(envelope, time.time())
            if envelope.type != MODEST_MESSAGE:
                raise RemoteProtocolError(f"unexpected {envelope.type[:40]!r} message")
            if self.modest is None:  # not learning yet (or not MoDeST): nothing to answer
                logger.debug("MoDeST message from %s before we started", stream.remote_peer_id)
                return
            self.modest.receive_small(envelope.sender, envelope.body)
        finally:
            await stream.close()


class _ModestDriver:
    """Drives a ``ModestNode`` core with real time, streams and threads."""

    def __init__(self, learner: Learner) -> None:
        self.learner = learner
        c = learner.config
        interval = c.round_interval
        settings = modest.ModestSettings(
            sample_size=min(c.sample_size, max(1, c.min_members)),
            aggregators=c.aggregators,
            # The paper's defaults. Opening a libp2p stream costs the receiver real CPU time:
            # with 10 trainers pinging one aggregator at once an open took up to 1.4 s, and a
            # 2 s timeout split rounds between two aggregators.
            ping_interval=1.0,
            ping_timeout=5.0,
            aggregation_timeout=10 * interval,
            ack_timeout=20 * interval,
            round_timeout=30 * interval,
            stall_timeout=40 * interval,
        )
        self.core = modest.ModestNode(
            learner.host.identity.public_key,
            learner._members_pk(),
            settings,
            lambda models: learner.rule(learner.model, models),
        )
        self.wakeup = trio.Event()
        self.training: trio.CancelScope | None = None
        self.nursery: trio.Nursery | None = None
        learner.swarm.listeners.append(self._on_crdt_change)
        # What the swarm state held before we listened counts too (a restarted node's first
        # sync may land between its restore and this driver's start).
        self._on_crdt_change(list(learner.swarm.state.entries.values()))

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
        self.core.receive(src, modest.decode_small(body), trio.current_time())
        self.wakeup.set()

    def receive_model(self, src: bytes, meta: dict[str, Any], model: StateDict) -> None:
        self.core.receive(src, modest.decode_model_meta(meta, model), trio.current_time())
        self.wakeup.set()

    async def run(self) -> None:
        learner = self.learner
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            initial = learner.model
            if learner.resumed:
                self.core.observe_round(learner.round, trio.current_time())
                self.core.latest_model = learner.model
            self.core.start(initial, trio.current_time())
            while not learner._done():
                self._flush(nursery)
                timer = self.core.get_timer()
                with trio.move_on_at(timer if timer is not None else trio.current_time() + 1.0):
                    await self.wakeup.wait()
                self.wakeup = trio.Event()
                self.core.handle_timer(trio.current_time())
            nursery.cancel_scope.cancel()

    async def _send_small(self, dst: bytes, message: modest.Message) -> None:
        if not await self.learner.send_message(dst, modest.encode_small(message)):
            self.core.send_failed(dst, message, trio.current_time())
            self.wakeup.set()

    def _flush(self, nursery: trio.Nursery) -> None:
        learner = self.learner
        for send in self.core.messages_to_send():
            message = send.message
            if isinstance(message, modest.TrainedModel | modest.AggregatedModel):
                meta = modest.encode_model_meta(message)
                nursery.start_soon(learner.push_model, send.dst, message.model, MODEST_KIND, meta)
            else:
                nursery.start_soon(self._send_small, send.dst, message)
        while (event := self.core.next_event()) is not None:
            if isinstance(event, modest.TrainRequest):
                if self.training is not None:
                    self.training.cancel()
                nursery.start_soon(learner._finish_round, event.round, event.model)
                nursery.start_soon(self._train, event.round, event.model)
            elif isinstance(event, modest.CancelTraining) and self.training is not None:
                self.training.cancel()
            elif isinstance(event, modest.RoundAggregated):
                logger.info(
                    "aggregated round %d from %d trained models",
                    event.round,
                    len(event.contributors),
                )
                nursery.start_soon(learner._finish_round, event.round, event.model)

    async def _train(self, round_: int, model: StateDict) -> None:
        with trio.CancelScope() as scope:
            self.training = scope
            trained = await self.learner._train(model)
            self.core.training_done(round_, trained, trio.current_time())
            self.wakeup.set()
        if self.training is scope:
            self.training = None
