"""The swarm-state CRDT: laws (hypothesis), bounded clocks, triage, eviction, paged digests."""

from __future__ import annotations

import contextlib
import random
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from peerlearn import wire
from peerlearn.errors import LocalProtocolError, Offence, RemoteProtocolError
from peerlearn.gossip.admission import (
    Admission,
    AdmissionMode,
    issue_invite,
    pow_valid,
    solve_pow,
)
from peerlearn.gossip.crdt import (
    MAX_CLOCK,
    DigestPage,
    Entry,
    SwarmState,
    clock_at,
    decode_entries,
    entries_to_wire,
    sign_entry,
    verify_entries,
)
from peerlearn.gossip.schemas import RECORD_NAMES
from peerlearn.identity import Identity

SWARM = "test"
NOW = 1_800_000_000.0
WRITERS = [Identity.from_seed(bytes([i + 1]) * 32) for i in range(4)]
MEMBERS = [sign_entry(w, SWARM, "member", 1, {"addrs": []}) for w in WRITERS]


@st.composite
def histories(draw: st.DrawFn) -> list[Entry]:
    """Entries written by several writers, each with its own growing clock."""
    ops = draw(
        st.lists(
            st.tuples(
                st.integers(0, 3),
                st.sampled_from(RECORD_NAMES[1:]),
                st.integers(0, 5),
                st.integers(1, 3),
            ),
            max_size=25,
        )
    )
    clocks = [1] * len(WRITERS)
    entries = []
    for writer, name, value, step in ops:
        clocks[writer] += step
        entries.append(sign_entry(WRITERS[writer], SWARM, name, clocks[writer], {"v": value}))
    return entries


def replica(entries: list[Entry]) -> SwarmState:
    state = SwarmState(SWARM)
    state.merge(MEMBERS)
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


def pull(into: SwarmState, source: SwarmState, owners_per_page: int) -> None:
    """What one anti-entropy session moves, page by page."""
    for page in into.digest_pages(owners_per_page):
        into.merge(list(source.missing_for(page)))


