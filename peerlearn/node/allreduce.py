"""The butterfly all-reduce driver: moves the parts ``gossip.butterfly`` plans over direct,
acknowledged blob streams and does their torch work (``learning.parts``).

Rules that work coordinate by coordinate (mean, median, trimmed mean) run on each part at
its reducer. Krum, centered clipping and Bristle compare whole models, so they cannot: with
them, share whole models (``share_model`` + ``merge``). With VCA, each reduce part carries
its sender's per-tensor variances, and the average is rescaled to their mean (ours included).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import trio

from peerlearn.buffers import Body, release_freed_memory
from peerlearn.errors import LocalProtocolError, RemoteProtocolError
from peerlearn.gossip.butterfly import Butterfly, PartMessage, Phase
from peerlearn.learning import parts
from peerlearn.learning.aggregate import StateDict, is_variance_corrected, rescale_variance
from peerlearn.learning.choices import Compression
from peerlearn.learning.compression import ErrorFeedback
from peerlearn.learning.hygiene import check_layout, check_update_norm
from peerlearn.learning.robust import Rule
from peerlearn.node.daemon import Daemon
from peerlearn.node.learning_transport import COMPRESSION_KEY, MODEL_KIND
from peerlearn.tensors import state_dict_segments

logger = logging.getLogger(__name__)

PART_ROUNDS = 4  # rounds of one sender's parts kept until ``average`` asks for them
PART_RULES = ("none", "mean", "median", "trimmed")  # filters that work part by part
VARIANCES = "vca.variances"  # the reduce part's entry with its sender's tensor variances


@dataclass(frozen=True)
class Averaged:
    """The outcome of ``average``: the group's model and what went missing."""

    model: StateDict = field(repr=False)
    group: list[str]  # the members, sorted
    reduced_with: int  # members whose part of our share reached us (ourselves included)
    fallback_parts: list[int]  # parts whose average never came: they keep our values
    not_delivered: list[str]  # members we could not send a part to


class PartCompression:
    """A node's compression of the parts it sends, with error feedback for each part it
    sends round after round (by phase, index and group size). What it keeps is at most one
    float32 copy of the model: a group of another size cuts other parts, so the residuals
    of the last size are dropped."""

    def __init__(self, compression: Compression) -> None:
        self.compression = compression
        self._feedback: dict[tuple[Phase, int, int], ErrorFeedback] = {}

    def encode(
        self, key: tuple[Phase, int, int], tensors: StateDict, beside: StateDict
    ) -> memoryview:
        """``tensors`` compressed (``beside`` as they are): the bytes to send."""
        if any(size != key[2] for _, _, size in self._feedback):
            self._feedback = {k: v for k, v in self._feedback.items() if k[2] == key[2]}
        feedback = self._feedback.setdefault(key, ErrorFeedback(self.compression))
        return feedback.encode_bytes(tensors, beside=beside)


@dataclass(frozen=True)
class Received:
    """A part a peer sent: its sender, what its metadata says, its tensors."""

    sender: str
    message: PartMessage
    tensors: StateDict


class PartsBox:
    """Parts peers sent, by round, until ``average`` takes them, within a budget: parts of
    rounds already averaged are dropped, and so is what goes beyond, per sender, one part
    per phase in each of ``PART_ROUNDS`` rounds (its lowest rounds are kept) or
    ``per_sender`` bytes, and ``total`` bytes in all. Drops are counted and logged, so a
    peer flooding parts only loses its own."""

    def __init__(self, total: int, per_sender: int) -> None:
        self.total, self.per_sender = total, per_sender
        self._held: dict[tuple[int, str, Phase], Received] = {}  # (round, sender, phase)
        self.changed = trio.Event()
        self.floor = 0  # parts of earlier rounds are dropped
        self.dropped = 0

    @staticmethod
    def _size(received: Received) -> int:
        return sum(t.nbytes for t in received.tensors.values())

    def _drop(self, received: Received, why: str) -> None:
        self.dropped += 1
        logger.warning(
            "all-reduce part from %s for round %d dropped: %s",
            received.sender,
            received.message.round,
            why,
        )

    def deliver(self, received: Received) -> None:
        sender, message = received.sender, received.message
        key = (message.round, sender, message.phase)
        if message.round < self.floor:
            return self._drop(received, "that round is over")
        if key in self._held:
            return self._drop(received, "a second part for the same phase")
        own = [k for k in self._held if k[1] == sender]
        rounds = sorted({k[0] for k in own})
        if message.round not in rounds and len(rounds) >= PART_ROUNDS:
            if message.round > rounds[-1]:
                return self._drop(received, f"{PART_ROUNDS} of its rounds are waiting")
            for k in [k for k in own if k[0] == rounds[-1]]:  # its farthest round goes
                self._drop(self._held.pop(k), "a nearer round came")
        size = self._size(received)
        held_by_sender = sum(self._size(v) for k, v in self._held.items() if k[1] == sender)
        if held_by_sender + size > self.per_sender:
            return self._drop(received, f"its parts would exceed {self.per_sender} bytes")
        if sum(self._size(v) for v in self._held.values()) + size > self.total:
            return self._drop(received, f"parts would exceed {self.total} bytes")
        self._held[key] = received
        self.changed.set()
        self.changed = trio.Event()
        return None

    def take(self, round_: int) -> list[Received]:
        keys = [k for k in self._held if k[0] == round_]
        return [self._held.pop(k) for k in keys]

    def close_round(self, round_: int) -> None:
        self.floor = max(self.floor, round_ + 1)
        for key in [k for k in self._held if k[0] <= round_]:
            del self._held[key]


