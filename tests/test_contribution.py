"""Contribution scores: a peer is judged beside the other peers, never alone."""

from __future__ import annotations

from peerlearn.learning.contribution import MIN_MODELS, ContributionScores


def test_a_peer_far_below_the_others_is_excluded_and_one_alone_never() -> None:
    scores = ContributionScores(exclude_margin=0.5)
    for _ in range(MIN_MODELS):
        scores.record("bad", own_loss=1.0, loss=3.0)  # three times worse than ours
    assert not scores.excluded("bad")  # nobody to compare it with yet
    for peer, loss in (("a", 1.2), ("b", 1.4), ("c", 1.1)):
        for _ in range(MIN_MODELS):
            scores.record(peer, own_loss=1.0, loss=loss)  # honest: a little worse than ours
    assert scores.excluded("bad")
    assert not any(scores.excluded(p) for p in ("a", "b", "c"))
    assert scores.score("a") is not None
    assert scores.status()["scores"] == {"bad": -2.0, "a": -0.2, "b": -0.4, "c": -0.1}


def test_a_non_finite_or_absurd_loss_counts_as_very_bad_not_as_nan() -> None:
    scores = ContributionScores()
    assert scores.record("p", own_loss=1.0, loss=float("inf")) == -10.0
    assert scores.record("q", own_loss=1.0, loss=0.0) == 1.0
    assert scores.record("r", own_loss=0.0, loss=5.0) == 0.0  # our loss 0: nothing to compare
