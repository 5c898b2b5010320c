"""MoDeST sampling and protocol core, driven by hand with a manual clock (no I/O)."""

from __future__ import annotations

import collections
import random

import pytest

from peerlearn.gossip import modest
from peerlearn.gossip.modest import (
    AggAck,
    AggregatedModel,
    AggregateRequest,
    CancelTraining,
    ModestNode,
    ModestSettings,
    Ping,
    Pong,
    RoundAggregated,
    TrainedModel,
    TrainRequest,
    View,
    ViewEntry,
)

PEERS = [bytes([i]) * 32 for i in range(20)]


def test_order_is_deterministic_and_independent_of_input_order() -> None:
    shuffled = PEERS[:]
    random.Random(1).shuffle(shuffled)
    assert modest.ordered(7, PEERS) == modest.ordered(7, shuffled)
    assert modest.ordered(7, PEERS) != modest.ordered(8, PEERS)


def test_one_peer_joining_or_leaving_keeps_the_others_in_order() -> None:
    for round_ in range(1, 50):
        full = modest.ordered(round_, PEERS)
        without = modest.ordered(round_, PEERS[1:])
        assert [p for p in full if p != PEERS[0]] == without
        before, after = (
            set(modest.sample(round_, PEERS[1:], 5)),
            set(modest.sample(round_, PEERS, 5)),
        )
        assert len(before ^ after) <= 2  # at most one peer swapped


def test_selection_is_uniform_over_rounds() -> None:
    counts = collections.Counter(pk for r in range(1, 4001) for pk in modest.sample(r, PEERS, 5))
    expected = 4000 * 5 / len(PEERS)
    chi2 = sum((counts[pk] - expected) ** 2 / expected for pk in PEERS)
    assert chi2 < 43.8  # chi-square critical value, 19 degrees of freedom, p = 0.001


def test_view_merge_takes_latest_activity_and_highest_membership_index() -> None:
    view = View()
    view.merge({b"a": ViewEntry(3, 1, modest.JOIN)})
    view.merge({b"a": ViewEntry(2, 2, modest.LEAVE)})
    assert view.entries[b"a"] == ViewEntry(3, 2, modest.LEAVE)
    view.membership(b"b", 4, 1, modest.JOIN)
    assert b"b" not in view.entries  # joins wait for the next flush
    view.flush()
    assert view.active(4, 50, b"me") == sorted([b"b", b"me"])


def next_event(node: ModestNode, now: float) -> object:
    """The core's next event, aggregating at once (a mean) when it asks to."""
    event = node.next_event()
    if isinstance(event, AggregateRequest):
        node.aggregated(event, sum(event.models) / len(event.models), now)
        return next_event(node, now)
    return event


class Harness:
    """Cores wired together by hand: deliver() moves messages, `dead` ones are dropped."""

    def __init__(self, n: int, **settings: object) -> None:
        self.settings = ModestSettings(**settings)  # type: ignore[arg-type]
        self.keys = [bytes([i + 1]) * 32 for i in range(n)]
        self.nodes = {k: ModestNode(k, self.keys, self.settings) for k in self.keys}
        self.dead: set[bytes] = set()
        self.events: list[tuple[bytes, object]] = []
        self.sent: list[tuple[bytes, bytes, object]] = []

    def deliver(self, now: float) -> None:
        moved = True
        while moved:
            moved = False
            for key, node in self.nodes.items():
                for send in node.messages_to_send():
                    self.sent.append((key, send.dst, send.message))
                    if send.dst not in self.dead:
                        self.nodes[send.dst].receive(key, send.message, now)
                        moved = True
                while (event := next_event(node, now)) is not None:
                    self.events.append((key, event))
                    moved = True  # an aggregation may have queued messages

    def tick(self, now: float) -> None:
        for key, node in self.nodes.items():
            if key not in self.dead:
                node.handle_timer(now)
        self.deliver(now)

    def of(self, kind: type) -> list[tuple[bytes, object]]:
        return [(k, e) for k, e in self.events if isinstance(e, kind)]


def test_full_round_trains_aggregates_and_redistributes() -> None:
    h = Harness(6, sample_size=3, aggregators=1)
    for node in h.nodes.values():
        node.start(10.0, now=0.0)
    h.deliver(0.0)
    trainers = {k for k, _ in h.of(TrainRequest)}
    assert trainers == set(modest.sample(1, h.keys, 3))
    for i, key in enumerate(sorted(trainers)):
        h.nodes[key].training_done(1, float(i), now=1.0)
    h.deliver(1.0)
    aggregated = h.of(RoundAggregated)
    assert len(aggregated) == 1
    aggregator, event = aggregated[0]
    assert aggregator == modest.sample(2, h.keys, 1)[0]
    assert event.round == 2
    assert event.model == pytest.approx(1.0)
    round2 = {k for k, e in h.of(TrainRequest) if e.round == 2}  # type: ignore[attr-defined]
    assert round2 == set(modest.sample(2, h.keys, 3))
    acks = [m for _, _, m in h.sent if isinstance(m, AggAck)]
    assert all(a.success for a in acks)


