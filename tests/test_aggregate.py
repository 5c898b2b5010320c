from __future__ import annotations

import pytest
import torch

from peerlearn.errors import LocalProtocolError, RemoteProtocolError
from peerlearn.learning import aggregate, robust
from peerlearn.learning.aggregate import population_variance, vca_merge, weighted_mean
from peerlearn.learning.hygiene import check_finite


def xavier(generator: torch.Generator, fan_out: int = 10, fan_in: int = 500) -> torch.Tensor:
    bound = (6.0 / (fan_in + fan_out)) ** 0.5
    return torch.empty(fan_out, fan_in).uniform_(-bound, bound, generator=generator)


SIGMA2 = 2.0 / 510  # Xavier-uniform variance for 500 -> 10


@pytest.mark.parametrize("n", [2, 4, 8])
def test_plain_mean_shrinks_variance_and_vca_restores_it(n: int) -> None:
    g = torch.Generator().manual_seed(n)
    models = [{"w": xavier(g)} for _ in range(n + 1)]
    mean_var = population_variance(weighted_mean(models[1:])["w"])
    assert mean_var == pytest.approx(SIGMA2 / n, rel=0.08)
    merged = vca_merge(models[0], models[1:], beta=0.5)["w"]
    target = sum(population_variance(m["w"]) for m in models[1:]) / n
    assert population_variance(merged) == pytest.approx(target, rel=1e-6)
    assert population_variance(merged) == pytest.approx(SIGMA2, rel=0.05)
    unscaled = aggregate.mix(models[0], weighted_mean(models[1:]), 0.5)["w"]
    assert float(merged.mean()) == pytest.approx(float(unscaled.mean()), abs=1e-7)


def test_vca_leaves_identical_models_unchanged() -> None:
    g = torch.Generator().manual_seed(0)
    model = {"w": xavier(g)}
    merged = vca_merge(model, [model, model, model])
    assert torch.allclose(merged["w"], model["w"], atol=1e-7)


def test_vca_skips_bn_statistics_and_scalars() -> None:
    own = {
        "bn.running_mean": torch.ones(4),
        "bn.running_var": torch.full((4,), 2.0),
        "bn.num_batches_tracked": torch.tensor(7),
        "scale": torch.tensor([1.0]),
        "w": torch.tensor([1.0, -1.0, 1.0, -1.0]),
    }
    other = {
        "bn.running_mean": torch.zeros(4),
        "bn.running_var": torch.zeros(4),
        "bn.num_batches_tracked": torch.tensor(100),
        "scale": torch.tensor([3.0]),
        "w": torch.tensor([3.0, -3.0, 3.0, -3.0]),
    }
    merged = vca_merge(own, [other], beta=0.5)
    for name in ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked"):
        assert torch.equal(merged[name], own[name])
    assert merged["scale"].item() == 2.0  # averaged, not rescaled
    assert population_variance(merged["w"]) == pytest.approx(9.0)  # rescaled to the peer's


def test_vca_epsilon_is_negligible_for_small_layers() -> None:
    g = torch.Generator().manual_seed(1)
    models = [{"w": xavier(g) * 0.01} for _ in range(9)]  # variance ~4e-7
    merged = vca_merge(models[0], models[1:])["w"]
    target = sum(population_variance(m["w"]) for m in models[1:]) / 8
    assert population_variance(merged) == pytest.approx(target, rel=1e-3)


def test_weighted_mean_and_layout_checks() -> None:
    a, b = {"w": torch.zeros(3)}, {"w": torch.ones(3)}
    assert torch.allclose(weighted_mean([a, b], [1, 3])["w"], torch.full((3,), 0.75))
    with pytest.raises(LocalProtocolError, match="layouts"):
        weighted_mean([a, {"w": torch.zeros(4)}])
    with pytest.raises(LocalProtocolError, match="zero models"):
        weighted_mean([])
    with pytest.raises(LocalProtocolError, match="beta"):
        aggregate.mix(a, b, 1.5)


def _vectors(honest: int, byzantine: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    good = [{"w": torch.randn(20, generator=g) * 0.1} for _ in range(honest)]
    return good + [{"w": torch.full((20,), 100.0)} for _ in range(byzantine)]


@pytest.mark.parametrize("name", ["median", "trimmed", "krum", "clip"])
def test_robust_rules_resist_outliers_where_mean_does_not(name: str) -> None:
    models = _vectors(honest=7, byzantine=3)
    reference = {"w": torch.zeros(20)}
    rule = robust.create_rule(name, f=3, clip_radius=1.0)
    assert rule(reference, models)["w"].abs().max() < 1.0
    assert robust.mean(reference, models)["w"].abs().min() > 20


def test_krum_picks_the_central_model_and_clamps_f() -> None:
    models = _vectors(honest=4, byzantine=1)
    chosen = robust.krum({"w": torch.zeros(20)}, models, f=10)  # f clamped to (5-3)//2 = 1
    assert any(torch.equal(chosen["w"], m["w"]) for m in models[:4])


def test_unknown_rule_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError, match="unknown aggregation rule"):
        robust.create_rule("average-ish")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_variance_matches_a_float64_reference_in_every_float_dtype(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(3)
    values = (torch.randn(1_000_000, generator=g) * 3 + 1).to(dtype)
    reference = float(values.double().var(unbiased=False))
    assert population_variance(values) == pytest.approx(reference, rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_finite_check_finds_one_bad_value_and_keeps_huge_finite_models(dtype: torch.dtype) -> None:
    huge = torch.full((1000,), torch.finfo(dtype).max / 2, dtype=dtype)  # its sum overflows
    check_finite({"w": huge})
    for bad in (float("nan"), float("inf"), float("-inf")):
        model = torch.zeros(1000, dtype=dtype)
        model[517] = bad
        with pytest.raises(RemoteProtocolError, match="NaN or infinite"):
            check_finite({"w": model})
