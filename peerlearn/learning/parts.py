"""A model cut into the parts of a butterfly all-reduce, and put back together.

The averaged tensors (``aggregate.is_averaged``) of each dtype lie end to end, in the
model's order, in one flat vector per dtype, named by the dtype ("float32"). Part i of n is
the i-th contiguous slice of every vector (``butterfly.part_bounds``): a small state_dict of
views, so cutting copies nothing beyond the one flat copy of the model.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from peerlearn.gossip.butterfly import part_bounds
from peerlearn.learning.aggregate import (
    StateDict,
    is_averaged,
    is_variance_corrected,
    population_variance,
)

Vectors = dict[str, torch.Tensor]  # dtype name -> flat vector of that dtype's averaged tensors


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def flat_vectors(model: Mapping[str, torch.Tensor]) -> Vectors:
    """One flat copy of the averaged tensors, one vector per dtype."""
    by_dtype: dict[str, list[torch.Tensor]] = {}
    for name, tensor in model.items():
        if is_averaged(name, tensor):
            by_dtype.setdefault(_dtype_name(tensor.dtype), []).append(tensor.detach().reshape(-1))
    return {key: torch.cat(tensors) for key, tensors in by_dtype.items()}


def cut(vectors: Vectors, index: int, count: int) -> Vectors:
    """Part ``index`` of ``count``: views into ``vectors``."""
    out = {}
    for key, vector in vectors.items():
        start, end = part_bounds(vector.numel(), count)[index]
        out[key] = vector[start:end]
    return out


def rebuild(vectors: Vectors, like: Mapping[str, torch.Tensor]) -> StateDict:
    """A state_dict laid out as ``like``: averaged tensors from ``vectors``, the others
    (integer buffers, BN running statistics) copied from ``like``."""
    offsets = dict.fromkeys(vectors, 0)
    out: StateDict = {}
    for name, tensor in like.items():
        if not is_averaged(name, tensor):
            out[name] = tensor.clone()
            continue
        key = _dtype_name(tensor.dtype)
        start = offsets[key]
        offsets[key] = start + tensor.numel()
        out[name] = vectors[key][start : offsets[key]].view(tensor.shape)
    return out


def variances(model: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Float64 vector of the element variance of each tensor VCA rescales, in model order."""
    return torch.tensor(
        [population_variance(t) for n, t in model.items() if is_variance_corrected(n, t)],
        dtype=torch.float64,
    )