@dataclass
class AllReduce:
    """One ``average`` call: its plan, the parts gathered so far and the model's vectors."""

    daemon: Daemon
    box: PartsBox
    plan: Butterfly
    vectors: parts.Vectors
    rule: Rule
    max_update_ratio: float
    rejected: Callable[[str, RemoteProtocolError], None]
    compression: PartCompression | None = None
    inputs: list[parts.Vectors] = field(default_factory=list)  # our part, from each member
    variances: list[torch.Tensor] = field(default_factory=list)
    not_delivered: set[str] = field(default_factory=set)
    sending: set[int] = field(default_factory=set)  # our parts still going to their reducers
    deferred: dict[int, parts.Vectors] = field(default_factory=dict)  # averages to settle then

    def own_part(self, index: int) -> parts.Vectors:
        return parts.cut(self.vectors, index, self.plan.size)

    def absorb(self, received: Received) -> None:
        """Check a part against ours and record it (a bad one is rejected, its sender scored)."""
        message, tensors = received.message, dict(received.tensors)
        try:
            if message.of == self.plan.size and message.part < self.plan.size:
                sent_variances = tensors.pop(VARIANCES, None)
                reference = self.own_part(message.part)
                check_layout(tensors, reference)
                check_update_norm(tensors, reference, self.max_update_ratio)
                if message.phase is Phase.REDUCE:
                    self._check_variances(sent_variances)
            if not self.plan.receive(received.sender, message):
                return
        except RemoteProtocolError as exc:
            self.rejected(received.sender, exc)
            return
        if message.phase is Phase.REDUCE:
            self.inputs.append(tensors)
            if sent_variances is not None:
                self.variances.append(sent_variances)
        elif message.part in self.sending:
            self.deferred[message.part] = tensors
        else:
            self.settle(message.part, tensors)

    def settle(self, index: int, averaged: parts.Vectors) -> None:
        """Write a part's average into our flat copy (no other model-sized copy is kept).
        Parts are sent from that copy, so a part's average is settled only once our own
        values of it have gone to its reducer (it may give up on them and send its
        average before they are through)."""
        for key, tensor in self.own_part(index).items():
            tensor.copy_(averaged[key])

    def _check_variances(self, sent: torch.Tensor | None) -> None:
        if not self.variances:  # only when VCA is on is our own entry there
            return
        own = self.variances[0]
        if sent is None or sent.shape != own.shape or sent.dtype != own.dtype:
            raise RemoteProtocolError("its reduce part lacks the variances VCA needs")
        if not bool(torch.isfinite(sent).all()) or bool((sent < 0).any()):
            raise RemoteProtocolError("its reduce part carries invalid variances")

    async def collect(self, done: Callable[[], bool], deadline: float) -> None:
        """Absorb this round's parts as they come until ``done()`` or ``deadline``."""
        with trio.move_on_at(deadline):
            while True:
                changed = self.box.changed
                for received in self.box.take(self.plan.round):
                    self.absorb(received)
                if done():
                    return
                await changed.wait()

    async def encoded(self, phase: Phase, part: int, tensors: StateDict, beside: StateDict) -> Body:
        """What we send of a part: its tensors' safetensors header and views of them, or
        compressed (encoded in a worker thread)."""
        if self.compression is None:
            return state_dict_segments({**tensors, **beside})
        key = (phase, part, self.plan.size)
        return await self.daemon.runtime.offload(self.compression.encode, key, tensors, beside)

    async def reduce_send(self, peer: str, part: int, data: Body) -> None:
        """Send our values of ``part`` to its reducer, then settle its average if it came."""
        try:
            await self.send([peer], Phase.REDUCE, part, data)
        finally:
            self.sending.discard(part)
            averaged = self.deferred.pop(part, None)
            if averaged is not None:
                self.settle(part, averaged)

    async def send(self, peers: Sequence[str], phase: Phase, part: int, data: Body) -> None:
        meta = self.plan.message(phase, part).meta()
        if self.compression is not None:
            meta[COMPRESSION_KEY] = str(self.compression.compression)
        for result in await self.daemon.push_to_peers(data, MODEL_KIND, meta, list(peers)):
            if not result["ok"]:
                self.not_delivered.add(result["peer_id"])