def test_unresponsive_aggregator_is_skipped_after_the_ping_timeout() -> None:
    h = Harness(6, sample_size=2, aggregators=1, ping_timeout=5.0, ping_interval=1.0)
    first_choice = modest.ordered(2, h.keys)[0]
    second_choice = modest.ordered(2, h.keys)[1]
    trainers = [k for k in modest.sample(1, h.keys, 2) if k != first_choice]
    h.dead.add(first_choice)
    trainer = trainers[0]
    h.nodes[trainer].start(0.0, now=0.0)
    h.nodes[trainer].training_done(1, 1.0, now=0.0)
    h.deliver(0.0)
    assert not any(isinstance(m, TrainedModel) for _, _, m in h.sent)
    pings_before = sum(isinstance(m, Ping) and d == first_choice for _, d, m in h.sent)
    h.tick(1.0)  # a resend, still waiting
    assert sum(isinstance(m, Ping) and d == first_choice for _, d, m in h.sent) > pings_before
    assert h.nodes[trainer].get_timer() is not None
    h.tick(5.0)  # timeout: the next candidate is pinged and answers
    assert second_choice != trainer  # so the model has to cross the network
    targets = [d for _, d, m in h.sent if isinstance(m, TrainedModel)]
    assert targets == [second_choice]

    # The missed ping demotes the first choice only for a while (else nodes that saw
    # different pings would disagree about aggregators for good).
    node = h.nodes[trainer]
    assert node._candidates(2, now=10.0)[-1] == first_choice
    later = 5.0 + node.settings.unresponsive_for + 1.0
    assert node._candidates(2, now=later)[0] == first_choice


def test_a_peer_that_keeps_missing_pings_stays_last_for_longer_each_time() -> None:
    h = Harness(4)
    node, dead = h.nodes[h.keys[0]], h.keys[1]
    settings = node.settings
    now, penalties = 0.0, []
    for _ in range(8):
        node.missed_ping(dead, now)
        penalties.append(node.unresponsive[dead] - now)
        now = node.unresponsive[dead]
    first = settings.unresponsive_for
    assert penalties[:3] == [first, 2 * first, 4 * first]
    assert max(penalties) == settings.max_unresponsive_for
    node.receive(dead, Ping(1, 1), now=now)  # it is back: the next miss starts over
    node.missed_ping(dead, now)
    assert node.unresponsive[dead] - now == first


def test_peers_that_missed_pings_are_pinged_together_so_a_check_waits_one_timeout() -> None:
    h = Harness(10, ping_timeout=5.0, ping_interval=1.0)
    node, alive, dead = h.nodes[h.keys[0]], h.keys[:4], h.keys[4:]
    h.dead.update(dead)
    for pk in dead:
        node.missed_ping(pk, 0.0)
    candidates = node._candidates(1, now=1.0)
    assert set(candidates[-len(dead) :]) == set(dead)  # they come last
    done: list[list[bytes]] = []
    node._check(1, candidates, 6, lambda peers, _: done.append(peers), now=1.0)
    h.deliver(1.0)
    assert set(dead) <= {d for _, d, m in h.sent if isinstance(m, Ping)}  # all at once
    assert not done  # fewer than 6 answered: the gone ones get their one chance
    h.tick(1.0 + node.settings.ping_timeout)
    assert done
    assert set(done[0]) == set(alive)


def test_a_ping_that_cannot_be_sent_counts_as_missed_at_once() -> None:
    h = Harness(4, ping_timeout=5.0, ping_interval=1.0)
    node, gone = h.nodes[h.keys[0]], h.keys[1]
    done: list[list[bytes]] = []
    node._check(1, [gone, h.keys[2]], 1, lambda peers, _: done.append(peers), now=0.0)
    ping = next(s.message for s in node.messages_to_send() if s.dst == gone)
    node.send_failed(gone, ping, now=0.1)  # e.g. connection refused
    assert gone in node.unresponsive
    h.deliver(0.1)  # the next candidate was pinged at once and answers
    assert done == [[h.keys[2]]]


def _aggregator(**settings: object) -> tuple[Harness, ModestNode]:
    h = Harness(8, **settings)
    return h, h.nodes[h.keys[0]]


