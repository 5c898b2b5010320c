"""Per-round decisions of gossip learning and D-PSGD, shared by the simulator and the daemon."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

from peerlearn.learning import aggregate
from peerlearn.learning.aggregate import StateDict
from peerlearn.learning.robust import Rule


def merge_received(
    own: StateDict,
    received: Sequence[StateDict],
    *,
    rule: Rule,
    beta: float,
    variance_correction: bool,
) -> StateDict:
    """``beta*own + (1-beta)*rule(received)``, then VCA if asked; ``own`` if nothing arrived."""
    if not received:
        return own
    merged = aggregate.mix(own, rule(own, list(received)), beta)
    if variance_correction:
        merged = aggregate.correct_variance(merged, list(received))
    return merged


def neighbourhood_mean(own: StateDict, received: Sequence[StateDict], *, rule: Rule) -> StateDict:
    """D-PSGD step: ``rule`` over the closed neighbourhood (own model included)."""
    return rule(own, [own, *received]) if received else own


def gossip_targets(
    me: bytes, members: Sequence[bytes], fanout: int, rng: random.Random
) -> list[bytes]:
    """``fanout`` random peers other than ``me``."""
    others = sorted(m for m in members if m != me)
    return rng.sample(others, min(fanout, len(others)))


def ring_neighbours(me: bytes, members: Sequence[bytes], degree: int) -> list[bytes]:
    """A deterministic ~``degree``-regular graph every member computes alike.

    Members are placed on ``degree // 2`` rings, each ordered by a different hash; a node's
    neighbours are its predecessor and successor on each ring.
    """
    everyone = sorted(set(members) | {me})
    if len(everyone) < 2:
        return []
    out: set[bytes] = set()
    for ring in range(max(1, degree // 2)):
        order = sorted(everyone, key=lambda pk: hashlib.sha256(pk + bytes([ring])).digest())
        i = order.index(me)
        out.update({order[i - 1], order[(i + 1) % len(order)]})
    out.discard(me)
    return sorted(out)
