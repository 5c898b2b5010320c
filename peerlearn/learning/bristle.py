"""Bristle: distance-based prioritizer + performance-based integrator for an exchanged output layer.

Faithful to the authors' Bristle.kt / Node.kt (trustchain-superapp, fedml),
with the output layer stored as torch does it: one *row* per class (``[classes, features]``).

* Prioritizer: candidates sorted by L2 distance to my layer, split into thirds, and
  round((1-a)^2 N), round(2a(1-a) N), round(a^2 N) picked at random from the low, middle
  and high third (explore/exploit with ``alpha``).
* Integrator: per-class F1 on my small local test set; each peer gets a per-class weight for
  my familiar classes and one overall weight for the foreign classes; then each class
  vector is mean-centred. Self weight 1 for familiar classes, as in Bristle.kt; for a
  foreign class, 0 as soon as a trusted peer brings it (Bristle.kt: 1). Our row of a class
  we never trained is only a copy of what peers brought before, and mixing it back in at
  weight 1 halved a class at every hop: with 7 honest nodes holding classes 0-3, 1-4, ...,
  6-9, classes 0 and 9 have one holder each, and by the far end of that chain they were
  lost (seed 22: the 6-9 node at 0.03-0.46 on classes 0-3, mean 0.76, worst node 0.63).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from peerlearn.errors import LocalProtocolError
from peerlearn.learning.aggregate import StateDict
from peerlearn.learning.data import Dataset

DEFAULT_ALPHA = 0.4
DEFAULT_CANDIDATES = 10  # N: models kept by the prioritizer
DEFAULT_PHI = 3  # classes compared per peer ("countPerPeer" in the simulator)
TEST_PER_CLASS = 10  # kappa: local test samples per familiar class
SCORE_FLOOR = -100.0


def prioritize(
    own: torch.Tensor,
    candidates: Sequence[torch.Tensor],
    rng: random.Random,
    *,
    keep: int = DEFAULT_CANDIDATES,
    alpha: float = DEFAULT_ALPHA,
) -> list[int]:
    """Indices of the candidates to integrate (all of them if there are at most ``keep``)."""
    if len(candidates) <= keep:
        return list(range(len(candidates)))
    distances = [float(torch.dist(own, c)) for c in candidates]
    order = sorted(range(len(candidates)), key=lambda i: (distances[i], i))
    third = len(order) / 3
    parts = [
        order[: round(third)],
        order[round(third) : round(2 * third)],
        order[round(2 * third) :],
    ]
    counts = [
        round((1 - alpha) ** 2 * keep),
        round(2 * alpha * (1 - alpha) * keep),
        round(alpha**2 * keep),
    ]
    chosen: list[int] = []
    for part, count in zip(parts, counts, strict=True):
        chosen.extend(rng.sample(part, min(count, len(part))))
    return sorted(chosen)


def per_class_f1(
    predicted: torch.Tensor, labels: torch.Tensor, classes: Sequence[int]
) -> dict[int, float]:
    out = {}
    for c in classes:
        tp = int(((predicted == c) & (labels == c)).sum())
        fp = int(((predicted == c) & (labels != c)).sum())
        fn = int(((predicted != c) & (labels == c)).sum())
        out[c] = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return out


def _sigmoid(x: float) -> float:
    if x < 0:  # no overflow for very negative scores
        e = math.exp(x)
        return e / (1.0 + e)
    return 1.0 / (1.0 + math.exp(-x))


def class_score(f1_peer: float, f1_me: float) -> float:
    """Asymmetric score: being worse than me is punished harder than being better is rewarded."""
    d = 10 * abs(f1_peer - f1_me)
    return float(d ** (3 + f1_me)) if f1_peer > f1_me else -float(d ** (4 + f1_me))


def score_to_weight(score: float, certainty: float) -> float:
    """certainty * max(0, 10*sigmoid(score/100) - 4): 0 if much worse, 1*c if equal, ->6*c."""
    return certainty * max(0.0, 10 * _sigmoid(max(SCORE_FLOOR, score) / 100) - 4)


@dataclass(frozen=True)
class PeerWeights:
    per_class: dict[int, float]  # weights for my familiar classes
    foreign: float  # weight for every class I do not hold


def peer_weights(
    f1_me: dict[int, float],
    f1_peer: dict[int, float],
    familiar: Sequence[int],
    phi: int = DEFAULT_PHI,
) -> PeerWeights:
    """The integrator's weights for one peer (Bristle.kt, HEAD)."""
    if not familiar:
        raise LocalProtocolError("Bristle needs at least one familiar class")
    if phi >= len(familiar):
        selected = list(familiar)
    else:
        selected = sorted(familiar, key=lambda c: (-f1_peer[c], c))[:phi]
    values = [f1_peer[c] for c in selected]
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    certainty = max(0.0, mean - std)
    scores = {c: class_score(f1_peer[c], f1_me[c]) for c in selected}
    per_class = {c: score_to_weight(scores[c], certainty) if c in scores else 0.0 for c in familiar}
    # The foreign weight uses the unbounded sum of scores (no floor), as in Bristle.kt.
    foreign = certainty * max(0.0, 10 * _sigmoid(sum(scores.values()) / 100) - 4)
    return PeerWeights(per_class, foreign)


