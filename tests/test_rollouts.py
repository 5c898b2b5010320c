"""Rollouts a peer sends are checked before they can reach training; the pool stays bounded;
the off-policy loss stays bounded for stale rollouts."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from peerlearn import wire
from peerlearn.errors import RemoteProtocolError
from peerlearn.rollouts import (
    Rollout,
    RolloutPool,
    clipped_policy_loss,
    pack_rollouts,
    parse_rollout,
)

LIMITS = dict(obs_size=2, num_actions=3, max_steps=10)


def episode(steps: int = 3, reward: float = 1.0) -> Rollout:
    return Rollout([[0.1, 0.2]] * steps, [2] * steps, [reward] * steps, [-1.1] * steps)


def update(payload: Any, round_: int | None = 0, sender: str = "peer") -> SimpleNamespace:
    return SimpleNamespace(payload=payload, round=round_, sender=sender)


def test_shared_rollouts_arrive_whole_through_the_wire() -> None:
    sent = [episode(3, 1.0), episode(5, 0.5)]
    received = wire.unpack(wire.pack(pack_rollouts(sent)))
    pool = RolloutPool(**LIMITS)
    assert pool.add(update(received, round_=7, sender="alice")) == 2
    taken = sorted(pool.take(10), key=lambda r: len(r.actions))
    assert [r.total_reward for r in taken] == [3.0, 2.5]
    assert {(r.round, r.sender) for r in taken} == {(7, "alice")}
    assert taken[0].observations == sent[0].observations
    assert (len(pool), pool.rejected) == (0, 0)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"observations": [[0.1, math.nan]] * 3}, "NaN"),
        ({"observations": [[0.1]] * 3}, "not 2 numbers"),
        ({"actions": [0, 1, 3]}, "outside 0..2"),
        ({"actions": [0, 1, True]}, "not an integer"),
        ({"rewards": [1.0, math.inf, 1.0]}, "NaN or infinity"),
        ({"logprobs": [-1.0, 0.5, -1.0]}, "above 0"),
        ({"rewards": [1.0, 1.0]}, "different lengths"),
        ({"observations": [[0.0, 0.0]] * 11, "actions": [0] * 11}, "11 steps"),
        ({"observations": []}, "0 steps"),
        ({"rewards": ["1.0", 1.0, 1.0]}, "not a number"),
        ({"extra": 1}, "rollout"),
    ],
)
def test_a_malformed_rollout_is_counted_and_never_kept(change: dict[str, Any], reason: str) -> None:
    bad = {**episode().to_wire(), **change}
    with pytest.raises(RemoteProtocolError, match=reason):
        parse_rollout(bad, **LIMITS)
    pool = RolloutPool(**LIMITS)
    assert pool.add(update({"rollouts": [bad, episode().to_wire()]})) == 1  # the good one stays
    assert (pool.rejected, len(pool)) == (1, 1)


def test_payloads_that_are_not_rollouts_are_ignored_or_counted() -> None:
    pool = RolloutPool(**LIMITS)
    assert pool.add(update({"note": "hello"})) == 0  # another kind of payload: not ours
    assert pool.add(SimpleNamespace(kind="model", payload=None)) == 0
    assert pool.rejected == 0
    assert pool.add(update({"rollouts": "lots"})) == 0
    assert pool.rejected == 1
    mixed = [update(pack_rollouts([episode()] * 2)), SimpleNamespace(kind="model", payload=None)]
    assert (pool.add_all(mixed), len(pool)) == (2, 2)


def test_the_pool_is_bounded_and_hands_each_rollout_out_once() -> None:
    pool = RolloutPool(**LIMITS, capacity=4, seed=1)
    for round_ in range(3):
        pool.add(update(pack_rollouts([episode(reward=round_)] * 2), round_=round_))
    assert (len(pool), pool.dropped) == (4, 2)  # round 0's two went first
    assert (len(pool.take(3)), len(pool)) == (3, 1)
    assert (len(pool.take(3)), len(pool)) == (1, 0)
    pool.add(update(pack_rollouts([episode(reward=5)]), round_=5))
    pool.add(update(pack_rollouts([episode(reward=9)]), round_=9))
    assert [r.round for r in pool.take(5, newer_than=5)] == [9]  # the stale one is dropped
    assert pool.dropped == 3


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_rollout_payloads_give_rollouts_or_the_declared_error(data: st.DataObject) -> None:
    """Flip, cut or extend the bytes of a valid payload: the decoder and the pool answer with
    a value or a declared protocol error, nothing else; whatever is kept is well-formed."""
    raw = bytearray(wire.pack(pack_rollouts([episode(3), episode(2, 0.5)])))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(raw) - 1))
        raw[at] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    try:
        payload = wire.unpack(bytes(raw))
    except RemoteProtocolError:
        return
    pool = RolloutPool(**LIMITS)
    pool.add(update(payload))
    for rollout in pool.take(10):
        again = parse_rollout(rollout.to_wire(), **LIMITS)
        assert all(math.isfinite(v) for o in again.observations for v in o)
        assert all(0 <= a < 3 for a in again.actions)


def test_the_clipped_loss_is_bounded_for_stale_rollouts() -> None:
    advantages = torch.tensor([1.0, -1.0])
    behaviour = torch.log(torch.tensor([0.5, 0.5]))
    # Fresh (ratio 1): the plain policy-gradient surrogate.
    same = clipped_policy_loss(behaviour.clone(), behaviour, advantages)
    assert float(same) == pytest.approx(0.0)
    # Ratio 100: the positive side is clipped at 1.2, the negative side capped at 3x.
    stale = clipped_policy_loss(behaviour + math.log(100.0), behaviour, advantages)
    assert float(stale) == pytest.approx(-(1.2 - 3.0) / 2)
    # Without the cap the negative side would be -100: that is what dual_clip prevents.
    uncapped = clipped_policy_loss(
        behaviour + math.log(100.0), behaviour, advantages, dual_clip=math.inf
    )
    assert float(uncapped) == pytest.approx(-(1.2 - 100.0) / 2)
