"""Learning inside the daemon: a Task, a protocol core's driver, a transport, checkpoints.

* the task (``--task``) builds the model and trains and evaluates it, through a ``TaskModel``;
* a driver runs the algorithm's sans-I/O core: ``RoundsDriver`` (gossip, gossip-vca, dpsgd)
  or ``ModestDriver`` (modest), the same cores the simulator drives;
* ``LearningTransport`` moves models (blobs) and MoDeST's small messages;
* ``CheckpointStore`` keeps the model, optimizer and task state of the last round.

A round becomes visible (status, the swarm state's ``round``, ``model`` and ``metrics``
records) only once its checkpoint is on disk, so a node killed right after reporting round r
restarts from round r.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
import trio

from peerlearn import wire
from peerlearn.errors import Offence, RemoteProtocolError
from peerlearn.gossip.crdt import Entry
from peerlearn.identity import peer_id_from_public_key, public_key_from_peer_id
from peerlearn.learning import attacks, robust
from peerlearn.learning.aggregate import StateDict
from peerlearn.learning.compression import decode_from_peer
from peerlearn.learning.contribution import ContributionScores
from peerlearn.learning.hygiene import Admitted, UpdateBound, admit_received
from peerlearn.learning.task import (
    TaskContext,
    TaskFactory,
    Training,
    create_task,
    parse_task_options,
)
from peerlearn.learning.task_model import TaskModel
from peerlearn.node import blob
from peerlearn.node.bulk_path import BulkPath
from peerlearn.node.checkpoints import CheckpointStore
from peerlearn.node.config import MODEL_ATTACKS, NodeConfig, parse_shard
from peerlearn.node.host_api import Host
from peerlearn.node.learning_transport import COMPRESSION_KEY, LearningTransport
from peerlearn.node.modest_driver import ModestDriver
from peerlearn.node.offload import Offload, in_thread
from peerlearn.node.rounds_driver import RoundsDriver
from peerlearn.node.swarm import SwarmService
from peerlearn.tensors import state_dict_from_bytes, state_dict_to_bytes

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.msgpack"
SHARD_SEED = 1234  # every node must cut the training set into the same shards
MODEL_SIZE_SLACK = 4096  # bytes a peer's encoding of our model's layout may differ by


class Driver(Protocol):
    """A protocol core's driver (``RoundsDriver``, ``ModestDriver``)."""

    def current_round(self) -> int: ...

    def receive_model(self, src: bytes, kind: str, meta: Any, model: StateDict) -> None: ...

    async def run(self) -> None: ...


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
    """One node's learning: composes the task, the driver, the transport and checkpoints."""

    def __init__(
        self,
        config: NodeConfig,
        host: Host,
        swarm: SwarmService,
        data_dir: Path,
        on_bytes: Callable[[int, int], None],
        sequence: wire.SequenceCounter,
        replay_guard: wire.ReplayGuard,
        wall_clock: Callable[[], float] = time.time,
        offload: Offload = in_thread,
        task: TaskFactory | str | None = None,
        bulk: BulkPath | None = None,
    ) -> None:
        """``sequence`` and ``replay_guard`` are the node's own: one per identity;
        ``offload`` runs training, merges, evaluation, checkpoints and decoding; ``task`` (a
        factory or a name) builds the task instead of ``config.task`` (the embedding API);
        ``bulk`` carries large models (the libp2p stream if None)."""
        self.config = config
        self.swarm = swarm
        self.me = host.identity.public_key
        self.host = host
        self.offload = offload
        seed = int.from_bytes(hashlib.sha256(self.me).digest()[:8], "big")
        self.generator = torch.Generator().manual_seed(seed)  # attacks
        rng = random.Random(seed)
        # MoDeST starts every node from the same model; gossip/D-PSGD from independent ones.
        swarm_seed = int.from_bytes(hashlib.sha256(config.swarm.encode()).digest()[:8], "big")
        self.learning = TaskModel(
            create_task(task or config.task, task_context(config, seed)),
            torch.Generator().manual_seed(swarm_seed if config.algo == "modest" else seed),
            lr=config.lr,
            device=config.device,
            bristle_rng=rng if config.filter == "bristle" else None,
        )
        self.task_name = (
            task if isinstance(task, str) else getattr(task, "__qualname__", config.task)
        )
        self.model: StateDict = self.learning.state()
        self.rule = robust.create_rule(
            "mean" if config.filter == "bristle" else config.filter, f=config.byzantine_bound
        )
        self.contribution = ContributionScores()
        self._own_loss: tuple[StateDict, float | None] | None = None  # (model, its loss)
        self.bound = UpdateBound.for_merge(
            config.algo, config.filter, config.max_update_ratio, config.update_clip_ratio
        )
        self.round = 0  # the last round whose checkpoint is on disk
        self.accuracy: float | None = None  # the task's metric
        self.metrics: dict[str, float] = {}
        self._finish_lock = trio.Lock()
        self.phase = "waiting for members"
        # MoDeST's nodes share their start: compressed models are changes against it (kept
        # whatever our own setting, so that we can rebuild the models of peers that compress)
        start = None
        if config.algo == "modest":
            start = {k: v.detach().clone() for k, v in self.model.items()}
        self.transport = LearningTransport(
            config,
            host,
            swarm.pace,
            sequence,
            replay_guard,
            on_bytes,
            wall_clock,
            offload,
            bulk,
            reference=start,
        )
        self._model_bytes = len(state_dict_to_bytes(self.model))
        self.checkpoints = CheckpointStore(data_dir / CHECKPOINT_FILE)
        self.resumed = self._load_checkpoint()
        self.driver: Driver = (
            ModestDriver(self) if config.algo == "modest" else RoundsDriver(self, rng)
        )

    # -- status -----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {
            "algo": self.config.algo,
            "filter": self.config.filter,
            "phase": self.phase,
            "round": self.current_round(),
            "task": self.task_name,
            "metric": self.learning.task.metric,
            "accuracy": self.accuracy,
            "metrics": self.metrics,
            "members": self.swarm.member_count(),
            "join_seconds": self.swarm.join_seconds,
            "models_sent": self.transport.models_sent,
            "model_bytes_sent": self.transport.model_bytes_sent,
            "compression": str(self.transport.compression),
            "models_received": self.transport.models_received,
            "pushes_skipped": getattr(self.driver, "pushes_skipped", 0),
            "train_samples": getattr(self.learning.task, "train_samples", None),
            "resumed_from_round": self.resumed,
            "attack": self.config.attack,
            "gossip_undelivered": self.host.publish_failures,
            **self.bound.status(),
            "contribution": self.contribution.status(peer_id_from_public_key),
        }

    def current_round(self) -> int:
        """Our last round, or the swarm's latest one the driver knows of."""
        return max(self.round, self.driver.current_round())

    def done(self) -> bool:
        return bool(self.config.max_rounds) and self.current_round() >= self.config.max_rounds

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
        """Runs off the event loop. The swarm state is saved by the swarm service, on its
        own schedule: writing 10,000 members' records every round held the event loop."""
        self.checkpoints.save(self.learning.checkpoint(round_, model, metrics))

    # -- steps the drivers ask for ----------------------------------------------------------

    def members_pk(self) -> list[bytes]:
        """The members models can go to: those we are connected to, and ourselves (a
        member record alone, which anyone can make, takes no pushes)."""
        return self.swarm.reachable_members()

    async def merge(self, own: StateDict, received: list[StateDict]) -> StateDict:
        """A gossip / D-PSGD round's merge of ``received`` into ``own`` (off the event loop)."""
        c = self.config

        def merge() -> StateDict:
            return self.learning.merge(own, received, algo=c.algo, rule=self.rule, beta=c.beta)

        return await self.offload(merge)

    async def train(self, model: StateDict) -> StateDict:
        """One round of the task's training from ``model`` (off the event loop)."""
        trained, _ = await self.offload(self.learning.train, model)
        return trained

    async def finish_round(self, round_: int, model: StateDict) -> None:
        """Adopt ``model`` as round ``round_``'s: evaluate, checkpoint, then announce."""
        async with self._finish_lock:
            if round_ <= self.round and self.config.algo == "modest":
                return  # MoDeST: an aggregate we already know (as trainer and aggregator)
            metrics = await self.offload(self.learning.evaluate, model)
            await self.offload(self._save_checkpoint, round_, model, metrics)
            score = self.learning.score(metrics)
            self.round, self.model, self.metrics, self.accuracy = round_, model, metrics, score
            digest = await self.transport.digest(model)
            self.swarm.write("round", {"round": round_})
            self.swarm.write("model", {"version": round_, "sha256": digest.hex()})
            self.swarm.write("metrics", {"accuracy": round(score, 4), "round": round_})
        logger.info("round %d: %s %.3f", round_, self.learning.task.metric, score)

    @property
    def poisons_models(self) -> bool:
        """Experiments: this node sends a poisoned model instead of its trained one."""
        return self.config.attack in MODEL_ATTACKS

    def poison(self, trained: StateDict, received: list[StateDict]) -> StateDict:
        """Experiments: what a ``--attack`` node sends instead of its honest model, given
        the peers' models it has seen (``received``)."""
        members = max(len(self.members_pk()), 2)
        attack = attacks.model_attack(
            self.config.attack, nodes=members, byzantine=self.config.byzantine_bound
        )
        if attack is None:
            return trained
        return attack(trained, [*received, trained], self.generator)

    # -- models from peers ------------------------------------------------------------------

    @property
    def max_model_bytes(self) -> int:
        """The size of our model on the wire: a peer's model of the same layout has it too."""
        return self._model_bytes + MODEL_SIZE_SLACK

    async def accept_blob(self, received: blob.ReceivedBlob) -> None:
        """Called by the daemon for learner blobs: the model must pass the checks of
        ``hygiene.admit_received`` against ours (and is clipped to the sender's bound)
        before the driver (and any merge) sees it."""
        own, size, ratio = self.model, self.max_model_bytes, self.config.max_update_ratio
        meta = dict(received.offer.meta)
        codec = meta.pop(COMPRESSION_KEY, None)
        reference = self.transport.reference
        pk = public_key_from_peer_id(received.sender_id)  # checked against the signed offer
        limit = self.bound.limit_for(pk)

        scoring = self.config.contribution != "off"

        def decode_and_check() -> tuple[Admitted, float | None, float | None]:
            model = state_dict_from_bytes(received.data, size)
            if codec is not None:
                model = decode_from_peer(model, own, codec, reference)
            admitted = admit_received(model, own, max_update_ratio=ratio, limit=limit)
            if not scoring:
                return admitted, None, None
            return admitted, self._loss_of_own(own), self.learning.contribution_loss(model)

        admitted, own_loss, loss = await self.offload(decode_and_check)
        self.bound.record(pk, admitted, limit)
        if own_loss is not None and loss is not None:
            gain = self.contribution.record(pk, own_loss, loss)
            if self.config.contribution == "filter" and self.contribution.excluded(pk):
                self.contribution.excluded_models += 1
                raise RemoteProtocolError(
                    f"its models score far below the other peers' on our data "
                    f"(this one {gain:+.2f} against ours)",
                    Offence.BAD_MODEL,
                )
        self.driver.receive_model(pk, received.offer.kind, meta, admitted.model)
        self.transport.model_received(received.offer.size)
        self.swarm.establish(received.sender_id)

    def _loss_of_own(self, own: StateDict) -> float | None:
        """Our model's contribution loss, computed once per model (off the event loop)."""
        cached = self._own_loss
        if cached is not None and cached[0] is own:
            return cached[1]
        loss = self.learning.contribution_loss(own)
        self._own_loss = (own, loss)
        return loss

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
        await self.driver.run()
        self.phase = "finished"
        logger.info(
            "learning finished after round %d (max_rounds); the node keeps running and serving "
            "its model until `peerlearn node stop` or Ctrl-C",
            self.current_round(),
        )
