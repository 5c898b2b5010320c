"""How the learning drivers reach peers: models as blobs, MoDeST's small messages as envelopes.

* models (any algorithm): safetensors bytes over ``/peerlearn/blob/1`` (``node.blob``), the
  round's metadata inside the signed offer;
* MoDeST's small messages (ping, pong, ack, membership): one signed envelope of type
  ``modest`` per stream over ``/peerlearn/msg/1``, replay-checked.

What arrives is handed to whichever driver listens (``on_message``); the transport decides
nothing about learning.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import trio

from peerlearn import wire
from peerlearn.errors import NetworkError, RemoteProtocolError
from peerlearn.identity import Identity, peer_id_from_public_key
from peerlearn.learning.aggregate import StateDict
from peerlearn.node import blob
from peerlearn.node.config import NodeConfig
from peerlearn.node.framing import Pace, receive_frame, send_frame
from peerlearn.node.host_api import Host, Stream
from peerlearn.node.offload import Offload
from peerlearn.tensors import state_dict_to_bytes

logger = logging.getLogger(__name__)

MSG_PROTOCOL = "/peerlearn/msg/1"
MODEL_KIND = "model"  # gossip / D-PSGD models (and the embedding API's)
MODEST_KIND = "modest"  # MoDeST's trained and aggregated models
MODEST_MESSAGE = "modest"
MESSAGE_TIMEOUT = 10.0  # seconds per small message
_MSG_LIMITS = wire.Limits(max_message_size=4096)

SmallMessageHandler = Callable[[bytes, Any], None]  # (sender's public key, body)


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
    ) -> None:
        """``wall_clock``: the time signed into envelopes and checked against replays;
        ``offload`` runs the encoding of models."""
        self.config = config
        self.host = host
        self.identity: Identity = host.identity
        self.pace = pace
        self.sequence = sequence
        self.replay_guard = replay_guard
        self.on_bytes = on_bytes
        self.wall_clock = wall_clock
        self.offload = offload
        self.models_sent = 0
        self.models_received = 0
        self.on_message: SmallMessageHandler | None = None
        self._encoding = trio.Lock()
        self._last_encoded: tuple[StateDict, bytes] | None = None
        host.set_handler(MSG_PROTOCOL, self._serve_message)

    async def push_model(
        self, peer_pk: bytes, model: StateDict, kind: str, meta: dict[str, Any]
    ) -> bool:
        """Send a model to one peer over the blob protocol; False (logged) if not delivered."""
        peer_id = peer_id_from_public_key(peer_pk)
        payload = await self.encoded(model)
        error = await blob.deliver(
            self.host,
            self.sequence,
            peer_id,
            payload,
            kind=kind,
            meta=meta,
            config=self.config,
            wall_clock=self.wall_clock,
        )
        if error is not None:
            logger.info("model to %s not delivered: %s", peer_id, error)
            return False
        self.models_sent += 1
        self.on_bytes(len(payload), 0)
        return True

    async def encoded(self, model: StateDict) -> bytes:
        """``model`` as safetensors bytes, encoded once (off the event loop) however many
        peers it goes to: a round's model is pushed to several peers and announced too."""
        async with self._encoding:
            last = self._last_encoded
            if last is not None and last[0] is model:
                return last[1]
            payload = await self.offload(state_dict_to_bytes, model)
            self._last_encoded = (model, payload)  # the model held: its identity stays valid
            return payload

    def model_received(self, size: int) -> None:
        self.models_received += 1
        self.on_bytes(0, size)

    async def send_message(self, peer_pk: bytes, body: dict[str, Any]) -> bool:
        """One small signed message; False (logged at debug) if it could not be delivered."""
        peer_id = peer_id_from_public_key(peer_pk)
        now = self.wall_clock()
        envelope = wire.seal(
            self.identity, MODEST_MESSAGE, body, seq=self.sequence.next(now), timestamp=now
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
            data = await receive_frame(stream, _MSG_LIMITS.max_message_size, self.pace)
            envelope = wire.open_envelope(
                data, _MSG_LIMITS, expected_sender=stream.remote_public_key
            )
            self.replay_guard.check(envelope, self.wall_clock())
            if envelope.type != MODEST_MESSAGE:
                raise RemoteProtocolError(f"unexpected {envelope.type[:40]!r} message")
            if self.on_message is None:  # not learning yet (or not MoDeST): nothing to answer
                logger.debug("MoDeST message from %s before we started", stream.remote_peer_id)
                return
            self.on_message(envelope.sender, envelope.body)
        finally:
            await stream.close()
