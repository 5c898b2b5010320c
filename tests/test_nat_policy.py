"""The sans-I/O NAT traversal policy: reachability verdicts, hole-punch scheduling, blob paths."""

from __future__ import annotations

from peerlearn.nat.policy import (
    FOLLOWER_GRACE,
    MAX_PUNCH_ATTEMPTS,
    PRIVATE,
    PUBLIC,
    PUNCH_BACKOFF,
    PUNCH_RETRY_AFTER_FAIL,
    UNKNOWN,
    PathTracker,
    Reachability,
    blob_path_allowed,
)


def test_reachability_is_the_majority_of_distinct_servers_latest_verdicts() -> None:
    r = Reachability()
    assert r.status == UNKNOWN
    r.record("s1", False)
    assert r.status == PRIVATE  # one server is enough on a small swarm
    r.record("s2", True)
    assert r.status == UNKNOWN  # a tie decides nothing
    r.record("s1", True)  # s1 changed its mind: only its latest verdict counts
    assert r.status == PUBLIC
    assert r.servers == 2


def test_reachability_remembers_a_bounded_number_of_servers() -> None:
    r = Reachability()
    for i in range(100):
        r.record(f"s{i}", i % 2 == 0)
    assert r.servers <= 8


def test_relayed_peers_are_punched_with_backoff_until_the_attempts_run_out() -> None:
    t = PathTracker()
    assert t.observe({"p": "relayed", "q": "direct"}, 0.0) == ["p"]
    assert t.observe({"p": "relayed"}, 0.5) == []  # in progress
    t.punched("p", False, PUNCH_BACKOFF / 4)
    assert t.observe({"p": "relayed"}, PUNCH_BACKOFF / 2) == []  # backing off (from the start)
    now = PUNCH_BACKOFF

    for attempt in range(2, MAX_PUNCH_ATTEMPTS + 1):
        assert t.observe({"p": "relayed"}, now) == ["p"], attempt
        t.punched("p", False, now)
        now += PUNCH_BACKOFF
    assert t.observe({"p": "relayed"}, now) == []  # gave up: relay only
    summary = t.summary()
    assert summary["relayed_only"] == ["p"]
    assert summary["hole_punch_failures"] == 1
    assert t.observe({"p": "relayed"}, now + PUNCH_RETRY_AFTER_FAIL) == ["p"]  # tried again


def test_the_smaller_peer_id_leads_the_punch_and_the_other_follows_only_after_a_grace() -> None:
    t = PathTracker(local_peer="m")
    assert t.observe({"a": "relayed", "z": "relayed"}, 0.0) == ["z"]  # we lead to "z" only
    t.punched("z", True, 1.0)
    assert t.observe({"a": "relayed", "z": "direct"}, FOLLOWER_GRACE - 0.1) == []
    assert t.observe({"a": "relayed", "z": "direct"}, FOLLOWER_GRACE) == ["a"]  # "a" never led


def test_a_successful_punch_records_the_time_to_direct_and_forgets_gone_peers() -> None:
    t = PathTracker()
    t.observe({"p": "relayed"}, 10.0)
    t.punched("p", True, 13.5)
    summary = t.summary()
    assert summary["direct_peers"] == 1
    assert summary["hole_punch_successes"] == 1
    assert summary["seconds_to_direct"] == {"p": 3.5}
    t.observe({}, 20.0)
    assert t.peers == {}


def test_models_take_a_relay_only_when_allowed() -> None:
    assert blob_path_allowed("direct", relay_blobs=False)
    assert blob_path_allowed(None, relay_blobs=False)  # not connected yet: the dial decides
    assert not blob_path_allowed("relayed", relay_blobs=False)
    assert blob_path_allowed("relayed", relay_blobs=True)
