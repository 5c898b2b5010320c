from __future__ import annotations

import random

import pytest
import torch

from peerlearn.learning import attacks, bristle


def test_equal_f1_gives_weight_equal_to_certainty() -> None:
    f1 = {0: 0.8, 1: 0.8, 2: 0.8}
    weights = bristle.peer_weights(f1, dict(f1), familiar=[0, 1, 2])
    assert weights.per_class == pytest.approx({0: 0.8, 1: 0.8, 2: 0.8})  # certainty 0.8 - 0
    assert weights.foreign == pytest.approx(0.8)


def test_much_worse_peer_gets_zero_and_much_better_approaches_six_times_certainty() -> None:
    me = {0: 0.9, 1: 0.9, 2: 0.9}
    worse = bristle.peer_weights(me, {0: 0.1, 1: 0.1, 2: 0.1}, familiar=[0, 1, 2])
    assert worse.per_class == {0: 0.0, 1: 0.0, 2: 0.0}
    assert worse.foreign == 0.0
    me_low = {0: 0.0, 1: 0.0, 2: 0.0}
    better = bristle.peer_weights(me_low, {0: 1.0, 1: 1.0, 2: 1.0}, familiar=[0, 1, 2])
    assert all(w == pytest.approx(6.0, rel=0.01) for w in better.per_class.values())


def test_certainty_is_mean_minus_std_over_the_best_phi_classes() -> None:
    me = {c: 0.5 for c in range(4)}
    peer = {0: 1.0, 1: 0.5, 2: 0.0, 3: 0.5}
    weights = bristle.peer_weights(me, peer, familiar=[0, 1, 2, 3], phi=3)
    # selected: classes 0, 1, 3 -> mean 2/3, population std 0.2357 -> certainty 0.431
    assert weights.per_class[2] == 0.0  # not selected
    assert weights.per_class[1] == pytest.approx(2 / 3 - (1 / 18) ** 0.5, rel=1e-6)


def test_score_is_asymmetric() -> None:
    assert -bristle.class_score(0.5, 0.7) > bristle.class_score(0.7, 0.5)


def test_prioritizer_takes_all_when_few_and_alpha_split_when_many() -> None:
    own = torch.zeros(3, 4)
    few = [torch.ones(3, 4) * i for i in range(5)]
    assert bristle.prioritize(own, few, random.Random(0)) == [0, 1, 2, 3, 4]
    many = [torch.ones(3, 4) * i for i in range(30)]
    chosen = bristle.prioritize(own, many, random.Random(0), keep=10, alpha=0.4)
    assert len(chosen) == 4 + 5 + 2  # round(0.36 N), round(0.48 N), round(0.16 N)
    assert sum(i < 10 for i in chosen) == 4
    assert sum(i >= 20 for i in chosen) == 2
    assert chosen == bristle.prioritize(own, many, random.Random(0), keep=10, alpha=0.4)


def test_integrate_weighs_ourselves_for_familiar_classes_only_and_centres_rows() -> None:
    own = torch.tensor([[0.0, 0.0, 0.0], [9.0, 0.0, 0.0]])
    peer = torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, 6.0]])
    weights = [bristle.PeerWeights(per_class={0: 2.0}, foreign=0.5)]
    out = bristle.integrate(own, [peer], weights, familiar=[0])
    row0 = torch.tensor([2.0, 0.0, 0.0]) - 2.0 / 3  # (1*own + 2*peer) / 3, centred
    row1 = torch.tensor([0.0, 0.0, 6.0]) - 2.0  # foreign: the trusted peer's row, centred
    assert torch.allclose(out, torch.stack([row0, row1]))
    untrusted = [bristle.PeerWeights(per_class={0: 0.0}, foreign=0.0)]
    kept = bristle.integrate(own, [peer], untrusted, familiar=[0])
    assert torch.allclose(kept, own - own.mean(dim=1, keepdim=True))  # nobody to learn from


def test_per_class_f1() -> None:
    predicted = torch.tensor([0, 0, 1, 1])
    labels = torch.tensor([0, 1, 1, 1])
    f1 = bristle.per_class_f1(predicted, labels, [0, 1, 2])
    assert f1[0] == pytest.approx(2 / 3)
    assert f1[1] == pytest.approx(0.8)
    assert f1[2] == 0.0


def test_attacks() -> None:
    g = torch.Generator().manual_seed(0)
    honest = [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 2.0])}]
    own = {"w": torch.zeros(2), "n": torch.tensor(3)}
    assert torch.equal(attacks.sign_flip(own, honest, g)["w"], torch.tensor([-2.0, -2.0]))
    assert torch.allclose(attacks.ipm(own, honest, g)["w"], torch.tensor([-0.2, -0.2]))
    assert torch.equal(attacks.sign_flip(own, honest, g)["n"], torch.tensor(3))
    alie = attacks.make_alie(nodes=10, byzantine=3)(own, honest, g)["w"]
    z = attacks.alie_z(10, 3)
    assert torch.allclose(alie, torch.tensor([2.0 - z, 2.0]))
    assert 0 < z < 3
    noisy = attacks.gaussian(own, honest, g)["w"]
    assert not torch.equal(noisy, torch.tensor([2.0, 2.0]))
    assert torch.equal(attacks.flip_labels(torch.tensor([0, 8, 9])), torch.tensor([1, 9, 0]))
