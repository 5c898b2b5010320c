"""Robust aggregation rules behind one interface, as pure functions (after Flower's aggregate.py).

A rule maps ``(reference, models)`` to one state_dict, where ``models`` are the peers'
models and ``reference`` is the caller's own/previous model (used by centered clipping,
and as the source of tensors that are never averaged). Rules need a minimum number of
models for a given assumed number of Byzantine peers ``f``; in a P2P swarm the number
received varies, so each rule lowers ``f`` to the largest value the input allows and
says so in its docstring.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from peerlearn.errors import LocalProtocolError
from peerlearn.learning.aggregate import StateDict, is_averaged, weighted_mean

CENTERED_CLIP_ITERATIONS = 3


class Rule(Protocol):
    def __call__(self, reference: StateDict, models: Sequence[StateDict]) -> StateDict: ...


def _names(reference: StateDict) -> list[str]:
    return [n for n, t in reference.items() if is_averaged(n, t)]


def flatten(models: Sequence[StateDict], names: Sequence[str]) -> torch.Tensor:
    """[len(models), d] float64 matrix of the averaged tensors."""
    return torch.stack(
        [torch.cat([m[n].reshape(-1).to(torch.float64) for n in names]) for m in models]
    )


def unflatten(vector: torch.Tensor, reference: StateDict, names: Sequence[str]) -> StateDict:
    out = {n: t.clone() for n, t in reference.items()}
    offset = 0
    for name in names:
        size = reference[name].numel()
        out[name] = (
            vector[offset : offset + size].view_as(reference[name]).to(reference[name].dtype)
        )
        offset += size
    return out


def mean(reference: StateDict, models: Sequence[StateDict]) -> StateDict:
    return weighted_mean(models, keep=reference)


def coordinate_median(reference: StateDict, models: Sequence[StateDict]) -> StateDict:
    names = _names(reference)
    return unflatten(flatten(models, names).median(dim=0).values, reference, names)


def trimmed_mean(reference: StateDict, models: Sequence[StateDict], *, f: int) -> StateDict:
    """Drop the ``f`` largest and ``f`` smallest values per coordinate (f <= (n-1)//2)."""
    names = _names(reference)
    matrix = flatten(models, names)
    f = min(f, (len(models) - 1) // 2)
    ordered = matrix.sort(dim=0).values
    kept = ordered[f : len(models) - f]
    return unflatten(kept.mean(dim=0), reference, names)


def krum_scores(matrix: torch.Tensor, f: int) -> torch.Tensor:
    """Krum score per model: sum of squared distances to its n-f-2 nearest neighbours."""
    n = matrix.shape[0]
    neighbours = max(n - f - 2, 1)
    distances = torch.cdist(matrix, matrix) ** 2
    nearest = distances.sort(dim=1).values[:, 1 : neighbours + 1]  # column 0 is the model itself
    return nearest.sum(dim=1)


def krum(reference: StateDict, models: Sequence[StateDict], *, f: int, keep: int = 1) -> StateDict:
    """(Multi-)Krum: average the ``keep`` models with the lowest scores (f <= (n-3)//2)."""
    names = _names(reference)
    matrix = flatten(models, names)
    if len(models) < 3:
        return unflatten(matrix.mean(dim=0), reference, names)
    scores = krum_scores(matrix, min(f, (len(models) - 3) // 2))
    chosen = scores.argsort()[: max(1, min(keep, len(models)))]
    return unflatten(matrix[chosen].mean(dim=0), reference, names)


def centered_clip(
    reference: StateDict,
    models: Sequence[StateDict],
    *,
    radius: float,
    iterations: int = CENTERED_CLIP_ITERATIONS,
) -> StateDict:
    """Centered clipping (Karimireddy et al. 2021) around ``reference``."""
    names = _names(reference)
    matrix = flatten(models, names)
    center = flatten([reference], names)[0]
    for _ in range(iterations):
        deltas = matrix - center
        norms = deltas.norm(dim=1, keepdim=True).clamp_min(1e-12)
        center = center + (deltas * torch.clamp(radius / norms, max=1.0)).mean(dim=0)
    return unflatten(center, reference, names)


RuleFactory = Callable[..., Rule]


def create_rule(name: str, *, f: int = 0, clip_radius: float = 1.0) -> Rule:
    """A rule by name: mean, median, trimmed, krum, clip."""
    if name in ("none", "mean"):
        return mean
    if name == "median":
        return coordinate_median
    if name == "trimmed":
        return lambda r, m: trimmed_mean(r, m, f=f)
    if name == "krum":
        return lambda r, m: krum(r, m, f=f)
    if name == "clip":
        return lambda r, m: centered_clip(r, m, radius=clip_radius)
    raise LocalProtocolError(f"unknown aggregation rule {name!r}; known: {', '.join(RULES)}")


RULES = ("mean", "median", "trimmed", "krum", "clip")
