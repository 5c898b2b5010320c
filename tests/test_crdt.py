"""CRDT laws (hypothesis) and rejection of forged entries."""

from __future__ import annotations

import contextlib
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from peerlearn import wire
from peerlearn.errors import LocalProtocolError, RemoteProtocolError
from peerlearn.gossip.crdt import (
    RECORD_NAMES,
    Entry,
    SwarmState,
    entries_from_wire,
    entries_to_wire,
    entry_from_wire,
    sign_entry,
)
from peerlearn.identity import Identity

SWARM = "test"
WRITERS = [Identity.from_seed(bytes([i + 1]) * 32) for i in range(4)]


@st.composite
def histories(draw: st.DrawFn) -> list[Entry]:
    """Entries written by several writers, each with its own growing lamport clock."""
    ops = draw(
        st.lists(
            st.tuples(
                st.integers(0, 3),
                st.sampled_from(RECORD_NAMES),
                st.integers(0, 5),
                st.integers(1, 3),
            ),
            max_size=25,
        )
    )
    clocks = [0] * len(WRITERS)
    entries = []
    for writer, name, value, step in ops:
        clocks[writer] += step
        entries.append(sign_entry(WRITERS[writer], SWARM, name, clocks[writer], {"v": value}))
    return entries


def replica(entries: list[Entry]) -> SwarmState:
    state = SwarmState(SWARM)
    state.merge(entries)
    return state


@given(histories(), histories())
def test_merge_is_commutative(a: list[Entry], b: list[Entry]) -> None:
    assert replica(a + b).entries == replica(b + a).entries


@given(histories(), histories(), histories())
def test_merge_is_associative(a: list[Entry], b: list[Entry], c: list[Entry]) -> None:
    left = replica(a + b)
    left.merge(c)
    right = replica(a)
    right.merge(replica(b + c).entries.values())
    assert left.state_hash() == right.state_hash()


@given(histories())
def test_merge_is_idempotent(a: list[Entry]) -> None:
    state = replica(a)
    before = state.state_hash()
    assert state.merge(a) == []
    assert state.state_hash() == before


@given(histories(), st.randoms(use_true_random=False))
def test_replicas_converge_after_reorder_duplicate_and_redelivery(
    entries: list[Entry], rnd: random.Random
) -> None:
    delivered = entries + rnd.sample(entries, len(entries) // 2)  # duplicates
    rnd.shuffle(delivered)
    lossy = [e for e in entries if rnd.random() < 0.5]  # drops, then anti-entropy repairs
    other = replica(lossy)
    other.merge(replica(delivered).missing_for(other.digest()))
    assert replica(delivered).state_hash() == other.state_hash() == replica(entries).state_hash()


def test_single_writer_records_overwrite_so_size_stays_bounded() -> None:
    state = SwarmState(SWARM)
    for beat in range(1000):
        state.write(WRITERS[0], "heartbeat", {"t": beat})
    assert len(state.entries) == 1
    assert state.get(WRITERS[0].public_key, "heartbeat") == {"t": 999}


def test_owner_cap_drops_the_least_active() -> None:
    state = SwarmState(SWARM, max_owners=2)
    for lamport, writer in enumerate(WRITERS[:3], start=1):
        state.merge_entry(sign_entry(writer, SWARM, "heartbeat", lamport, {}))
    assert state.owners() == {WRITERS[1].public_key, WRITERS[2].public_key}


def test_forged_entries_are_rejected() -> None:
    entry = sign_entry(WRITERS[0], SWARM, "round", 3, {"round": 7})
    assert entry_from_wire(entry.to_wire(), SWARM) == entry
    forged_value = entry.to_wire()
    forged_value[3] = {"round": 8}
    impersonation = entry.to_wire()
    impersonation[0] = WRITERS[1].public_key
    for bad in (forged_value, impersonation):
        with pytest.raises(RemoteProtocolError, match="forged"):
            entry_from_wire(bad, SWARM)
    with pytest.raises(RemoteProtocolError, match="forged"):
        entry_from_wire(entry.to_wire(), "another-swarm")  # no cross-swarm replay
    with pytest.raises(RemoteProtocolError, match="not allowed"):
        entry_from_wire([*entry.to_wire()[:1], "password", *entry.to_wire()[2:]], SWARM)


def test_oversized_or_unknown_records_are_refused_locally() -> None:
    with pytest.raises(LocalProtocolError, match="unknown record"):
        sign_entry(WRITERS[0], SWARM, "password", 1, {})
    with pytest.raises(LocalProtocolError, match="larger"):
        sign_entry(WRITERS[0], SWARM, "metrics", 1, {"blob": b"x" * 5000})


@given(st.binary(max_size=300))
def test_decoding_any_bytes_gives_entries_or_a_remote_error(data: bytes) -> None:
    with contextlib.suppress(RemoteProtocolError):
        entries_from_wire(data, SWARM, wire.DEFAULT_LIMITS)


def test_wire_round_trip_and_digest_validation() -> None:
    state = SwarmState(SWARM)
    entry = state.write(WRITERS[2], "member", {"addrs": ["/ip4/127.0.0.1/tcp/1"]})
    assert entries_from_wire(entries_to_wire([entry]), SWARM, wire.DEFAULT_LIMITS) == [entry]
    assert state.missing_for([]) == [entry]
    assert state.missing_for(state.digest()) == []
    with pytest.raises(RemoteProtocolError, match="digest"):
        state.missing_for([["not", "valid"]])
