"""Every decoder of remote (or on-disk) input turns any bytes into a value or its declared
error, never anything else: mutated valid encodings, byte- and structure-level.

``make fuzz`` runs the same properties with many more examples (``PEERLEARN_FUZZ=1``).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from peerlearn import wire
from peerlearn.buffers import to_bytes
from peerlearn.errors import ConfigError, RemoteProtocolError
from peerlearn.gossip import modest, records, sync
from peerlearn.gossip.admission import invite_from_token, invite_from_wire, issue_invite
from peerlearn.gossip.crdt import (
    DigestPage,
    SwarmState,
    decode_entries,
    entries_to_wire,
    sign_entry,
)
from peerlearn.gossip.schemas import RECORD_NAMES, check_record
from peerlearn.identity import Identity
from peerlearn.learning import compression
from peerlearn.learning.choices import Compression
from peerlearn.learning.compression import LAYOUT_KEY, ErrorFeedback, like_from_layout
from peerlearn.learning.hygiene import check_received
from peerlearn.learning.task import TaskContext
from peerlearn.learning.task_model import TaskModel
from peerlearn.learning.tasks.digits import DigitsTask
from peerlearn.node import blob
from peerlearn.node.bulk_path import Invitation
from peerlearn.node.checkpoints import CheckpointError, CheckpointStore
from peerlearn.node.control import decode_request
from peerlearn.node.embedded import _received_tensors
from peerlearn.tensors import state_dict_and_metadata, state_dict_from_bytes, state_dict_to_bytes
from tests.adversarial.mutations import bytewise, mutated, mutated_safetensors, mutated_value

ALICE = Identity.from_seed(b"a" * 32)
SWARM = "fuzz"
NOW = 1_800_000_000.0
MODEL = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.zeros(2)}
MEMBER = sign_entry(ALICE, SWARM, "member", 5, {"addrs": ["/ip4/127.0.0.1/tcp/1"]})
OFFER_BODY = {"sha256": b"\x01" * 32, "size": 10, "kind": "model", "meta": {"round": 1}}


def only(errors: tuple[type[Exception], ...], decode: Callable[[Any], Any], data: Any) -> None:
    """``decode(data)`` returns or raises one of ``errors``; anything else fails the test."""
    with contextlib.suppress(*errors):
        decode(data)


VALID_ENVELOPE = wire.seal(ALICE, "update", {"x": [1, 2]}, seq=1, timestamp=NOW)


@given(mutated(VALID_ENVELOPE))
def test_envelope(data: bytes) -> None:
    only((RemoteProtocolError,), wire.open_envelope, data)


@given(mutated_value(OFFER_BODY))
def test_blob_offer_signed_by_a_hostile_peer(body: Any) -> None:
    """The sender signs whatever it likes: the offer's schema must still hold."""
    envelope = wire.open_envelope(wire.seal(ALICE, blob.OFFER_TYPE, body, seq=2, timestamp=NOW))
    only((RemoteProtocolError,), lambda e: blob.parse_offer(e, 2**20), envelope)


@given(mutated(blob.encode_reply(False, "busy")))
def test_blob_reply(data: bytes) -> None:
    only((RemoteProtocolError,), blob.decode_reply, data)


@given(mutated(blob.encode_reply(True, invitation=Invitation(4001, bytes(32), bytes(16)))))
def test_blob_reply_inviting_to_the_bulk_path(data: bytes) -> None:
    only((RemoteProtocolError,), blob.decode_reply, data)


@given(mutated(blob.encode_via(True)))
def test_blob_via(data: bytes) -> None:
    only((RemoteProtocolError,), blob.decode_via, data)


VALID_BATCH = entries_to_wire([MEMBER, sign_entry(ALICE, SWARM, "round", 6, {"round": 3})])


@given(mutated(VALID_BATCH))
def test_crdt_entry_batch_through_triage_and_merge(data: bytes) -> None:
    state = SwarmState(SWARM)
    try:
        entries = decode_entries(data, wire.DEFAULT_LIMITS)
    except RemoteProtocolError:
        return
    triage = state.triage(entries, NOW)  # never raises: rejections are collected
    assert all(isinstance(e, RemoteProtocolError) for _, e in triage.rejected)


@given(st.sampled_from(RECORD_NAMES), mutated_value({"addrs": [], "t": 1.0, "round": 1}))
def test_record_values_signed_by_their_owner(name: str, value: Any) -> None:
    only((RemoteProtocolError,), lambda v: check_record(name, v), value)


FRAMES = [
    sync.encode_hello(MEMBER),
    sync.encode_refused("busy"),
    sync.encode_want(DigestPage(None, b"\x05" * 32, [(b"\x01" * 32, "member", 3)])),
    *sync.encode_entries([MEMBER]),
]


@given(st.sampled_from(FRAMES).flatmap(mutated))
def test_sync_frame(data: bytes) -> None:
    only((RemoteProtocolError,), sync.decode_frame, data)


VALID_TENSORS = bytes(state_dict_to_bytes(MODEL))


@given(mutated_safetensors(VALID_TENSORS))
def test_tensors(data: bytes) -> None:
    only((RemoteProtocolError,), lambda d: state_dict_from_bytes(d, 2**20), data)