def integrate(
    own: torch.Tensor,
    peers: Sequence[torch.Tensor],
    weights: Sequence[PeerWeights],
    familiar: Sequence[int],
) -> torch.Tensor:
    """Weighted per-class combination (self weight 1 for familiar classes, 0 for foreign
    ones that a trusted peer brings), then per-class mean-centring."""
    out = own.clone()
    familiar_set = set(familiar)
    for c in range(own.shape[0]):
        ws = [(w.per_class.get(c, 0.0) if c in familiar_set else w.foreign) for w in weights]
        own_weight = 1.0 if c in familiar_set or not any(ws) else 0.0
        total = own_weight + sum(ws)
        row = own[c] * own_weight
        for w, layer in zip(ws, peers, strict=True):
            if w:
                row += w * layer[c]
        out[c] = row / total
    return out - out.mean(dim=1, keepdim=True)


def split_local_test(local: Dataset, rng: np.random.Generator) -> tuple[Dataset, Dataset]:
    """(test, train): up to kappa samples per class held out; at least half stays for training."""
    labels = local.y.numpy()
    test_idx: list[int] = []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        test_idx.extend(int(i) for i in members[: min(TEST_PER_CLASS, len(members) // 2)])
    mask = np.ones(len(labels), dtype=bool)
    mask[test_idx] = False
    return local.subset(np.array(test_idx, dtype=np.int64)), local.subset(np.flatnonzero(mask))


@dataclass(frozen=True)
class BristleView:
    """What Bristle needs from a task: the exchanged output layer's name (one row per
    class), predictions of a candidate layer on the node's small local test set, that set's
    labels, and the classes the node holds."""

    layer: str
    predict: Callable[[torch.Tensor], torch.Tensor]
    labels: torch.Tensor
    familiar: Sequence[int]


def consolidate(view: BristleView, before: StateDict, trained: StateDict) -> StateDict:
    """Consolidated weights: local training only updates the rows of classes held locally."""
    weight = before[view.layer].clone()
    rows = list(view.familiar)
    weight[rows] = trained[view.layer][rows]
    return {**trained, view.layer: weight}


class BristleMerger:
    """One node's Bristle: prioritize the received output layers, then integrate them."""

    def __init__(self, view: BristleView, rng: random.Random) -> None:
        if not view.familiar:
            raise LocalProtocolError("Bristle needs at least one familiar class")
        self.view = view
        self.familiar = list(view.familiar)
        self.rng = rng

    def _f1(self, layer: torch.Tensor) -> dict[int, float]:
        return per_class_f1(self.view.predict(layer), self.view.labels, self.familiar)

    def __call__(self, own: StateDict, received: Sequence[StateDict]) -> StateDict:
        if not received:
            return own
        name = self.view.layer
        layers = [r[name] for r in received]
        chosen = [layers[i] for i in prioritize(own[name], layers, self.rng)]
        f1_me = self._f1(own[name])
        weights = [peer_weights(f1_me, self._f1(layer), self.familiar) for layer in chosen]
        return {**own, name: integrate(own[name], chosen, weights, self.familiar)}