def test_aggregator_success_fraction_and_duplicates() -> None:
    h, agg = _aggregator(sample_size=4, success_fraction=0.5)
    agg.receive(h.keys[1], TrainedModel(5, 1.0, {}), now=0.0)
    agg.receive(h.keys[1], TrainedModel(5, 99.0, {}), now=0.0)  # duplicate sender
    assert agg.next_event() is None
    agg.receive(h.keys[2], TrainedModel(5, 3.0, {}), now=0.0)
    event = next_event(agg, 0.0)
    assert isinstance(event, RoundAggregated)
    assert event.model == 2.0
    assert len(event.contributors) == 2
    agg.receive(h.keys[3], TrainedModel(5, 7.0, {}), now=0.0)  # round already done
    assert AggAck(5, False) in [s.message for s in agg.messages_to_send()]


def test_aggregation_timeout_and_newer_round_cancels_older() -> None:
    h, agg = _aggregator(sample_size=4, aggregation_timeout=10.0)
    agg.receive(h.keys[1], TrainedModel(3, 1.0, {}), now=0.0)
    agg.receive(h.keys[2], TrainedModel(4, 5.0, {}), now=1.0)  # newer round: old buffer dropped
    agg.receive(h.keys[3], TrainedModel(3, 9.0, {}), now=1.0)  # older round: refused
    assert agg.get_timer() == 11.0
    agg.handle_timer(11.0)
    event = next_event(agg, 11.0)
    assert isinstance(event, RoundAggregated)
    assert (event.round, event.model) == (4, 5.0)


def test_trainer_ignores_duplicates_and_newer_round_cancels_training() -> None:
    h = Harness(4)
    node = h.nodes[h.keys[0]]
    node.receive(h.keys[1], AggregatedModel(3, 1.0, {}), now=0.0)
    node.receive(h.keys[2], AggregatedModel(3, 2.0, {}), now=0.0)  # second aggregator, same round
    events = [node.next_event(), node.next_event()]
    assert isinstance(events[0], TrainRequest)
    assert events[1] is None
    node.receive(h.keys[1], AggregatedModel(4, 3.0, {}), now=1.0)
    assert node.next_event() == CancelTraining(3)
    assert isinstance(node.next_event(), TrainRequest)
    node.training_done(3, 0.0, now=2.0)  # a cancelled training finishing late is ignored
    assert not any(isinstance(s.message, Ping) for s in node.messages_to_send())


def test_ping_is_answered_with_the_round_estimate() -> None:
    h = Harness(3)
    node = h.nodes[h.keys[0]]
    node.receive(h.keys[1], AggregatedModel(6, 1.0, {}), now=0.0)
    node.receive(h.keys[2], Ping(2, nonce=42), now=0.0)
    assert node.messages_to_send()[-1].message == Pong(6, 42)


def test_first_live_candidate_reseeds_a_stalled_swarm() -> None:
    h = Harness(5, sample_size=2, stall_timeout=100.0)
    order = modest.ordered(8, h.keys)
    first, second = order[0], order[1]
    for key in (first, second):
        node = h.nodes[key]
        node.receive(h.keys[0] if key != h.keys[0] else h.keys[1], AggregatedModel(6, 4.0, {}), 0.0)
        node.next_event()
        node.observe_round(7, now=0.0)
    assert h.nodes[first].get_timer() == 100.0
    h.nodes[second].handle_timer(100.0)  # second in order: pings the first, who answers
    h.deliver(100.0)
    assert h.nodes[second].get_timer() == 200.0  # so it waits one more period
    h.nodes[first].handle_timer(100.0)  # first: re-seeds round 8 with its model
    h.deliver(100.0)
    reseeded = [m for s, _, m in h.sent if s == first and isinstance(m, AggregatedModel)]
    assert reseeded
    assert all((m.round, m.model) == (8, 4.0) for m in reseeded)
    assert not [m for s, _, m in h.sent if s == second and isinstance(m, AggregatedModel)]


def test_a_stalled_swarm_is_reseeded_by_the_first_candidate_still_alive() -> None:
    h = Harness(6, sample_size=2, stall_timeout=100.0, ping_timeout=5.0)
    order = modest.ordered(8, h.keys)
    h.dead.update(order[:3])  # the first three candidates died with the round
    survivor = h.nodes[order[3]]
    survivor.receive(order[4], AggregatedModel(6, 4.0, {}), 0.0)
    survivor.next_event()
    survivor.observe_round(7, now=0.0)
    h.tick(100.0)  # stall: it pings down the order, one candidate at a time
    for t in (105.0, 110.0, 115.0):  # a ping timeout each (not a stall period each)
        h.tick(t)
    reseeded = [m for s, _, m in h.sent if s == order[3] and isinstance(m, AggregatedModel)]
    assert reseeded
    assert all(m.round == 8 for m in reseeded)
