"""How the learning drivers reach peers: models as blobs, MoDeST's small messages as envelopes.

* models (any algorithm): safetensors bytes over ``/peerlearn/blob/3`` (``node.blob``), the
  round's metadata inside the signed offer; with ``compression`` set, the compressed model
  (``learning.compression``), its codec named in the metadata under ``compression``;
* MoDeST's small messages (ping, pong, ack, membership): signed envelopes of type
  ``modest``, replay-checked, over ``/peerlearn/msg/2``: one stream per peer carries them
  one after another (a node sending many no longer pays a stream negotiation for each).
  The sender closes a stream unused for ``MESSAGE_STREAM_IDLE`` s and opens a new one when
  it next has something to say; the receiver waits ``MESSAGE_STREAM_WAIT`` s at most (the
  longer of the two, so a sender never writes into a stream the receiver has left).

What arrives is handed to whichever driver listens (``on_message``); the transport decides
nothing about learning.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import trio

from peerlearn import wire
from peerlearn.buffers import sha256
from peerlearn.errors import NetworkError, RemoteProtocolError
from peerlearn.identity import Identity, peer_id_from_public_key
from peerlearn.learning.aggregate import StateDict
from peerlearn.learning.choices import Compression
from peerlearn.learning.compression import ErrorFeedback
from peerlearn.node import blob
from peerlearn.node.bulk_path import BulkPath
from peerlearn.node.config import NodeConfig
from peerlearn.node.framing import Pace, receive_next_frame, send_frame
from peerlearn.node.host_api import Host, Stream
from peerlearn.node.offload import Offload
from peerlearn.tensors import state_dict_segments, state_dict_to_bytes_and_digest

logger = logging.getLogger(__name__)

MSG_PROTOCOL = "/peerlearn/msg/2"
MODEL_KIND = "model"  # gossip / D-PSGD models (and the embedding API's)
MODEST_KIND = "modest"  # MoDeST's trained and aggregated models
MODEST_MESSAGE = "modest"
COMPRESSION_KEY = "compression"  # in a model's metadata: the codec it was sent with
MESSAGE_TIMEOUT = 10.0  # seconds per small message
MESSAGE_STREAM_IDLE = 20.0  # seconds a sender keeps an unused message stream
MESSAGE_STREAM_WAIT = 60.0  # seconds a receiver waits for a stream's next message
_MSG_LIMITS = wire.Limits(max_message_size=4096)

SmallMessageHandler = Callable[[bytes, Any], None]  # (sender's public key, body)


class _Outbox:
    """The stream small messages to one peer go over, one message at a time."""

    def __init__(self) -> None:
        self.lock = trio.Lock()
        self.stream: Stream | None = None
        self.last_used = 0.0

    async def drop(self) -> None:
        stream, self.stream = self.stream, None
        if stream is not None:
            await stream.close()


class LearningTransport:
    """One node's model pushes and small messages; counts what it moved."""

    def __init__(
        self,
        config: NodeConfig,
        host: Host,
        pace: Pace,
        sequence: wire.SequenceCounter,
        replay_guard: wire.ReplayGuard,
        on_bytes: Callable[[int, int], None],
        wall_clock: Callable[[], float],
        offload: Offload,
        bulk: BulkPath | None = None,
        reference: StateDict | None = None,
    ) -> None:
        """``wall_clock``: the time signed into envelopes and checked against replays;
        ``offload`` runs the encoding of models; ``bulk`` carries large models;
        ``reference``: the model compressed models are sent against (MoDeST's shared start;
        zeros if None)."""
        self.config = config
        self.host = host
        self.identity: Identity = host.identity
        self.pace = pace
        self.sequence = sequence
        self.replay_guard = replay_guard
        self.on_bytes = on_bytes
        self.wall_clock = wall_clock
        self.offload = offload
        self.bulk = bulk
        self.models_sent = 0
        self.model_bytes_sent = 0  # of the models delivered, as sent (compressed or not)
        self.models_received = 0
        self.on_message: SmallMessageHandler | None = None
        self.compression = Compression.parse(config.compression)
        self.reference = reference
        self._feedback = ErrorFeedback(self.compression) if self.compression.enabled else None
        self._encoding = trio.Lock()
        # the last model encoded whole (announced), and the last one as sent to peers
        self._last: dict[str, tuple[StateDict, memoryview, bytes]] = {}
        self._outboxes: dict[str, _Outbox] = {}
        host.set_handler(MSG_PROTOCOL, self._serve_messages)

    async def push_model(
        self, peer_pk: bytes, model: StateDict, kind: str, meta: dict[str, Any]
    ) -> bool:
        """Send a model to one peer over the blob protocol; False (logged) if not delivered."""
        peer_id = peer_id_from_public_key(peer_pk)
        payload, digest = await self._sent_form(model)
        if self._feedback is not None:
            meta = {**meta, COMPRESSION_KEY: str(self.compression)}
        error = await blob.deliver(
            self.host,
            self.sequence,
            peer_id,
            payload,
            kind=kind,
            meta=meta,
            config=self.config,
            wall_clock=self.wall_clock,
            bulk=self.bulk,
            sha256=digest,
        )
        if error is not None:
            logger.info("model to %s not delivered: %s", peer_id, error)
            return False
        self.models_sent += 1
        self.model_bytes_sent += len(payload)
        self.on_bytes(len(payload), 0)
        return True

    async def _encoded(self, model: StateDict) -> tuple[memoryview, bytes]:
        """``model`` as safetensors bytes and their sha256, computed once (off the event
        loop) however many peers it goes to: a round's model is pushed to several peers
        and announced too."""
        return await self._encode_once(
            "whole", model, lambda: state_dict_to_bytes_and_digest(model)
        )

    async def digest(self, model: StateDict) -> bytes:
        """The sha256 of ``model``'s safetensors encoding (what the swarm is told): that of
        the encoding peers get when models go whole, else hashed from the tensors where
        they lie, without an encoded copy."""
        if self._feedback is None:
            return (await self._encoded(model))[1]
        return await self.offload(lambda: sha256(state_dict_segments(model)))

    async def _sent_form(self, model: StateDict) -> tuple[memoryview, bytes]:
        """What peers get of ``model``: its encoding, or compressed (error feedback then
        moves on once per model, however many peers it goes to)."""
        feedback = self._feedback
        if feedback is None:
            return await self._encoded(model)

        def compress() -> tuple[memoryview, bytes]:
            payload = feedback.encode_bytes(model, self.reference)
            return payload, sha256(payload)

        return await self._encode_once("sent", model, compress)

    async def _encode_once(
        self, form: str, model: StateDict, encode: Callable[[], tuple[memoryview, bytes]]
    ) -> tuple[memoryview, bytes]:
        """``encode()`` (bytes and their sha256) for ``model``, or what it gave last time
        for this same model."""
        async with self._encoding:
            last = self._last.get(form)
            if last is not None and last[0] is model:
                return last[1], last[2]
            payload, digest = await self.offload(encode)
            # the model held: its identity stays valid
            self._last[form] = (model, payload, digest)
            return payload, digest

    def model_received(self, size: int) -> None:
        self.models_received += 1
        self.on_bytes(0, size)

    async def send_message(self, peer_pk: bytes, body: dict[str, Any]) -> bool:
        """One small signed message, over the peer's message stream (opened if there is none
        or it sat unused); False (logged at debug) if it could not be delivered."""
        peer_id = peer_id_from_public_key(peer_pk)
        now = self.wall_clock()
        envelope = wire.seal(
            self.identity, MODEST_MESSAGE, body, seq=self.sequence.next(now), timestamp=now
        )
        outbox = self._outboxes.setdefault(peer_id, _Outbox())
        try:
            with trio.fail_after(MESSAGE_TIMEOUT):
                async with outbox.lock:
                    await self._send_over(outbox, peer_id, envelope)
        except (NetworkError, trio.TooSlowError) as exc:
            logger.debug("message to %s not delivered: %s", peer_id, exc)
            if self._outboxes.get(peer_id) is outbox and outbox.stream is None:
                del self._outboxes[peer_id]  # the next message opens a new stream
            return False
        return True

    async def _send_over(self, outbox: _Outbox, peer_id: str, envelope: bytes) -> None:
        if (
            outbox.stream is not None
            and trio.current_time() - outbox.last_used > MESSAGE_STREAM_IDLE
        ):
            await outbox.drop()
        if outbox.stream is not None:
            try:
                await self._write(outbox, outbox.stream, envelope)
                return
            except NetworkError:  # the stream broke since its last message: one more try
                pass
        await self._write(outbox, await self.host.open_stream(peer_id, MSG_PROTOCOL), envelope)

    @staticmethod
    async def _write(outbox: _Outbox, stream: Stream, envelope: bytes) -> None:
        outbox.stream = None  # until the frame is out whole
        try:
            await send_frame(stream, envelope)
        except BaseException:
            with trio.CancelScope(shield=True):  # no frame may follow a partial one
                await stream.close()
            raise
        outbox.stream, outbox.last_used = stream, trio.current_time()

    async def close_message_streams(self) -> None:
        """Close every open message stream (the node is stopping)."""
        outboxes, self._outboxes = self._outboxes, {}
        for outbox in outboxes.values():
            await outbox.drop()

    async def _serve_messages(self, stream: Stream) -> None:
        """A peer's small signed messages, one after another, until it closes the stream or
        falls silent; what is wrong with one is raised for the host to count (and ends the
        stream)."""
        try:
            while True:
                data = await receive_next_frame(
                    stream, _MSG_LIMITS.max_message_size, self.pace, MESSAGE_STREAM_WAIT
                )
                if data is None:
                    return
                self._handle_message(stream, data)
        finally:
            await stream.close()

    def _handle_message(self, stream: Stream, data: bytes) -> None:
        envelope = wire.open_envelope(data, _MSG_LIMITS, expected_sender=stream.remote_public_key)
        self.replay_guard.check(envelope, self.wall_clock())
        if envelope.type != MODEST_MESSAGE:
            raise RemoteProtocolError(f"unexpected {envelope.type[:40]!r} message")
        if self.on_message is None:  # not learning yet (or not MoDeST): nothing to answer
            logger.debug("MoDeST message from %s before we started", stream.remote_peer_id)
            return
        self.on_message(envelope.sender, envelope.body)
