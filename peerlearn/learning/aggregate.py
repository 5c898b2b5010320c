"""Averaging of state_dicts: weighted mean, the gossip-learning mix, and variance correction (VCA).

VCA follows the authors' code (DFL_torch): per tensor,
``out = beta*own + (1-beta)*mean(received)``, then rescale ``out`` around its own mean so
that its element variance equals the mean of the received models' own variances.
BN running statistics and ``num_batches_tracked`` are neither averaged nor corrected
(the node keeps its own); scalars are averaged but not rescaled. The population
variance is used, with an epsilon far below any layer's variance.

Merges run in the model's own dtype (half precision sums in float32), one tensor at a time,
without stacking or float64 copies of the models; statistics and checks that need a
temporary work on ``CHUNK_ELEMENTS`` values at a time, so none is model-sized.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch

from peerlearn.errors import LocalProtocolError

StateDict = dict[str, torch.Tensor]
VCA_EPSILON = 1e-12  # DFL_torch's 1e-4 restores only ~86% of a 500->10 Xavier layer's variance
_KEEP_OWN_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")
CHUNK_ELEMENTS = 1 << 20  # values per temporary of a statistic or check


def flat_chunks(tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``tensor``'s values as consecutive 1-D views of at most ``CHUNK_ELEMENTS``."""
    flat = tensor.detach().reshape(-1)
    return tuple(flat[i : i + CHUNK_ELEMENTS] for i in range(0, flat.numel(), CHUNK_ELEMENTS))


def is_averaged(name: str, tensor: torch.Tensor) -> bool:
    """Whether a tensor takes part in averaging (floating point, not a BN running statistic)."""
    return tensor.is_floating_point() and not name.endswith(_KEEP_OWN_SUFFIXES)


def _sum_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a merge of ``dtype`` tensors sums in (half precision loses too much)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def is_variance_corrected(name: str, tensor: torch.Tensor) -> bool:
    return is_averaged(name, tensor) and tensor.numel() > 1


def _check_layout(states: Sequence[StateDict]) -> None:
    if not states:
        raise LocalProtocolError("cannot average zero models")
    first = states[0]
    for other in states[1:]:
        if other.keys() != first.keys() or any(other[n].shape != first[n].shape for n in first):
            raise LocalProtocolError("models to average have different layouts")


def weighted_mean(
    states: Sequence[StateDict],
    weights: Sequence[float] | None = None,
    *,
    keep: StateDict | None = None,
) -> StateDict:
    """Weighted element-wise mean; non-averaged tensors come from ``keep`` (default: first)."""
    _check_layout(states)
    if weights is None:
        weights = [1.0] * len(states)
    if len(weights) != len(states) or sum(weights) <= 0 or min(weights) < 0:
        raise LocalProtocolError("weights must be non-negative, one per model, not all zero")
    total = float(sum(weights))
    reference = keep if keep is not None else states[0]
    out: StateDict = {}
    for name, tensor in reference.items():
        if not is_averaged(name, tensor):
            out[name] = tensor.clone()
            continue
        dtype = _sum_dtype(tensor.dtype)
        acc = torch.zeros(tensor.shape, dtype=dtype)
        for state, weight in zip(states, weights, strict=True):
            if weight:
                acc.add_(state[name].to(dtype), alpha=weight / total)
        out[name] = acc.to(tensor.dtype)
    return out


def mix(own: StateDict, other: StateDict, beta: float) -> StateDict:
    """``beta*own + (1-beta)*other`` on averaged tensors; the rest stays ``own``'s."""
    if not 0.0 <= beta <= 1.0:
        raise LocalProtocolError(f"beta must be in [0, 1], got {beta}")
    return weighted_mean([own, other], [beta, 1.0 - beta], keep=own)


def population_variance(tensor: torch.Tensor) -> float:
    """Element variance."""
    return _variance_mean(tensor)[0]


def _variance_mean(tensor: torch.Tensor) -> tuple[float, float]:
    """Population variance and mean as two vectorized sums, in ``tensor``'s sum dtype
    (torch's cascade summation, so float32 stays within about 1e-7): a third of the CPU
    of ``torch.var_mean``, which runs Welford's update element by element."""
    dtype, count = _sum_dtype(tensor.dtype), tensor.numel()
    mean = float(tensor.sum(dtype=dtype)) / count
    squares = sum(float((c.to(dtype) - mean).square_().sum()) for c in flat_chunks(tensor))
    return squares / count, mean


def correct_variance(
    merged: StateDict, inputs: Sequence[StateDict], *, epsilon: float = VCA_EPSILON
) -> StateDict:
    """Rescale each correctable tensor of ``merged`` to the mean variance of ``inputs``."""
    _check_layout([merged, *inputs])
    targets = {
        name: sum(population_variance(s[name]) for s in inputs) / len(inputs)
        for name, tensor in merged.items()
        if is_variance_corrected(name, tensor)
    }
    return rescale_variance(merged, targets, epsilon=epsilon)


def rescale_variance(
    merged: StateDict,
    targets: Mapping[str, float],
    *,
    epsilon: float = VCA_EPSILON,
    in_place: bool = False,
) -> StateDict:
    """Rescale each tensor named in ``targets`` about its mean to that element variance
    (``in_place``: overwriting ``merged``'s tensors that sum in their own dtype)."""
    out: StateDict = {}
    for name, tensor in merged.items():
        if name not in targets:
            out[name] = tensor
            continue
        current, mean = _variance_mean(tensor)
        values = tensor.to(_sum_dtype(tensor.dtype))
        scale = math.sqrt((targets[name] + epsilon) / (current + epsilon))
        centred = values.sub_(mean) if in_place and values is tensor else values.sub(mean)
        out[name] = centred.mul_(scale).add_(mean).to(tensor.dtype)
    return out


def vca_merge(
    own: StateDict,
    received: Sequence[StateDict],
    *,
    beta: float = 0.5,
    epsilon: float = VCA_EPSILON,
) -> StateDict:
    """Variance-corrected averaging of ``own`` with the ``received`` models."""
    return correct_variance(mix(own, weighted_mean(received), beta), received, epsilon=epsilon)


Rule = Callable[[StateDict, Sequence[StateDict]], StateDict]  # see ``robust``


def merge_received(
    own: StateDict,
    received: Sequence[StateDict],
    *,
    rule: Rule,
    beta: float,
    variance_correction: bool,
) -> StateDict:
    """Gossip learning's merge: ``beta*own + (1-beta)*rule(received)``, then VCA if asked;
    ``own`` if nothing arrived."""
    if not received:
        return own
    merged = mix(own, rule(own, list(received)), beta)
    if variance_correction:
        merged = correct_variance(merged, list(received))
    return merged


def neighbourhood_mean(own: StateDict, received: Sequence[StateDict], *, rule: Rule) -> StateDict:
    """D-PSGD's merge: ``rule`` over the closed neighbourhood (own model included)."""
    return rule(own, [own, *received]) if received else own
