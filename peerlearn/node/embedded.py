"""Embedding a node in your own program: from trio, asyncio or plain synchronous code.

    # trio (the node runs in your trio loop)        # asyncio (the node runs in a trio thread)
    async with open_node(config) as node:           async with open_node(config) as node:
        await node.share_model(model.state_dict())      await node.share({"rollouts": [...]})
        async for update in node.updates(): ...         async for update in node.updates(): ...

    # synchronous code (the node runs in a trio thread)
    with Node(config) as node:
        node.share_model(model.state_dict())
        update = node.receive(timeout=5.0)

All three expose the same operations; under trio and asyncio every call that talks to the
node is awaited (``await node.peers()``), and ``open_node`` yields an ``EmbeddedNode``
either way. Models and payloads travel over direct, acknowledged
streams (never gossip); ``share_*`` returns one ``Delivery`` per peer, so nothing is lost
silently. Closing the node shuts it down gracefully.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import sniffio
import torch
import trio

from peerlearn import wire
from peerlearn.errors import LocalProtocolError, PeerlearnError, RemoteProtocolError, unwrap_group
from peerlearn.gossip.butterfly import PartMessage
from peerlearn.learning import aggregate, compression, robust
from peerlearn.learning.choices import Codec, Compression
from peerlearn.learning.hygiene import UpdateBound, check_finite
from peerlearn.learning.task import TaskFactory
from peerlearn.node import allreduce, blob
from peerlearn.node.allreduce import Averaged
from peerlearn.node.config import NodeConfig
from peerlearn.node.daemon import PAYLOAD_KIND, Daemon, run_daemon
from peerlearn.node.learning_transport import COMPRESSION_KEY, MODEL_KIND
from peerlearn.tensors import state_dict_and_metadata, state_dict_to_bytes_and_digest

logger = logging.getLogger(__name__)

T = TypeVar("T")
StateDict = dict[str, torch.Tensor]
UPDATE_BUFFER = 1024  # updates held for the application before the oldest are dropped (counted)
DECODERS = 2  # received models decoded at once (each one's temporaries held meanwhile)
START_TIMEOUT = 120.0  # seconds for a threaded node to start
PAYLOAD_LIMITS = wire.Limits(
    max_message_size=64 * 2**20, max_array_len=1_000_000, max_map_len=100_000
)


@dataclass(frozen=True)
class Update:
    """A model or payload a peer sent to this node, already verified."""

    sender: str  # peer ID
    kind: str  # "model" or "payload"
    model: StateDict | None = field(default=None, repr=False)
    payload: Any = field(default=None, repr=False)
    round: int | None = None
    received_at: float = 0.0  # time.time()


@dataclass(frozen=True)
class Delivery:
    """The outcome of sending to one peer."""

    peer_id: str
    ok: bool
    error: str | None = None
    seconds: float | None = None
    bytes: int | None = None  # the body as sent (compressed, if so), when delivered


def _received_tensors(
    received: blob.ReceivedBlob, max_size: int, beside: tuple[str, ...] = ()
) -> StateDict:
    """The tensors a peer sent, rebuilt in the layout it states (at most ``max_size``
    bytes) if it compressed them (``beside``: names sent as they are), all finite. Top-k
    is refused: its changes are from a start that no embedding node shares."""
    tensors, metadata = state_dict_and_metadata(received.data, max_size)
    meta = received.offer.meta
    if COMPRESSION_KEY in meta:
        kept = {name: tensors.pop(name) for name in beside if name in tensors}
        like = compression.like_from_layout(metadata, max_size)
        tensors = {**compression.decode_from_peer(tensors, like, meta[COMPRESSION_KEY]), **kept}
    check_finite(tensors)
    return tensors


def _to_part(received: blob.ReceivedBlob, max_size: int) -> allreduce.Received | None:
    """An all-reduce part, None for anything else (malformed part metadata is an error)."""
    message = PartMessage.from_meta(received.offer.meta)
    if message is None:
        return None
    if received.offer.kind != MODEL_KIND:
        raise RemoteProtocolError("an all-reduce part must be tensors")
    tensors = _received_tensors(received, max_size, beside=(allreduce.VARIANCES,))
    return allreduce.Received(received.sender_id, message, tensors)


def _to_update(received: blob.ReceivedBlob, max_size: int) -> Update:
    meta = received.offer.meta
    round_ = meta.get("round") if isinstance(meta.get("round"), int) else None
    if received.offer.kind == MODEL_KIND:
        model = _received_tensors(received, max_size)
        return Update(
            received.sender_id, MODEL_KIND, model=model, round=round_, received_at=time.time()
        )
    payload = wire.unpack(received.data, PAYLOAD_LIMITS)
    return Update(
        received.sender_id, PAYLOAD_KIND, payload=payload, round=round_, received_at=time.time()
    )


def _deliveries(results: list[dict[str, Any]]) -> list[Delivery]:
    return [
        Delivery(r["peer_id"], r["ok"], r.get("error"), r.get("seconds"), r.get("bytes"))
        for r in results
    ]


class EmbeddedNode(Protocol):
    """What ``open_node`` yields, under trio (``TrioNode``) and asyncio (``AsyncioNode``)
    alike: every operation that talks to the node is awaited."""

    @property
    def peer_id(self) -> str: ...

    async def addrs(self) -> list[str]: ...

    async def peers(self) -> list[str]: ...

    async def members(self) -> list[str]: ...

    async def status(self) -> dict[str, Any]: ...

    async def set_round(self, round_: int) -> None: ...

    async def swarm_rounds(self) -> dict[str, int]: ...

    async def connect(self, address: str) -> str: ...

    async def share_model(
        self, model: StateDict, *, round: int | None = None, peers: Sequence[str] | None = None
    ) -> list[Delivery]: ...

    async def share(
        self, payload: Any, *, round: int | None = None, peers: Sequence[str] | None = None
    ) -> list[Delivery]: ...

    def merge(self, own: StateDict, updates: Sequence[Update | StateDict]) -> StateDict: ...

    async def average(
        self,
        model: StateDict,
        *,
        round: int,
        peers: Sequence[str] | None = None,
        timeout: float = 60.0,  # noqa: ASYNC109
    ) -> Averaged: ...

    async def receive(self) -> Update: ...

    def updates(self) -> AsyncIterator[Update]: ...


class AsyncNode:
    """A running embedded node, used from the trio loop it runs in."""

    def __init__(self, daemon: Daemon, box: allreduce.PartsBox) -> None:
        self._daemon = daemon
        self._parts = box
        self.rejected_updates = 0
        config = daemon.config
        self._rule = robust.create_rule(
            config.filter if config.filter != "bristle" else "mean", f=config.byzantine_bound
        )
        self._bound = UpdateBound.for_merge(
            config.algo, config.filter, config.max_update_ratio, config.update_clip_ratio
        )
        self._compression = Compression.parse(config.compression)
        enabled = self._compression.enabled
        self._feedback = compression.ErrorFeedback(self._compression) if enabled else None
        self._compressing = trio.Lock()  # error feedback moves on one model at a time
        self._part_compression = allreduce.PartCompression(self._compression) if enabled else None

    def _check_compression(self, operation: str) -> None:
        if self._compression.codec is Codec.TOPK:
            raise LocalProtocolError(
                f"{operation} cannot send {self._compression}: top-k sends changes from a "
                "start both sides hold; use int8 or int4"
            )

    @property
    def peer_id(self) -> str:
        return self._daemon.identity.peer_id

    async def addrs(self) -> list[str]:
        """Our dialable addresses."""
        return self._daemon.addrs()

    async def peers(self) -> list[str]:
        """Peer IDs of the peers we are connected to."""
        return self._daemon.connected_peer_ids()

    async def members(self) -> list[str]:
        """Peer IDs of every swarm member known through the shared state (needs a swarm)."""
        return self._daemon.members()

    async def status(self) -> dict[str, Any]:
        """What ``peerlearn node status --json`` shows and, under ``embedding``, this API's
        own counts: received models ``merge`` rejected, and all-reduce parts dropped (for
        a round already averaged, or beyond a sender's or the node's budget)."""
        return {
            **self._daemon.status(),
            "embedding": {
                "rejected_updates": self.rejected_updates,
                "dropped_parts": self._parts.dropped,
                **self._bound.status(),
            },
        }

    async def set_round(self, round_: int) -> None:
        """Announce our current round in the swarm state (needs a swarm)."""
        self._daemon.announce_round(round_)

    async def swarm_rounds(self) -> dict[str, int]:
        """Every member's announced round."""
        return self._daemon.swarm_rounds()

    async def connect(self, address: str) -> str:
        return await self._daemon.connect(address)

    async def share_model(
        self, model: StateDict, *, round: int | None = None, peers: Sequence[str] | None = None
    ) -> list[Delivery]:
        """Send a state_dict (or any dict of tensors) to ``peers`` (default: all connected),
        compressed with error feedback if the node's ``compression`` says so (int8, int4;
        top-k is refused: it sends changes from a start only the learners share)."""
        meta: dict[str, Any] = {} if round is None else {"round": round}
        feedback, sha256 = self._feedback, None
        if feedback is None:
            data, sha256 = await self._daemon.runtime.offload(state_dict_to_bytes_and_digest, model)
        else:
            self._check_compression("share_model")
            async with self._compressing:
                data = await self._daemon.runtime.offload(feedback.encode_bytes, model)
            meta[COMPRESSION_KEY] = str(self._compression)
        return _deliveries(
            await self._daemon.push_to_peers(
                data, MODEL_KIND, meta, list(peers) if peers is not None else None, sha256
            )
        )

    async def share(
        self, payload: Any, *, round: int | None = None, peers: Sequence[str] | None = None
    ) -> list[Delivery]:
        """Send any msgpack-able payload (e.g. RL rollouts) to ``peers`` (default: all)."""
        data = wire.pack(payload)
        if len(data) > PAYLOAD_LIMITS.max_message_size:
            raise LocalProtocolError(f"payload of {len(data)} bytes is too large")
        meta = {} if round is None else {"round": round}
        return _deliveries(
            await self._daemon.push_to_peers(
                data, PAYLOAD_KIND, meta, list(peers) if peers is not None else None
            )
        )

    def merge(self, own: StateDict, updates: Sequence[Update | StateDict]) -> StateDict:
        """Merge received models into ``own`` with the configured rule, beta and VCA.

        Each model must first pass the checks of ``hygiene.admit_received`` against ``own``
        (same layout, finite values, update norm within ``max_update_ratio``), and is clipped
        to its sender's bound (``update_clip_ratio``); the others are left out, logged and
        counted in ``rejected_updates``.
        """
        received = []
        for update in updates:
            model = update.model if isinstance(update, Update) else update
            if model is None:
                continue
            sender = update.sender if isinstance(update, Update) else "the caller"
            try:
                received.append(self._bound.admit(sender, model, own))
            except RemoteProtocolError as exc:
                self.rejected_updates += 1
                logger.warning("not merging the model from %s: %s", sender, exc)
        return aggregate.merge_received(
            own,
            received,
            rule=self._rule,
            beta=self._daemon.config.beta,
            variance_correction=self._daemon.config.algo == "gossip-vca",
        )

    async def average(
        self,
        model: StateDict,
        *,
        round: int,
        peers: Sequence[str] | None = None,
        timeout: float = 60.0,  # noqa: ASYNC109 - the all-reduce's two phases share it
    ) -> Averaged:
        """Average ``model`` with ``peers`` (default: all connected) by butterfly all-reduce:
        each member sends 2(n-1)/n of a model instead of n-1 models, and every member ends
        with the group's model. Every member must call it for the same ``round`` with the
        same group. The configured filter runs part by part (mean, median, trimmed; the
        others need whole models: use ``share_model`` and ``merge``), then VCA if configured.
        Parts go compressed if ``compression`` says so (int8, int4), with error feedback for
        each part from round to round. Parts missing after ``timeout`` seconds fall back to
        ours; ``Averaged`` says which."""
        config = self._daemon.config
        allreduce.check_rule(config.filter)
        self._check_compression("average")
        group = list(peers) if peers is not None else self._daemon.connected_peer_ids()
        check_finite(model)

        def rejected(sender: str, error: RemoteProtocolError) -> None:
            self.rejected_updates += 1
            logger.warning("not averaging the part from %s: %s", sender, error)

        return await allreduce.average(
            self._daemon,
            self._parts,
            model,
            round_=round,
            peers=group,
            rule=self._rule,
            variance_correction=config.algo == "gossip-vca",
            max_update_ratio=config.max_update_ratio,
            timeout=timeout,
            rejected=rejected,
            compression=self._part_compression,
        )