VALID_COMPRESSED = bytes(ErrorFeedback(Compression.parse("int8")).encode_bytes(MODEL))


@given(mutated_safetensors(VALID_COMPRESSED), st.sampled_from(["int8", "int4", "none", "x"]))
def test_compressed_model_sent_to_an_embedded_node(data: bytes, codec: str) -> None:
    """An embedded node holds no model: it rebuilds in the layout the bytes state."""
    offer = blob.BlobOffer(b"\x01" * 32, len(data), "model", {"compression": codec})
    received = blob.ReceivedBlob(ALICE.peer_id, offer, data)
    only((RemoteProtocolError,), lambda r: _received_tensors(r, 2**20), received)


COMPRESSED_WIRE, COMPRESSED_METADATA = state_dict_and_metadata(VALID_COMPRESSED, 2**20)


LAYOUT = COMPRESSED_METADATA[LAYOUT_KEY]


@given(
    bytewise(LAYOUT.encode()).map(lambda b: b.decode(errors="replace"))
    | mutated_value(json.loads(LAYOUT)).map(lambda v: json.dumps(v, default=repr, skipkeys=True))
)
def test_stated_layout_of_a_compressed_model(layout: str) -> None:
    def rebuild(text: str) -> None:
        like = like_from_layout({LAYOUT_KEY: text}, 2**20)
        compression.decode(COMPRESSED_WIRE, like, Compression.parse("int8"))

    only((RemoteProtocolError,), rebuild, layout)


@given(st.sampled_from([float("nan"), float("inf"), 1e30, -1e30, 0.0]))
def test_received_models_are_finite_and_bounded(value: float) -> None:
    hostile = {n: torch.full_like(t, value) for n, t in MODEL.items()}
    only((RemoteProtocolError,), lambda m: check_received(m, MODEL), hostile)


DIGITS = TaskModel(DigitsTask(TaskContext()), torch.Generator().manual_seed(0))
VALID_CHECKPOINT = to_bytes(DIGITS.checkpoint(3, DIGITS.state(), {"accuracy": 0.5}))


@given(mutated(VALID_CHECKPOINT))
def test_checkpoint_content(data: bytes) -> None:
    only((ConfigError,), DIGITS.restore, data)


@given(mutated(VALID_CHECKPOINT), mutated(VALID_CHECKPOINT))
def test_checkpoint_files_fall_back_or_refuse_in_one_line(latest: bytes, previous: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        store = CheckpointStore(Path(folder) / "checkpoint.msgpack")
        store.save(previous)
        store.save(latest)
        with contextlib.suppress(CheckpointError):
            loaded = store.load(DIGITS.restore)
            assert loaded is not None


@given(mutated(wire.pack({"op": "status", "args": {}})))
def test_control_request(data: bytes) -> None:
    only((RemoteProtocolError,), decode_request, data)


VALID_INVITE = issue_invite(ALICE, SWARM, Identity.from_seed(b"b" * 32).public_key).to_wire()


@given(mutated(VALID_INVITE))
def test_invite(data: bytes) -> None:
    only((RemoteProtocolError,), invite_from_wire, data)


@given(st.text(max_size=80) | st.just(issue_invite(ALICE, SWARM, ALICE.public_key).token))
def test_invite_token_typed_by_an_operator(token: str) -> None:
    only((ConfigError,), invite_from_token, token)


@given(
    st.sampled_from(
        [modest.encode_small(m) for m in (modest.Ping(1, 2), modest.AggAck(3, True))]
        + [modest.encode_small(modest.Membership(1, 2, modest.JOIN))]
    ).flatmap(mutated_value)
)
def test_modest_small_message(body: Any) -> None:
    only((RemoteProtocolError,), modest.decode_small, body)


VALID_META = modest.encode_model_meta(
    modest.TrainedModel(4, None, {b"\x02" * 32: modest.ViewEntry(3, 1, modest.JOIN)})
)


@given(mutated_value(VALID_META))
def test_modest_model_meta(meta: Any) -> None:
    only((RemoteProtocolError,), lambda m: modest.decode_model_meta(m, None), meta)


VALID_RECORD_KEY, VALID_RECORD = records.make_peer_record(
    ALICE, SWARM, ["/ip4/1.2.3.4/tcp/1"], 1, NOW
)


@given(mutated(VALID_RECORD))
def test_dht_record(data: bytes) -> None:
    only((RemoteProtocolError,), lambda d: records.validate_record(VALID_RECORD_KEY, d), data)


@pytest.mark.parametrize(
    "mixed",
    [
        {"op": "status", b"args": {}},
        {"ok": True, b"reason": ""},
        {"ok": True, "reason": "", b"bulk": {}},
        {"t": "hello", b"member": 1},
        {"via": "bulk", b"x": 1},
    ],
)
def test_maps_with_mixed_key_types_are_a_remote_error_not_a_type_error(mixed: Any) -> None:
    data = wire.pack(mixed)
    for decode in (decode_request, blob.decode_reply, blob.decode_via, sync.decode_frame):
        with pytest.raises(RemoteProtocolError):
            decode(data)
