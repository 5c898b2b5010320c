"""Rollouts as payloads: what swarm-RL agents share (SAPO-style) instead of weights.

    pool = RolloutPool(obs_size=4, num_actions=2)
    await node.share(pack_rollouts(best_episodes), round=i)   # trio / asyncio
    pool.add_all(node.receive_all())                           # sync (or ``await receive()``)
    batch = own_episodes + pool.take(8)

A ``Rollout`` keeps the behaviour policy's log-probability of every action it took, so the
learner that trains on someone else's rollout can weight it by ``pi(a|s) / mu(a|s)``
(off-policy correction). Everything a peer sends is checked before it is kept: shapes,
finite numbers, action range, length. A malformed rollout is counted and left out; it never
reaches training.
"""

from __future__ import annotations

import logging
import math
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from peerlearn import wire
from peerlearn.errors import RemoteProtocolError

logger = logging.getLogger(__name__)

PAYLOAD_KEY = "rollouts"
_FIELDS = ("observations", "actions", "rewards", "logprobs")


@dataclass(frozen=True)
class Rollout:
    """One episode (or one generated answer): what the agent saw, did and got, and how likely
    its policy then was to take each action."""

    observations: list[list[float]]
    actions: list[int]
    rewards: list[float]
    logprobs: list[float]  # log mu(a_t | s_t) under the policy that acted
    round: int | None = None  # set on receipt from the sender's ``round``
    sender: str | None = None  # peer ID, set on receipt

    @property
    def total_reward(self) -> float:
        return sum(self.rewards)

    def to_wire(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _FIELDS}


def pack_rollouts(rollouts: Sequence[Rollout]) -> dict[str, Any]:
    """The payload to ``share``: ``{"rollouts": [...]}``."""
    return {PAYLOAD_KEY: [r.to_wire() for r in rollouts]}


def _floats(value: Any, what: str) -> list[float]:
    items = wire.expect(value, list, what)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in items):
        raise RemoteProtocolError(f"{what} holds something that is not a number")
    out = [float(v) for v in items]
    if not all(math.isfinite(v) for v in out):
        raise RemoteProtocolError(f"{what} holds NaN or infinity")
    return out


def parse_rollout(
    value: Any, *, obs_size: int, num_actions: int, max_steps: int, round_: int | None = None
) -> Rollout:
    """A rollout a peer sent, checked; ``RemoteProtocolError`` says what is wrong."""
    body = wire.expect_map(value, set(_FIELDS), "rollout")
    observations = wire.expect(body["observations"], list, "rollout.observations")
    steps = len(observations)
    if not 0 < steps <= max_steps:
        raise RemoteProtocolError(f"rollout of {steps} steps (allowed: 1 to {max_steps})")
    obs = [_floats(o, "rollout.observations[]") for o in observations]
    if any(len(o) != obs_size for o in obs):
        raise RemoteProtocolError(f"an observation is not {obs_size} numbers long")
    actions = wire.expect(body["actions"], list, "rollout.actions")
    if not all(isinstance(a, int) and not isinstance(a, bool) for a in actions):
        raise RemoteProtocolError("rollout.actions holds something that is not an integer")
    if any(not 0 <= a < num_actions for a in actions):
        raise RemoteProtocolError(f"an action is outside 0..{num_actions - 1}")
    rewards = _floats(body["rewards"], "rollout.rewards")
    logprobs = _floats(body["logprobs"], "rollout.logprobs")
    if not len(actions) == len(rewards) == len(logprobs) == steps:
        raise RemoteProtocolError("rollout fields have different lengths")
    if any(lp > 0.0 for lp in logprobs):
        raise RemoteProtocolError("a log-probability is above 0")
    return Rollout(obs, list(actions), rewards, logprobs, round_)


class RolloutPool:
    """Rollouts received from peers, waiting to be trained on.

    Bounded: beyond ``capacity`` the oldest go (counted in ``dropped``). ``add`` takes an
    ``Update`` from any node flavour and keeps its valid rollouts; malformed ones are counted
    in ``rejected`` (with the sender logged), never kept. ``take`` hands out rollouts at
    random, each at most once; ``max_age`` rounds drops stale ones first.
    """

    def __init__(
        self,
        *,
        obs_size: int,
        num_actions: int,
        max_steps: int = 1000,
        capacity: int = 1024,
        seed: int = 0,
    ) -> None:
        self.obs_size, self.num_actions, self.max_steps = obs_size, num_actions, max_steps
        self._items: deque[Rollout] = deque(maxlen=capacity)
        self._random = random.Random(seed)
        self.received = 0
        self.rejected = 0
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._items)

    def add(self, update: Any) -> int:
        """Keep the valid rollouts of a received ``Update``; how many were kept. Updates that
        carry no rollouts (models, other payloads) are ignored."""
        payload = getattr(update, "payload", None)
        if not isinstance(payload, dict) or PAYLOAD_KEY not in payload:
            return 0
        sender, round_ = getattr(update, "sender", None), getattr(update, "round", None)
        items = payload[PAYLOAD_KEY]
        if not isinstance(items, list):
            self.rejected += 1
            logger.warning("rollouts from %s are not a list; left out", sender)
            return 0
        kept = 0
        for item in items:
            self.received += 1
            try:
                rollout = parse_rollout(
                    item,
                    obs_size=self.obs_size,
                    num_actions=self.num_actions,
                    max_steps=self.max_steps,
                    round_=round_,
                )
            except RemoteProtocolError as exc:
                self.rejected += 1
                logger.warning("a rollout from %s is left out: %s", sender, exc)
                continue
            if len(self._items) == self._items.maxlen:
                self.dropped += 1
            self._items.append(replace(rollout, sender=sender))
            kept += 1
        return kept

    def add_all(self, updates: Sequence[Any]) -> int:
        """``add`` each of ``updates`` (e.g. ``node.receive_all()``); how many were kept."""
        return sum(self.add(update) for update in updates)

    def take(self, k: int, *, newer_than: int | None = None) -> list[Rollout]:
        """Up to ``k`` rollouts at random, removed from the pool. With ``newer_than``, rollouts
        from rounds at or before it are discarded first (counted in ``dropped``)."""
        if newer_than is not None:
            fresh = [r for r in self._items if r.round is None or r.round > newer_than]
            self.dropped += len(self._items) - len(fresh)
            self._items = deque(fresh, maxlen=self._items.maxlen)
        chosen = set(self._random.sample(range(len(self._items)), min(k, len(self._items))))
        taken = [r for i, r in enumerate(self._items) if i in chosen]
        self._items = deque(
            (r for i, r in enumerate(self._items) if i not in chosen), maxlen=self._items.maxlen
        )
        return taken


def clipped_policy_loss(
    logprobs: Any, behaviour: Any, advantages: Any, *, clip: float = 0.2, dual_clip: float = 3.0
) -> Any:
    """PPO's clipped objective (as a loss to minimise) for rollouts that another policy may
    have produced: ``ratio = pi(a|s) / mu(a|s)`` from this policy's ``logprobs`` and the
    rollouts' ``behaviour`` log-probabilities. With a negative advantage the loss is also
    capped at ``dual_clip`` times it (dual-clip PPO), so a stale rollout whose ratio has
    grown large cannot produce an unbounded step. Tensors of one value per action taken.
    """
    import torch

    ratio = torch.exp(logprobs - behaviour)
    surrogate = torch.min(ratio * advantages, ratio.clamp(1 - clip, 1 + clip) * advantages)
    bounded = torch.where(advantages < 0, torch.max(surrogate, dual_clip * advantages), surrogate)
    return -bounded.mean()