class _Inbox:
    """Updates waiting for a trio application; those it has no room for are dropped and
    counted (the application is not reading)."""

    def __init__(self) -> None:
        self.send, self.receive = trio.open_memory_channel[Update](UPDATE_BUFFER)
        self.dropped = 0

    def deliver(self, update: Update) -> None:
        try:
            self.send.send_nowait(update)
        except trio.WouldBlock:
            self.dropped += 1
            logger.warning(
                "update from %s dropped: the application is not reading updates", update.sender
            )


class TrioNode(AsyncNode):
    """The trio flavour: ``async for update in node.updates()``."""

    def __init__(self, daemon: Daemon, box: allreduce.PartsBox, inbox: _Inbox) -> None:
        super().__init__(daemon, box)
        self._inbox = inbox

    @property
    def dropped_updates(self) -> int:
        return self._inbox.dropped

    async def updates(self) -> AsyncIterator[Update]:
        async for update in self._inbox.receive:
            yield update

    async def receive(self) -> Update:
        return await self._inbox.receive.receive()


@asynccontextmanager
async def _running_daemon(
    config: NodeConfig, deliver: Callable[[Update], None], task: TaskFactory | str | None
) -> AsyncIterator[tuple[Daemon, allreduce.PartsBox]]:
    """A daemon that hands what peers push to ``deliver`` (decoding errors become
    ``RemoteProtocolError``: the blob is rejected to its sender). With ``task``, the built-in
    learner trains it in the swarm (``status()["learning"]``) and takes the models."""

    box = allreduce.PartsBox(config.blob_memory, config.blob_memory_per_peer)

    decoding = trio.CapacityLimiter(DECODERS)

    def decode(received: blob.ReceivedBlob) -> allreduce.Received | Update:
        part = _to_part(received, config.max_blob_size)
        return part if part is not None else _to_update(received, config.max_blob_size)

    async def on_update(received: blob.ReceivedBlob) -> None:
        # checks (and decompression) take time: in a worker thread, as every embedded node
        # runs in real time, a few at once
        decoded = await trio.to_thread.run_sync(decode, received, limiter=decoding)
        if isinstance(decoded, Update):
            deliver(decoded)
        else:
            box.deliver(decoded)

    try:
        async with trio.open_nursery() as nursery:
            daemon: Daemon = await nursery.start(
                lambda task_status: run_daemon(
                    config,
                    handle_signals=False,
                    learn=task is not None,
                    on_update=on_update,
                    task=task,
                    task_status=task_status,
                )
            )
            try:
                yield daemon, box
            finally:
                daemon.stop.set()
    except BaseExceptionGroup as group:
        error = unwrap_group(group)
        if error is group:
            raise
        raise error from None


