"""Deterministic in-process simulator: many nodes, virtual time, seeded, the real learning cores.

Algorithms:

* ``fedavg``: a central server (reference only) averages the models of ``sample_size`` clients.
* ``dpsgd``: every node trains, then averages with its neighbours on a fixed random graph.
* ``gossip`` / ``gossip-vca``: every node trains and sends its model to ``fanout`` random peers,
  then merges what it received with ``beta*own + (1-beta)*rule(received)`` (plus VCA).
* ``modest``: the ``ModestNode`` protocol cores exchange messages through a discrete-event
  network with latency, bandwidth and ping timeouts; the same cores the daemon runs.

Every node trains the same ``Task`` the daemon would (``task``, ``task_options``), through a
``TaskModel``; bytes are counted from the encoded messages (safetensors models, msgpack
MoDeST messages). Filters (``none``, ``median``, ``trimmed``, ``krum``, ``clip``, ``bristle``)
replace the rule that combines received models; before that, every received model passes
the daemon's checks (``hygiene``: layout, finite values, the update bound, clipping to each
node's ``UpdateBound``). Byzantine nodes poison data (``label-flip``) or models
(``sign-flip``, ``gaussian``, ``alie``, ``ipm``; ``ratchet``: each receiver's own model plus
a change just under the bound that receiver applies). ``compression`` (``int8``,
``int4``, ``topk:F``) compresses every model a node sends, with error feedback, against the
model both sides hold where there is one (FedAvg's global model, MoDeST's shared start);
receivers get what the daemon's would rebuild, and bytes count the compressed encoding.
Same config -> same trace hash.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import itertools
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import torch

from peerlearn import wire
from peerlearn.errors import LocalProtocolError, RemoteProtocolError
from peerlearn.gossip import modest, rounds
from peerlearn.learning import attacks, robust
from peerlearn.learning.aggregate import StateDict
from peerlearn.learning.choices import (
    ALGORITHMS,
    ATTACKS,
    FILTERS,
    PARTITIONS,
    Compression,
    experiment_shards,
)
from peerlearn.learning.compression import ErrorFeedback
from peerlearn.learning.contribution import CONTRIBUTION_MODES, ContributionScores
from peerlearn.learning.hygiene import (
    DEFAULT_CLIP_RATIO,
    DEFAULT_MAX_UPDATE_RATIO,
    UpdateBound,
    update_norm_bound,
)
from peerlearn.learning.task import TaskContext, Training, create_task, parse_task_options
from peerlearn.learning.task_model import TaskModel
from peerlearn.tensors import state_dict_to_bytes

E = TypeVar("E", rounds.TrainRound, rounds.MergeRound)
ROUND_RECORD_HOPS = 2  # gossip hops a MoDeST round record takes to reach a node
MESSAGE_LATENCIES = 10  # a small message's delivery time, in latencies, MoDeST's pings allow


@dataclass(frozen=True)
class SimConfig:
    """One experiment. Times are virtual seconds; sizes are counts."""

    algo: str = "gossip-vca"
    filter: str = "none"
    nodes: int = 20
    byzantine: float = 0.0  # fraction of nodes that attack
    attack: str = "none"
    rounds: int = 30
    seed: int = 0
    partition: str = "iid"
    classes_per_node: int = 4  # label-skew
    dirichlet_alpha: float = 0.5
    task: str = "digits"
    task_options: tuple[str, ...] = ()  # key=value, as --task-opt
    local_steps: int = 10
    batch_size: int = 16
    lr: float = 0.0  # 0: the task's default
    fanout: int = 4  # gossip peers per round; dpsgd graph degree
    beta: float = 0.5  # weight of a node's own model when merging
    sample_size: int = 10  # modest/fedavg participants per round (<= nodes)
    aggregators: int = 1
    success_fraction: float = 1.0
    kill_fraction: float = 0.0
    kill_round: int = 0  # 0: never
    latency: float = 0.05  # seconds per message
    bandwidth: float = 10e6  # bytes per second per message
    train_time: float = 1.0  # seconds per local training
    eval_every: int = 1
    compression: str = "none"  # none, int8, int4 or topk:F: every model a node sends
    max_update_ratio: float = DEFAULT_MAX_UPDATE_RATIO  # as the daemon's setting
    clip_ratio: float = DEFAULT_CLIP_RATIO  # as the daemon's update_clip_ratio (0: none)
    contribution: str = "off"  # as the daemon's setting: off, score or filter

    def resolved(self) -> SimConfig:
        if self.algo not in ALGORITHMS:
            raise LocalProtocolError(f"unknown algo {self.algo!r}; known: {', '.join(ALGORITHMS)}")
        if self.filter not in FILTERS:
            raise LocalProtocolError(f"unknown filter {self.filter!r}; known: {', '.join(FILTERS)}")
        if self.partition not in PARTITIONS:
            raise LocalProtocolError(f"unknown partition {self.partition!r}")
        if self.attack not in ATTACKS:
            raise LocalProtocolError(f"unknown attack {self.attack!r}")
        if self.contribution not in CONTRIBUTION_MODES:
            raise LocalProtocolError(f"contribution must be one of {CONTRIBUTION_MODES}")
        if self.filter == "bristle" and self.algo not in ("gossip", "gossip-vca", "dpsgd"):
            raise LocalProtocolError(
                "bristle merges gossiped layers: use gossip, gossip-vca or dpsgd"
            )
        unsuited = Compression.parse(self.compression).unsuited_to(self.algo)
        if unsuited is not None:
            raise LocalProtocolError(unsuited)
        if not 0 <= self.byzantine < 1 or not 0 <= self.kill_fraction < 1:
            raise LocalProtocolError("byzantine and kill fractions must be in [0, 1)")
        if self.nodes < 2 or self.rounds < 1:
            raise LocalProtocolError("need at least 2 nodes and 1 round")
        parse_task_options(self.task_options)
        return SimConfig(
            **{
                **asdict(self),
                "sample_size": min(self.sample_size, self.nodes),
                "aggregators": min(self.aggregators, self.nodes),
                "fanout": min(self.fanout, self.nodes - 1),
            }
        )


@dataclass(frozen=True)
class RoundRecord:
    round: int
    time: float  # virtual seconds
    acc_mean: float  # over honest alive nodes (the aggregate for fedavg/modest)
    acc_min: float
    bytes_sent: int  # cumulative, all nodes
    alive: int


@dataclass
class SimResult:
    config: SimConfig
    records: list[RoundRecord] = field(default_factory=list)
    trace_hash: str = ""
    wall_seconds: float = 0.0

    def rounds_to(self, target: float) -> int | None:
        """First round whose mean honest accuracy reaches ``target``."""
        return next((r.round for r in self.records if r.acc_mean >= target), None)

    def final(self, last: int = 5) -> float:
        """Mean honest accuracy over the last ``last`` evaluations."""
        tail = self.records[-last:]
        return sum(r.acc_mean for r in tail) / len(tail) if tail else 0.0


@dataclass
class _Node:
    index: int
    pk: bytes
    byzantine: bool
    learner: TaskModel
    generator: torch.Generator  # the node's attacks
    model: StateDict  # its exchanged state
    bound: UpdateBound  # how far a received model may lie from its own
    scores: ContributionScores = field(default_factory=ContributionScores)
    alive: bool = True
    feedback: ErrorFeedback | None = None  # with compression: what it has not sent yet
    direction: StateDict | None = None  # a ratchet attacker's


class _Trace:
    def __init__(self) -> None:
        self._hash = hashlib.sha256()

    def add(self, *items: object) -> None:
        self._hash.update(repr(items).encode())

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


class Simulation:
    """Builds the nodes for a config and runs the chosen algorithm."""

    def __init__(
        self, config: SimConfig, progress: Callable[[RoundRecord], None] | None = None
    ) -> None:
        self.config = config = config.resolved()
        self.progress = progress
        self.rng = random.Random(config.seed)
        self.trace = _Trace()
        self.bytes_sent = 0
        self.result = SimResult(config)
        self.nodes = self._make_nodes()
        self.by_pk = {n.pk: n for n in self.nodes}
        self.honest = [n for n in self.nodes if not n.byzantine]
        self.model_bytes = len(state_dict_to_bytes(self.nodes[0].model))
        # MoDeST's nodes all start from one model; compressed changes are sent against it
        self.reference = None
        if config.algo == "modest":
            self.reference = {k: v.clone() for k, v in self.nodes[0].model.items()}
        self.compression = Compression.parse(config.compression)
        self.sent_bytes = self.model_bytes  # of each model a node sends
        if self.compression.enabled:
            wire_model, _ = ErrorFeedback(self.compression).encode(self.nodes[0].model)
            self.sent_bytes = len(state_dict_to_bytes(wire_model))
            for node in self.nodes:
                node.feedback = ErrorFeedback(self.compression)
        self.rule = robust.create_rule(
            config.filter if config.filter != "bristle" else "mean",
            f=max(1, round(config.byzantine * config.nodes)),
        )
        self.attack = attacks.model_attack(
            config.attack, nodes=config.nodes, byzantine=len(self.nodes) - len(self.honest)
        )

    # -- setup ----------------------------------------------------------------------------

    def _contexts(self, byzantine: set[int]) -> list[TaskContext]:
        """Each node's shard (``experiment_shards``) and training settings."""
        c = self.config
        shards = experiment_shards(c.nodes, byzantine, c.partition)
        options = parse_task_options(c.task_options)
        training = Training(c.local_steps, c.batch_size, c.lr)
        return [
            TaskContext(
                shard=shards[i][0],
                shards=shards[i][1],
                partition=shards[i][2],
                classes_per_node=c.classes_per_node,
                dirichlet_alpha=c.dirichlet_alpha,
                data_seed=c.seed,
                seed=c.seed * 100_003 + i,
                training=training,
                options=options,
                poison_labels=i in byzantine and c.attack == "label-flip",
                bristle=c.filter == "bristle",
            )
            for i in range(c.nodes)
        ]

    def _make_nodes(self) -> list[_Node]:
        c = self.config
        byzantine = set(self.rng.sample(range(c.nodes), round(c.byzantine * c.nodes)))
        shared_start = c.algo in ("fedavg", "modest")
        nodes = []
        for i, context in enumerate(self._contexts(byzantine)):
            # MoDeST and FedAvg start every node from one model; decentralized learners
            # initialise independently (the VCA setting).
            init_seed = c.seed if shared_start else c.seed * 100_003 + i + 7_777_777
            learner = TaskModel(
                create_task(c.task, context),
                torch.Generator().manual_seed(init_seed),
                lr=c.lr,
                bristle_rng=random.Random(c.seed * 7919 + i) if c.filter == "bristle" else None,
            )
            nodes.append(
                _Node(
                    i,
                    hashlib.sha256(f"peer-{c.seed}-{i}".encode()).digest(),
                    i in byzantine,
                    learner,
                    torch.Generator().manual_seed(c.seed * 100_003 + i),
                    learner.state(),
                    UpdateBound.for_merge(c.algo, c.filter, c.max_update_ratio, c.clip_ratio),
                )
            )
        for node in nodes:
            if node.byzantine and c.attack == "ratchet":
                node.direction = attacks.ratchet_direction(node.model, node.generator)
        return nodes

    # -- shared steps ---------------------------------------------------------------------

    def _local_train(self, node: _Node, model: StateDict) -> StateDict:
        return node.learner.train(model)[0]

    def _outgoing(
        self, node: _Node, model: StateDict, honest_models: Sequence[StateDict]
    ) -> StateDict:
        if node.byzantine and self.attack is not None and honest_models:
            return self.attack(model, honest_models, node.generator)
        return model

    def _for_receiver(self, node: _Node, receiver: _Node, model: StateDict) -> StateDict:
        """What ``node`` sends ``receiver``: ``model``, or a ratchet attacker's model made
        for that receiver, just under the bound it will be checked against."""
        if node.direction is None:
            return model
        bound = receiver.bound.limit_for(node.pk)
        if bound is None:
            bound = update_norm_bound(receiver.model, self.config.max_update_ratio)
        return attacks.ratchet(receiver.model, bound, node.direction)

    def _admitted(
        self, node: _Node, senders: Sequence[bytes], models: Sequence[StateDict]
    ) -> list[StateDict]:
        """The received models ``node`` may merge, each checked (and clipped) against its
        model as the daemon does; the refused are left out."""
        out = []
        scoring = self.config.contribution != "off"
        filtering = self.config.contribution == "filter"
        own_loss = node.learner.contribution_loss(node.model) if scoring else None
        for sender, model in zip(senders, models, strict=True):
            try:
                admitted = node.bound.admit(sender, model, node.model)
            except RemoteProtocolError:
                self.trace.add("refused", node.index, self.by_pk[sender].index)
                continue
            loss = node.learner.contribution_loss(model) if own_loss is not None else None
            if own_loss is not None and loss is not None:  # the model as sent, as the daemon
                node.scores.record(sender, own_loss, loss)
                if filtering and node.scores.excluded(sender):
                    node.scores.excluded_models += 1
                    continue
            out.append(admitted)
        return out

    def _send(self, node: _Node, model: StateDict, reference: StateDict | None = None) -> StateDict:
        """The model ``node``'s receivers get when it sends ``model``."""
        if node.feedback is None:
            return model
        return node.feedback.encode(model, reference)[1]

    def _kill(self, round_: int) -> None:
        c = self.config
        if c.kill_round != round_ or c.kill_fraction <= 0:
            return
        alive = [n for n in self.nodes if n.alive]
        for node in self.rng.sample(alive, int(len(alive) * c.kill_fraction)):
            node.alive = False
        self.trace.add("kill", round_, [n.index for n in self.nodes if not n.alive])

    def _score(self, node: _Node, model: StateDict) -> float:
        return node.learner.score(node.learner.evaluate(model))

    def _record(self, round_: int, now: float, scored: Sequence[tuple[_Node, StateDict]]) -> None:
        accs = [self._score(node, model) for node, model in scored] or [0.0]
        record = RoundRecord(
            round_,
            now,
            sum(accs) / len(accs),
            min(accs),
            self.bytes_sent,
            sum(n.alive for n in self.nodes),
        )
        self.result.records.append(record)
        self.trace.add(record)
        if self.progress is not None:
            self.progress(record)

    def _evaluate_nodes(self, round_: int, now: float) -> None:
        if round_ % self.config.eval_every == 0 or round_ == self.config.rounds:
            self._record(round_, now, [(n, n.model) for n in self.honest if n.alive])

    # -- algorithms ------------------------------------------------------------------------

    def run(self) -> SimResult:
        started = time.perf_counter()
        runner = {
            "fedavg": self._run_fedavg,
            "dpsgd": self._run_rounds,
            "gossip": self._run_rounds,
            "gossip-vca": self._run_rounds,
            "modest": self._run_modest,
        }[self.config.algo]
        runner()
        self.result.trace_hash = self.trace.hexdigest()
        self.result.wall_seconds = time.perf_counter() - started
        return self.result

    def _run_fedavg(self) -> None:
        c = self.config
        global_model = self.nodes[0].model
        for r in range(1, c.rounds + 1):
            self._kill(r)
            alive = [n for n in self.nodes if n.alive]
            clients = self.rng.sample(alive, min(c.sample_size, len(alive)))
            trained = [(n, self._local_train(n, global_model)) for n in clients]
            honest = [m for n, m in trained if not n.byzantine]
            uploads = [
                self._send(n, self._outgoing(n, m, honest), global_model) for n, m in trained
            ]
            self.bytes_sent += len(clients) * (self.model_bytes + self.sent_bytes)
            global_model = self.rule(global_model, uploads)
            self.trace.add(r, sorted(n.index for n in clients))
            if r % c.eval_every == 0 or r == c.rounds:
                self._record(r, r * c.train_time, [(self.nodes[0], global_model)])

    def _run_rounds(self) -> None:
        """Gossip / D-PSGD: every node's ``RoundsNode`` core, driven in lockstep: all nodes
        train round r, send, then merge what they received in round r."""
        c = self.config
        settings = rounds.RoundSettings(c.algo, c.fanout, c.train_time, c.rounds)
        members = [n.pk for n in self.nodes]
        by_pk = self.by_pk
        cores = {
            n.pk: rounds.RoundsNode(n.pk, settings, random.Random(c.seed * 7_919 + n.index))
            for n in self.nodes
        }
        for core in cores.values():
            core.set_members(members)
            core.start(0.0)
        for r in range(1, c.rounds + 1):
            self._kill(r)
            alive = [n for n in self.nodes if n.alive]
            started = (r - 1) * c.train_time
            trained: dict[int, StateDict] = {}
            for n in alive:
                self._step(cores[n.pk], rounds.TrainRound, r)
                trained[n.index] = self._local_train(n, n.model)
            for n in alive:  # a round's received models are checked against the trained one
                n.model = trained[n.index]
            honest = [trained[n.index] for n in alive if not n.byzantine]
            for n in alive:
                core = cores[n.pk]
                outgoing = self._send(n, self._outgoing(n, trained[n.index], honest))
                core.trained(r, outgoing, started)
                now = started + c.latency
                sends = core.messages_to_send()
                for send in sends:
                    meta = rounds.encode_meta(send)
                    self.bytes_sent += self.sent_bytes + len(wire.pack(meta))
                    receiver = by_pk[send.dst]
                    if receiver.alive:
                        model = self._for_receiver(n, receiver, send.model)
                        cores[send.dst].receive(n.pk, rounds.decode_meta(meta, model), now)
                self.trace.add(r, n.index, sorted(by_pk[s.dst].index for s in sends))
            for n in alive:
                merge = self._step(cores[n.pk], rounds.MergeRound, r)
                received = self._admitted(n, merge.senders, merge.received)
                n.model = n.learner.merge(
                    trained[n.index], received, algo=c.algo, rule=self.rule, beta=c.beta
                )
                cores[n.pk].merged(r, r * c.train_time)
            self._evaluate_nodes(r, r * c.train_time)

    @staticmethod
    def _step(core: rounds.RoundsNode, expected: type[E], round_: int) -> E:
        """Fire the core's timer; the event it must then ask for."""
        timer = core.get_timer()
        if timer is not None:
            core.handle_timer(timer)
        event = core.next_event()
        if not isinstance(event, expected) or event.round != round_:
            raise LocalProtocolError(f"the rounds core skipped {expected.__name__} {round_}")
        return event

    def _run_modest(self) -> None:
        _ModestNetwork(self).run()