@given(histories(), st.randoms(use_true_random=False), st.integers(1, 5))
def test_replicas_converge_after_reorder_duplicate_drops_and_paged_anti_entropy(
    entries: list[Entry], rnd: random.Random, owners_per_page: int
) -> None:
    delivered = entries + rnd.sample(entries, len(entries) // 2)  # duplicates
    rnd.shuffle(delivered)
    lossy = [e for e in entries if rnd.random() < 0.5]  # drops, then anti-entropy repairs
    other = SwarmState(SWARM)
    other.merge([m for m in MEMBERS if rnd.random() < 0.5])
    other.merge(lossy)
    pull(other, replica(delivered), owners_per_page)
    assert replica(delivered).state_hash() == other.state_hash() == replica(entries).state_hash()


def test_digest_pages_cover_every_owner_range() -> None:
    source = replica([])
    empty = SwarmState(SWARM)
    pages = list(empty.digest_pages(2))
    assert pages == [DigestPage(None, None, [])]
    assert {e.key for e in source.missing_for(pages[0])} == {m.key for m in MEMBERS}
    ranges = [(p.lo, p.hi) for p in source.digest_pages(3)]
    owners = sorted(w.public_key for w in WRITERS)
    assert ranges == [(None, owners[3]), (owners[3], None)]


def test_single_writer_records_overwrite_so_size_stays_bounded() -> None:
    state = SwarmState(SWARM)
    for beat in range(1000):
        state.write(WRITERS[0], "heartbeat", {"t": beat}, NOW)
    assert len(state.entries) == 1
    assert state.get(WRITERS[0].public_key, "heartbeat") == {"t": 999}


def test_a_future_clock_is_refused_so_no_replica_freezes() -> None:
    """One signed entry at clock 2**63-1 used to freeze every replica: all later writes were
    at 2**63, which nobody accepts."""
    state = SwarmState(SWARM)
    state.write(WRITERS[0], "member", {"addrs": []}, NOW)
    attacker = WRITERS[1]
    hostile = [
        sign_entry(attacker, SWARM, "member", MAX_CLOCK, {"addrs": []}),
        sign_entry(attacker, SWARM, "member", clock_at(NOW + 3600), {"addrs": []}),
    ]
    triage = state.triage(hostile, NOW)
    assert triage.candidates == []
    assert [e.offence for _, e in triage.rejected] == [Offence.REPLAYED] * 2
    assert "future" in str(triage.rejected[0][1])
    entry = state.write(WRITERS[0], "round", {"round": 1}, NOW + 1)
    assert entry.clock < MAX_CLOCK
    # Slightly fast clocks (within the skew) are fine, and our next write still wins.
    ahead = sign_entry(WRITERS[0], SWARM, "round", clock_at(NOW + 30), {"round": 2})
    assert state.merge(state.triage([ahead], NOW).candidates) == [ahead]
    assert state.write(WRITERS[0], "round", {"round": 3}, NOW + 2).wins_over(ahead)


def test_triage_checks_schemas_membership_and_novelty_before_signatures() -> None:
    state = replica([])
    outsider = Identity.from_seed(b"o" * 32)
    fresh = sign_entry(WRITERS[0], SWARM, "round", 5, {"round": 5})
    stale = sign_entry(WRITERS[0], SWARM, "member", 0, {"addrs": []})
    malformed = sign_entry(WRITERS[1], SWARM, "round", 5, {"round": -1})
    unknown = sign_entry(outsider, SWARM, "heartbeat", 5, {"t": 1.0})
    newcomer_beat = sign_entry(outsider, SWARM, "heartbeat", 6, {"t": 2.0})
    newcomer = sign_entry(outsider, SWARM, "member", 6, {"addrs": ["/ip4/1.2.3.4/tcp/1"]})
    first = state.triage([fresh, stale, malformed, unknown], NOW)
    assert first.candidates == [fresh]
    assert (first.known, first.unknown_owner) == (1, 1)
    assert [e for e, _ in first.rejected] == [malformed]
    # A member record admits the same owner's other records in the same batch.
    second = state.triage([newcomer_beat, newcomer], NOW)
    assert second.candidates == [newcomer, newcomer_beat]


def test_admission_rules_apply_to_member_records() -> None:
    authority = Identity.from_seed(b"A" * 32)
    invited, uninvited = WRITERS[0], WRITERS[1]
    invite = issue_invite(authority, SWARM, invited.public_key).to_wire()
    stolen = sign_entry(uninvited, SWARM, "member", 1, {"addrs": [], "invite": invite})
    token = SwarmState(
        SWARM, admission=Admission(AdmissionMode.TOKEN, authority=authority.public_key)
    )
    good = sign_entry(invited, SWARM, "member", 1, {"addrs": [], "invite": invite})
    none = sign_entry(uninvited, SWARM, "member", 1, {"addrs": []})
    triage = token.triage([good, stolen, none], NOW)
    assert triage.candidates == [good]
    offences = sorted(e.offence for _, e in triage.rejected)
    assert offences == sorted([Offence.FORGED, Offence.NOT_MEMBER])
    allow = SwarmState(
        SWARM,
        admission=Admission(AdmissionMode.ALLOWLIST, allowlist=frozenset({invited.public_key})),
    )
    assert allow.triage([good, none], NOW).candidates == [good]


def test_owner_cap_drops_the_least_active_but_never_ourselves() -> None:
    me = WRITERS[0]
    state = SwarmState(SWARM, max_owners=2, protect=me.public_key)
    state.merge([sign_entry(me, SWARM, "member", 1, {"addrs": []})])
    for clock, writer in enumerate(WRITERS[1:], start=2):
        state.merge([sign_entry(writer, SWARM, "member", clock, {"addrs": []})])
    assert set(state.owners()) == {me.public_key, WRITERS[3].public_key}
    assert state.evicted_owners == 2


def test_established_owners_are_never_evicted_for_members_we_only_heard_of() -> None:
    me, met, heard = WRITERS[0], WRITERS[1], WRITERS[2:]
    state = SwarmState(SWARM, max_owners=2, protect=me.public_key)
    state.merge([sign_entry(me, SWARM, "member", 1, {"addrs": []})])
    state.merge([sign_entry(met, SWARM, "member", 2, {"addrs": []})])
    state.establish(met.public_key)  # a sync session with it, or a model from it
    for clock, writer in enumerate(heard, start=3):  # newer, so "more active"
        state.merge([sign_entry(writer, SWARM, "member", clock, {"addrs": []})])
    assert set(state.owners()) == {me.public_key, met.public_key}
    assert state.is_established(met.public_key)
    assert state.evicted_owners == 2


def test_a_record_dated_ahead_counts_as_active_only_from_when_it_arrived() -> None:
    """Fakes dated 59 s ahead used to look more active than every honest member."""
    honest, fake = WRITERS[1], WRITERS[2]
    state = SwarmState(SWARM, max_owners=2, protect=WRITERS[0].public_key)
    state.merge([sign_entry(WRITERS[0], SWARM, "member", clock_at(NOW), {"addrs": []})], NOW)
    ahead = sign_entry(fake, SWARM, "member", clock_at(NOW + 59), {"addrs": []})
    state.merge(state.triage([ahead], NOW).candidates, NOW)
    beat = sign_entry(honest, SWARM, "member", clock_at(NOW + 1), {"addrs": []})
    state.merge([beat], NOW + 1)  # a second later, dated honestly: the more active one
    assert set(state.owners()) == {WRITERS[0].public_key, honest.public_key}


def test_members_must_carry_their_proof_of_work_checked_before_the_signature() -> None:
    bits = 8
    state = SwarmState(SWARM, admission=Admission(pow_bits=bits))
    writer = WRITERS[1]
    nonce = solve_pow(SWARM, writer.public_key, bits)
    assert pow_valid(SWARM, writer.public_key, nonce, bits)
    assert not pow_valid("another-swarm", writer.public_key, nonce, bits)
    good = sign_entry(writer, SWARM, "member", 5, {"addrs": [], "pow": nonce})
    lazy = sign_entry(WRITERS[2], SWARM, "member", 5, {"addrs": []})
    stolen = sign_entry(WRITERS[3], SWARM, "member", 5, {"addrs": [], "pow": nonce})
    unsigned = Entry(good.owner, good.name, good.clock, good.value, bytes(64))
    triage = state.triage([good, lazy, stolen, unsigned], NOW)
    assert triage.candidates == [good, unsigned]  # the signature is the next, dearer step
    offences = {error.offence for _, error in triage.rejected}
    assert offences == {Offence.NOT_MEMBER}
    assert len(triage.rejected) == 2


def test_a_flood_of_members_costs_log_n_per_entry() -> None:
    """10,000 fake members took 35 s of event loop when eviction cost owners x entries."""
    state = SwarmState(SWARM, max_owners=1000)
    flood = [
        Entry(bytes(32 - 4) + i.to_bytes(4, "big"), "member", i, {"addrs": []}, bytes(64))
        for i in range(20_000)
    ]
    started = time.perf_counter()
    state.merge(flood)
    elapsed = time.perf_counter() - started
    assert len(state.owners()) == 1000
    assert elapsed < 2.0, f"merging 20,000 members took {elapsed:.2f} s"


def test_verification_catches_forgery_impersonation_and_cross_swarm_replay() -> None:
    entry = sign_entry(WRITERS[0], SWARM, "round", 3, {"round": 7})
    forged_value = Entry(entry.owner, entry.name, entry.clock, {"round": 8}, entry.signature)
    impersonation = Entry(WRITERS[1].public_key, "round", 3, {"round": 7}, entry.signature)
    verified, forged = verify_entries(SWARM, [entry, forged_value, impersonation])
    assert verified == [entry]
    assert forged == [forged_value, impersonation]
    assert verify_entries("another-swarm", [entry]) == ([], [entry])


def test_oversized_or_unknown_records_are_refused_locally() -> None:
    with pytest.raises(LocalProtocolError, match="unknown record"):
        sign_entry(WRITERS[0], SWARM, "password", 1, {})
    with pytest.raises(LocalProtocolError, match="larger"):
        sign_entry(WRITERS[0], SWARM, "metrics", 1, {"blob": b"x" * 5000})


def test_wire_round_trip_and_structure_checks() -> None:
    state = SwarmState(SWARM)
    entry = state.write(WRITERS[2], "member", {"addrs": ["/ip4/127.0.0.1/tcp/1"]}, NOW)
    assert decode_entries(entries_to_wire([entry]), wire.DEFAULT_LIMITS) == [entry]
    bad_name = [*entry.to_wire()[:1], "password", *entry.to_wire()[2:]]
    with pytest.raises(RemoteProtocolError, match="not allowed"):
        decode_entries(wire.pack([bad_name]), wire.DEFAULT_LIMITS)


@given(st.binary(max_size=300))
def test_decoding_any_bytes_gives_entries_or_a_remote_error(data: bytes) -> None:
    with contextlib.suppress(RemoteProtocolError):
        decode_entries(data, wire.DEFAULT_LIMITS)
