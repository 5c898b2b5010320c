"""Contribution scores: how the models each peer sends do on our own data (after Templar's
gauntlet and Psyche's health scores).

A received model's *gain* is ``(L(own) - L(model)) / L(own)``, ``L`` being the task's
``contribution_loss`` on a small fixed batch of our data: 0 when it does as well as ours,
negative when worse. A peer's score is an exponential average of its gains. Honest peers'
models do worse on our data than our own (they learned elsewhere), so a score means
something only beside the other peers': a peer whose score lies more than
``exclude_margin`` below the median of the scored peers' is *excluded*. A node's
``contribution`` setting (``CONTRIBUTION_MODES``) is ``off``, ``score`` (scores in
``status``; each received model costs two forward passes of the batch) or ``filter`` (an
excluded peer's models are left out of merges and each counts as a bad model against it, so
a persistent one is banned).

What they catch, measured in the simulator (``bench/learning_claims.py --only bounds``):
sign flips, somewhat; not ALIE, whose models sit among the honest ones by design, nor a
ratchet, whose models are our own plus a change and so score *better* than honest ones.
Off by default for that reason (and for the forward passes).
"""

from __future__ import annotations

import math
import statistics
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

CONTRIBUTION_MODES = ("off", "score", "filter")
DECAY = 0.7  # weight of a peer's previous score in its next one
EXCLUDE_MARGIN = 0.5  # below the peers' median score: excluded
MIN_MODELS = 3  # models scored before a peer can be excluded
MIN_PEERS = 3  # scored peers needed for a median worth comparing to
MAX_PEERS = 1024  # peers scored; the least recently heard are forgotten
GAIN_FLOOR = -10.0  # a model ten times worse than ours counts as that, not as -inf


@dataclass
class _Score:
    value: float = 0.0
    models: int = 0


class ContributionScores:
    """One node's scores of the peers whose models it received."""

    def __init__(self, exclude_margin: float = EXCLUDE_MARGIN) -> None:
        self.exclude_margin = exclude_margin
        self._scores: OrderedDict[Hashable, _Score] = OrderedDict()
        self.excluded_models = 0

    def record(self, peer: Hashable, own_loss: float, loss: float) -> float:
        """Score one model of ``peer`` (``loss``) against ours (``own_loss``); its gain."""
        gain = (own_loss - loss) / own_loss if own_loss > 0 else 0.0
        gain = max(GAIN_FLOOR, min(1.0, gain if math.isfinite(gain) else GAIN_FLOOR))
        score = self._scores.pop(peer, None) or _Score(gain, 0)
        score.value = DECAY * score.value + (1 - DECAY) * gain if score.models else gain
        score.models += 1
        self._scores[peer] = score
        while len(self._scores) > MAX_PEERS:
            self._scores.popitem(last=False)
        return gain

    def excluded(self, peer: Hashable) -> bool:
        """Whether ``peer``'s score lies too far below the other scored peers'."""
        score = self._scores.get(peer)
        if score is None or score.models < MIN_MODELS:
            return False
        scored = [s.value for s in self._scores.values() if s.models >= MIN_MODELS]
        if len(scored) < MIN_PEERS:
            return False
        return score.value < statistics.median(scored) - self.exclude_margin

    def score(self, peer: Hashable) -> float | None:
        found = self._scores.get(peer)
        return None if found is None else found.value

    def status(self, label: Callable[[Any], str] = str) -> dict[str, object]:
        """Scores by peer (named by ``label``), and the models left out for them."""
        return {
            "scores": {label(p): round(s.value, 4) for p, s in self._scores.items()},
            "models_excluded": self.excluded_models,
        }