@asynccontextmanager
async def _open_trio_node(
    config: NodeConfig, task: TaskFactory | str | None
) -> AsyncIterator[TrioNode]:
    inbox = _Inbox()
    async with _running_daemon(config, inbox.deliver, task) as (daemon, box):
        yield TrioNode(daemon, box, inbox)


class _TrioThread:
    """Runs a node's trio loop in a helper thread; calls cross over with trio.from_thread."""

    def __init__(
        self, config: NodeConfig, deliver: Callable[[Update], None], task: TaskFactory | str | None
    ) -> None:
        self._deliver = deliver
        self._task = task
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stop: trio.Event | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self.node: AsyncNode | None = None
        self._thread = threading.Thread(
            target=self._run, args=(config,), daemon=True, name="peerlearn-node"
        )
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT):
            raise PeerlearnError(f"the node did not start within {START_TIMEOUT:.0f} s")
        if self._error is not None:
            raise self._error

    def _run(self, config: NodeConfig) -> None:
        async def main() -> None:
            self._stop = trio.Event()
            self._token = trio.lowlevel.current_trio_token()
            async with _running_daemon(config, self._deliver, self._task) as (daemon, box):
                self.node = AsyncNode(daemon, box)
                self._ready.set()
                await self._stop.wait()

        try:
            trio.run(main)
        except BaseException as exc:  # reported to the caller's thread
            self._error = unwrap_group(exc)
        finally:
            self._ready.set()

    def call(self, fn: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> T:
        if self._token is None or not self._thread.is_alive():
            raise PeerlearnError("the node is not running")
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    def close(self, timeout: float) -> None:
        if self._thread.is_alive() and self._stop is not None and self._token is not None:
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise PeerlearnError(f"the node did not shut down within {timeout:.0f} s")
        if self._error is not None and not isinstance(self._error, trio.Cancelled):
            raise self._error


class Node:
    """A node for synchronous code: ``with Node(config) as node: ...``.

    With ``task`` (a ``peerlearn.Task`` factory, or a name as ``--task`` takes), the node also
    trains that task in the swarm with the configured algorithm, as ``node start --task``
    does."""

    def __init__(self, config: NodeConfig, *, task: TaskFactory | str | None = None) -> None:
        self.config = config
        self._task = task
        self._updates: queue.Queue[Update] = queue.Queue(UPDATE_BUFFER)
        self.dropped_updates = 0
        self._bridge: _TrioThread | None = None
        self._callback: Callable[[Update], None] | None = None

    def _deliver(self, update: Update) -> None:
        if self._callback is not None:
            self._callback(update)
            return
        try:
            self._updates.put_nowait(update)
        except queue.Full:
            self.dropped_updates += 1
            logger.warning(
                "update from %s dropped: the application is not reading updates", update.sender
            )

    def __enter__(self) -> Node:
        self._bridge = _TrioThread(self.config, self._deliver, self._task)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._bridge is not None:
            bridge, self._bridge = self._bridge, None
            bridge.close(self.config.shutdown_timeout + 5)

    @property
    def _running(self) -> _TrioThread:
        if self._bridge is None or self._bridge.node is None:
            raise LocalProtocolError("use the node inside `with Node(config) as node:`")
        return self._bridge

    @property
    def _node(self) -> AsyncNode:
        node = self._running.node
        assert node is not None  # checked by _running
        return node

    @property
    def peer_id(self) -> str:
        return self._node.peer_id

    @property
    def addrs(self) -> list[str]:
        return self._call(self._node.addrs)

    def _call(self, fn: Callable[..., Coroutine[Any, Any, T]], *args: Any, **kwargs: Any) -> T:
        return self._running.call(functools.partial(fn, *args, **kwargs))

    def peers(self) -> list[str]:
        return self._call(self._node.peers)

    def members(self) -> list[str]:
        return self._call(self._node.members)

    def status(self) -> dict[str, Any]:
        return self._call(self._node.status)

    def set_round(self, round_: int) -> None:
        self._call(self._node.set_round, round_)

    def swarm_rounds(self) -> dict[str, int]:
        return self._call(self._node.swarm_rounds)

    def connect(self, address: str) -> str:
        return self._call(self._node.connect, address)

    def share_model(
        self, model: StateDict, *, round: int | None = None, peers: Sequence[str] | None = None
    ) -> list[Delivery]:
        return self._call(self._node.share_model, model, round=round, peers=peers)

    def share(
        self, payload: Any, *, round: int | None = None, peers: Sequence[str] | None = None
    ) -> list[Delivery]:
        return self._call(self._node.share, payload, round=round, peers=peers)

    def merge(self, own: StateDict, updates: Sequence[Update | StateDict]) -> StateDict:
        return self._node.merge(own, updates)

    def average(
        self,
        model: StateDict,
        *,
        round: int,
        peers: Sequence[str] | None = None,
        timeout: float = 60.0,
    ) -> Averaged:
        return self._call(self._node.average, model, round=round, peers=peers, timeout=timeout)

    def receive(self, timeout: float | None = None) -> Update | None:
        """The next update, or None after ``timeout`` seconds."""
        try:
            return self._updates.get(timeout=timeout)
        except queue.Empty:
            return None

    def receive_all(self) -> list[Update]:
        """Everything received so far, without waiting."""
        out = []
        while True:
            try:
                out.append(self._updates.get_nowait())
            except queue.Empty:
                return out

    def on_update(self, callback: Callable[[Update], None]) -> None:
        """Call ``callback`` (on the node's thread; keep it quick) instead of queueing."""
        self._callback = callback

    def updates(self, timeout: float | None = None) -> Iterator[Update]:
        """Iterate over updates until none arrives within ``timeout`` seconds."""
        while (update := self.receive(timeout)) is not None:
            yield update


class AsyncioNode:
    """A node for asyncio code; the same operations as ``AsyncNode``, all awaitable."""

    def __init__(self, config: NodeConfig, task: TaskFactory | str | None = None) -> None:
        self.config = config
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Update] = asyncio.Queue(UPDATE_BUFFER)
        self._sync = Node(config, task=task)
        self._sync.on_update(self._deliver)

    def _deliver(self, update: Update) -> None:
        def put() -> None:
            try:
                self._queue.put_nowait(update)
            except asyncio.QueueFull:
                self._sync.dropped_updates += 1
                logger.warning(
                    "update from %s dropped: the application is not reading updates", update.sender
                )

        self._loop.call_soon_threadsafe(put)

    async def _start(self) -> None:
        await asyncio.to_thread(self._sync.__enter__)

    async def aclose(self) -> None:
        await asyncio.to_thread(self._sync.close)

    @property
    def peer_id(self) -> str:
        return self._sync.peer_id

    # Each call crosses into the node's trio thread, which may be busy: awaited in a worker
    # thread so that the caller's event loop never waits for it.
    async def peers(self) -> list[str]:
        return await asyncio.to_thread(self._sync.peers)

    async def members(self) -> list[str]:
        return await asyncio.to_thread(self._sync.members)

    async def status(self) -> dict[str, Any]:
        return await asyncio.to_thread(self._sync.status)

    async def set_round(self, round_: int) -> None:
        await asyncio.to_thread(self._sync.set_round, round_)

    async def swarm_rounds(self) -> dict[str, int]:
        return await asyncio.to_thread(self._sync.swarm_rounds)

    async def addrs(self) -> list[str]:
        return await asyncio.to_thread(lambda: self._sync.addrs)

    async def connect(self, address: str) -> str:
        return await asyncio.to_thread(self._sync.connect, address)

    async def share_model(
        self, model: StateDict, *, round: int | None = None, peers: Sequence[str] | None = None
    ) -> list[Delivery]:
        return await asyncio.to_thread(
            lambda: self._sync.share_model(model, round=round, peers=peers)
        )

    async def share(
        self, payload: Any, *, round: int | None = None, peers: Sequence[str] | None = None
    ) -> list[Delivery]:
        return await asyncio.to_thread(lambda: self._sync.share(payload, round=round, peers=peers))

    def merge(self, own: StateDict, updates: Sequence[Update | StateDict]) -> StateDict:
        return self._sync.merge(own, updates)

    async def average(
        self,
        model: StateDict,
        *,
        round: int,
        peers: Sequence[str] | None = None,
        timeout: float = 60.0,  # noqa: ASYNC109 - the all-reduce's two phases share it
    ) -> Averaged:
        return await asyncio.to_thread(
            lambda: self._sync.average(model, round=round, peers=peers, timeout=timeout)
        )

    async def receive(self) -> Update:
        return await self._queue.get()

    async def updates(self) -> AsyncIterator[Update]:
        while True:
            yield await self._queue.get()


@asynccontextmanager
async def open_node(
    config: NodeConfig, *, task: TaskFactory | str | None = None
) -> AsyncIterator[EmbeddedNode]:
    """``async with open_node(config) as node``: native under trio, a trio thread under asyncio.

    With ``task`` (a ``peerlearn.Task`` factory, or a name as ``--task`` takes), the node also
    trains that task in the swarm with the configured algorithm; ``status()["learning"]``
    shows its rounds and metrics."""
    library = sniffio.current_async_library()
    if library == "trio":
        async with _open_trio_node(config, task) as node:
            yield node
    elif library == "asyncio":
        node_ = AsyncioNode(config, task)
        await node_._start()
        try:
            yield node_
        finally:
            await node_.aclose()
    else:
        raise LocalProtocolError(f"open_node supports trio and asyncio, not {library}")


__all__ = [
    "AsyncNode",
    "AsyncioNode",
    "Averaged",
    "Delivery",
    "EmbeddedNode",
    "Node",
    "TrioNode",
    "Update",
    "open_node",
]
