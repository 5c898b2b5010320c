from __future__ import annotations

import contextlib
import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from peerlearn import wire
from peerlearn.buffers import to_bytes
from peerlearn.errors import RemoteProtocolError
from peerlearn.identity import Identity

ALICE = Identity.from_seed(b"a" * 32)
MALLORY = Identity.from_seed(b"m" * 32)
NOW = 1_800_000_000.0

msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=40),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=20,
)


DEFAULT_BODY = {"x": 1}


def sealed(body: object = DEFAULT_BODY, seq: int = 1, identity: Identity = ALICE) -> bytes:
    return wire.seal(identity, "update", body, seq=seq, timestamp=NOW)


@given(msgpack_values)
def test_envelope_round_trip(body: object) -> None:
    envelope = wire.open_envelope(sealed(body))
    assert envelope.body == body
    assert envelope.sender == ALICE.public_key
    assert envelope.sender_id == ALICE.peer_id
    assert (envelope.type, envelope.seq, envelope.timestamp) == ("update", 1, NOW)


@given(st.binary(max_size=400))
def test_random_bytes_decode_or_raise_remote_protocol_error(data: bytes) -> None:
    with contextlib.suppress(RemoteProtocolError):
        wire.open_envelope(data)


@given(st.data())
def test_mutated_envelopes_are_rejected(data: st.DataObject) -> None:
    original = bytearray(sealed({"round": 3, "weights": b"\x00" * 16}))
    mutation = data.draw(st.sampled_from(["flip", "truncate", "extend", "splice"]))
    if mutation == "flip":
        i = data.draw(st.integers(0, len(original) - 1))
        original[i] ^= data.draw(st.integers(1, 255))
    elif mutation == "truncate":
        del original[data.draw(st.integers(0, len(original) - 1)) :]
    elif mutation == "extend":
        original += data.draw(st.binary(min_size=1, max_size=20))
    else:
        i = data.draw(st.integers(0, len(original)))
        original[i:i] = data.draw(st.binary(min_size=1, max_size=20))
    # Every mutation changes signed bytes or breaks framing: none may be accepted.
    with pytest.raises(RemoteProtocolError):
        wire.open_envelope(bytes(original))


def _reencode(data: bytes, **changes: object) -> bytes:
    raw = wire.unpack(data)
    raw.update(changes)
    return wire.pack(raw)


def test_bad_signature_is_rejected_with_reason() -> None:
    forged = _reencode(sealed(), body=wire.pack({"x": 2}))
    with pytest.raises(RemoteProtocolError, match="bad signature"):
        wire.open_envelope(forged)


def test_sender_swap_is_rejected() -> None:
    forged = _reencode(sealed(identity=MALLORY), sender=ALICE.public_key)
    with pytest.raises(RemoteProtocolError, match="bad signature"):
        wire.open_envelope(forged)


def test_wrong_sender_for_the_stream_is_rejected() -> None:
    with pytest.raises(RemoteProtocolError, match="wrong sender"):
        wire.open_envelope(sealed(identity=MALLORY), expected_sender=ALICE.public_key)


def test_replayed_sequence_number_is_rejected() -> None:
    guard = wire.ReplayGuard()
    first = wire.open_envelope(sealed(seq=10))
    guard.check(first, NOW)
    guard.check(wire.open_envelope(sealed(seq=9)), NOW)  # reordering inside the window is fine
    with pytest.raises(RemoteProtocolError, match="replayed"):
        guard.check(first, NOW + 1)


def test_stale_and_future_messages_are_rejected() -> None:
    guard = wire.ReplayGuard(max_age=60, max_clock_skew=5)
    envelope = wire.open_envelope(sealed())
    with pytest.raises(RemoteProtocolError, match="stale"):
        guard.check(envelope, NOW + 61)
    with pytest.raises(RemoteProtocolError, match="future"):
        guard.check(envelope, NOW - 6)


def test_replay_guard_memory_is_bounded() -> None:
    guard = wire.ReplayGuard(window=8, max_senders=4)
    for i in range(10):
        sender = Identity.from_seed(bytes([i]) * 32)
        for seq in range(20):
            guard.check(wire.open_envelope(sealed(seq=seq, identity=sender)), NOW)
    assert len(guard._seen) <= 4
    assert all(len(seqs) <= 8 for _, seqs, _ in guard._seen.values())


def test_sequences_forgotten_beyond_the_window_are_rejected() -> None:
    guard = wire.ReplayGuard(window=4)
    for seq in range(100, 105):  # five seqs: 100 is forgotten, the floor is 100
        guard.check(wire.open_envelope(sealed(seq=seq)), NOW)
    for old in (90, 100):
        with pytest.raises(RemoteProtocolError, match="replayed"):
            guard.check(wire.open_envelope(sealed(seq=old)), NOW)


def test_concurrent_messages_arriving_out_of_order_are_accepted() -> None:
    # Regression: seqs are microsecond-based, so two messages sent 50 ms apart differ by
    # 50_000; the one sent first may arrive last and must not be taken for a replay.
    counter, guard = wire.SequenceCounter(NOW), wire.ReplayGuard()
    first, second = counter.next(NOW), counter.next(NOW + 0.05)
    guard.check(wire.open_envelope(sealed(seq=second)), NOW)
    guard.check(wire.open_envelope(sealed(seq=first)), NOW)


def test_sequence_counter_survives_restart() -> None:
    before = wire.SequenceCounter(NOW)
    last = [before.next(NOW) for _ in range(1000)][-1]
    after_restart = wire.SequenceCounter(NOW + 0.5)
    assert after_restart.next(NOW + 0.5) > last


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"\xd4\x01\x00", "ext"),  # fixext 1
        (b"\x81\x01\x02", "map key"),  # int map key
        (b"\x91", "truncated"),
        (b"\x90\x90", "trailing"),
        (b"\xdd\xff\xff\xff\xff", "truncated|exceeds"),  # array32 of 4G elements
    ],
)
def test_unpack_rejects_unsafe_msgpack(payload: bytes, reason: str) -> None:
    with pytest.raises(RemoteProtocolError, match=reason):
        wire.unpack(payload)


def test_unpack_limits() -> None:
    limits = wire.Limits(max_message_size=100, max_array_len=3, max_map_len=2)
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        wire.unpack(b"\xc4\x00" + b"x" * 200, limits)
    with pytest.raises(RemoteProtocolError):
        wire.unpack(wire.pack([1, 2, 3, 4]), limits)
    with pytest.raises(RemoteProtocolError):
        wire.unpack(wire.pack({"a": 1, "b": 2, "c": 3}), limits)
    assert wire.unpack(wire.pack([1, 2, 3]), limits) == [1, 2, 3]


def test_limits_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        wire.DEFAULT_LIMITS.max_map_len = 5  # type: ignore[misc]


@pytest.mark.parametrize("size", [0, 255, 256, 65535, 65536])
def test_segments_frame_bytes_as_pack_does(size: int) -> None:
    value = {"n": 1, "blob": bytes(range(256)) * (size // 256) + bytes(size % 256), "s": "x"}
    framed = wire.pack_segments({**value, "blob": memoryview(value["blob"])})
    assert to_bytes(framed) == wire.pack(value)