class _ModestNetwork:
    """Discrete-event network for ``ModestNode`` cores: latency, bandwidth, timers, crashes."""

    def __init__(self, sim: Simulation) -> None:
        self.sim = sim
        c = sim.config
        self.settings = modest.settings_for(
            sample_size=c.sample_size,
            aggregators=c.aggregators,
            success_fraction=c.success_fraction,
            round_time=c.train_time,
            message_time=MESSAGE_LATENCIES * c.latency,
        )
        self.by_pk = sim.by_pk
        peers = [n.pk for n in sim.nodes]
        self.cores = {n.pk: modest.ModestNode(n.pk, peers, self.settings) for n in sim.nodes}
        self.queue: list[tuple[float, int, str, Any]] = []
        self.counter = itertools.count()
        self.timers: dict[bytes, float] = {}
        self.now = 0.0
        self.recorded_round = 0
        self.latest_honest: dict[bytes, StateDict] = {}

    def _push(self, at: float, kind: str, payload: Any) -> None:
        heapq.heappush(self.queue, (at, next(self.counter), kind, payload))

    def _size(self, message: modest.Message) -> int:
        """Bytes of the message as the daemon encodes it (envelopes and framing aside)."""
        if isinstance(message, modest.TrainedModel | modest.AggregatedModel):
            return self.sim.sent_bytes + len(wire.pack(modest.encode_model_meta(message)))
        return len(wire.pack(modest.encode_small(message)))

    def _flush(self, pk: bytes) -> None:
        core = self.cores[pk]
        for send in core.messages_to_send():
            size = self._size(send.message)
            self.sim.bytes_sent += size
            delay = self.sim.config.latency + size / self.sim.config.bandwidth
            self._push(self.now + delay, "deliver", (pk, send.dst, send.message))
        while (event := core.next_event()) is not None:
            self._on_event(pk, event)
        timer = core.get_timer()
        if timer is not None and self.timers.get(pk) != timer:
            self.timers[pk] = timer
            self._push(max(timer, self.now), "timer", (pk, timer))

    def _on_event(self, pk: bytes, event: modest.Event) -> None:
        node = self.by_pk[pk]
        if isinstance(event, modest.AggregateRequest):
            aggregate = self.sim.rule(node.model, event.models)
            sent = self.sim._send(node, aggregate, self.sim.reference)
            self.cores[pk].aggregated(event, sent, self.now)
        elif isinstance(event, modest.TrainRequest):
            node.model = event.model
            self._push(
                self.now + self.sim.config.train_time, "trained", (pk, event.round, event.model)
            )
        elif isinstance(event, modest.RoundAggregated) and event.round > self.recorded_round:
            self.recorded_round = event.round
            self.sim.trace.add(
                "aggregated", event.round, [self.by_pk[c].index for c in event.contributors]
            )
            if (
                event.round % self.sim.config.eval_every == 0
                or event.round >= self.sim.config.rounds
            ):
                self.sim._record(event.round, self.now, [(node, event.model)])
            self.sim._kill(event.round)
            # Swarm-wide progress: the aggregator's round record reaches the others by gossip,
            # as in the daemon (where it is a CRDT record).
            delay = ROUND_RECORD_HOPS * self.sim.config.latency
            for other in self.sim.nodes:
                if other.pk != pk:
                    self._push(self.now + delay, "round", (other.pk, event.round))
            self.cores[pk].observe_round(event.round, self.now)  # its own, once finished

    def run(self) -> None:
        c = self.sim.config
        initial = self.sim.nodes[0].model
        for pk, core in self.cores.items():
            core.start(initial, 0.0)
            self._flush(pk)
        deadline = (c.rounds + 5) * 60 * c.train_time  # virtual seconds: a stuck run ends
        while self.queue and self.recorded_round < c.rounds:
            self.now, _, kind, payload = heapq.heappop(self.queue)
            if self.now > deadline:
                break
            if kind == "deliver":
                src, dst, message = payload
                if not self.by_pk[dst].alive:
                    continue
                self.sim.trace.add(
                    round(self.now, 9),
                    self.by_pk[src].index,
                    self.by_pk[dst].index,
                    type(message).__name__,
                    getattr(message, "round", None),
                )
                if isinstance(message, modest.TrainedModel | modest.AggregatedModel):
                    admitted = self.sim._admitted(self.by_pk[dst], [src], [message.model])
                    if not admitted:
                        continue
                    message = dataclasses.replace(message, model=admitted[0])
                self.cores[dst].receive(src, message, self.now)
                self._flush(dst)
            elif kind == "round":
                pk, round_ = payload
                if self.by_pk[pk].alive:
                    self.cores[pk].observe_round(round_, self.now)
                    self._flush(pk)
            elif kind == "timer":
                pk, at = payload
                if self.timers.get(pk) != at or not self.by_pk[pk].alive:
                    continue
                del self.timers[pk]
                self.cores[pk].handle_timer(self.now)
                self._flush(pk)
            else:  # trained
                pk, round_, model = payload
                node = self.by_pk[pk]
                if not node.alive:
                    continue
                trained = self.sim._local_train(node, model)
                if not node.byzantine:
                    self.latest_honest[pk] = trained
                outgoing = self.sim._outgoing(node, trained, list(self.latest_honest.values()))
                sent = self.sim._send(node, outgoing, self.sim.reference)
                self.cores[pk].training_done(round_, sent, self.now)
                self._flush(pk)


def run_simulation(
    config: SimConfig, progress: Callable[[RoundRecord], None] | None = None
) -> SimResult:
    """Run one experiment; ``progress`` is called after every evaluated round."""
    return Simulation(config, progress).run()