async def average(
    daemon: Daemon,
    box: PartsBox,
    model: StateDict,
    *,
    round_: int,
    peers: Sequence[str],
    rule: Rule,
    variance_correction: bool,
    max_update_ratio: float,
    timeout: float,  # noqa: ASYNC109 - two phases share it
    rejected: Callable[[str, RemoteProtocolError], None],
    compression: PartCompression | None = None,
) -> Averaged:
    """Butterfly all-reduce of ``model`` with ``peers`` in round ``round_`` (see
    ``AsyncNode.average``). The reduce waits up to half of ``timeout``, the gather the rest.
    With ``compression``, every part goes compressed."""
    plan = Butterfly(peers, daemon.identity.peer_id, round_)
    if round_ < box.floor:
        raise LocalProtocolError(f"round {round_} was already averaged; use a later one")
    started = trio.current_time()
    vectors = await daemon.runtime.offload(parts.flat_vectors, model)
    run = AllReduce(daemon, box, plan, vectors, rule, max_update_ratio, rejected, compression)
    own = run.own_part(plan.index)
    run.inputs.append(own)
    if variance_correction:
        run.variances.append(parts.variances(model))
    try:
        async with trio.open_nursery() as nursery:
            nursery.cancel_scope.deadline = started + timeout  # our sends end then too
            beside = {VARIANCES: run.variances[0]} if variance_correction else {}
            for peer, index in plan.reduce_sends():  # views of our flat copy, unless compressed
                data = await run.encoded(Phase.REDUCE, index, run.own_part(index), beside)
                run.sending.add(index)
                nursery.start_soon(run.reduce_send, peer, index, data)
                del data
            await run.collect(lambda: plan.reduce_done, started + timeout / 2)
            plan.gather()
            reduced = await daemon.runtime.offload(rule, own, run.inputs)
            run.inputs.clear()
            run.settle(plan.index, reduced)
            others = [peer for peer, _ in plan.gather_sends()]
            gathered = await run.encoded(Phase.GATHER, plan.index, reduced, {})  # not changed again
            nursery.start_soon(run.send, others, Phase.GATHER, plan.index, gathered)
            del reduced, gathered
            await run.collect(lambda: plan.gather_done, started + timeout)
    finally:
        box.close_round(round_)
    await daemon.runtime.offload(release_freed_memory)
    fallback = plan.finish() if plan.phase is Phase.GATHER else []
    merged = parts.rebuild(vectors, model)
    if variance_correction:
        targets = torch.stack(run.variances).mean(dim=0).tolist()
        names = [n for n, t in model.items() if is_variance_corrected(n, t)]
        merged = rescale_variance(merged, dict(zip(names, targets, strict=True)), in_place=True)
    return Averaged(
        model=merged,
        group=plan.group,
        reduced_with=1 + len(plan.reduced_from),
        fallback_parts=fallback,
        not_delivered=sorted(run.not_delivered),
    )


def check_rule(filter_: str) -> None:
    """``average`` needs a rule that works part by part."""
    if filter_ not in PART_RULES:
        raise LocalProtocolError(
            f"filter {filter_!r} compares whole models, so average() cannot cut them into "
            f"parts: share whole models (share_model, then merge), or use one of "
            f"{', '.join(PART_RULES)}"
        )
