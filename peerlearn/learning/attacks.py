"""Attacks for experiments: data poisoning (label flip) and model poisoning.

Model-poisoning attacks are omniscient, as in the literature: they see the honest models
of the round (``honest``) and return the model a Byzantine node sends. ``ratchet`` makes a
model for each receiver: the receiver's own model plus a change along a fixed direction,
just under the bound the receiver will check it against (it knows that bound too).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from statistics import NormalDist

import torch

from peerlearn.errors import LocalProtocolError
from peerlearn.learning.aggregate import StateDict, is_averaged
from peerlearn.learning.choices import ATTACKS
from peerlearn.learning.data import NUM_CLASSES

GAUSSIAN_STD = 1.0
IPM_EPSILON = 0.1
SIGN_FLIP_SCALE = 1.0

ModelAttack = Callable[[StateDict, Sequence[StateDict], torch.Generator], StateDict]


def flip_labels(labels: torch.Tensor) -> torch.Tensor:
    """Bristle's LABEL_FLIP_ALL: y -> (y + 1) mod C."""
    return (labels + 1) % NUM_CLASSES


def _stats(honest: Sequence[StateDict], name: str) -> tuple[torch.Tensor, torch.Tensor]:
    stacked = torch.stack([h[name] for h in honest])
    return stacked.mean(0), stacked.std(0, unbiased=False)


def _map(own: StateDict, fn: Callable[[str, torch.Tensor], torch.Tensor]) -> StateDict:
    return {n: (fn(n, t) if is_averaged(n, t) else t.clone()) for n, t in own.items()}


def sign_flip(own: StateDict, honest: Sequence[StateDict], g: torch.Generator) -> StateDict:
    """The negated honest mean model."""
    return _map(own, lambda n, t: -SIGN_FLIP_SCALE * _stats(honest, n)[0])


def gaussian(own: StateDict, honest: Sequence[StateDict], g: torch.Generator) -> StateDict:
    """The honest mean plus N(0, GAUSSIAN_STD^2) noise."""
    return _map(
        own, lambda n, t: _stats(honest, n)[0] + GAUSSIAN_STD * torch.randn(t.shape, generator=g)
    )


def alie_z(nodes: int, byzantine: int) -> float:
    """z_max of "A little is enough" (Baruch et al. 2019)."""
    supporters = math.floor(nodes / 2 + 1) - byzantine
    return NormalDist().inv_cdf(max(min((nodes - supporters) / nodes, 0.999), 0.5))


def make_alie(nodes: int, byzantine: int) -> ModelAttack:
    z = alie_z(nodes, byzantine)

    def shifted(honest: Sequence[StateDict], name: str) -> torch.Tensor:
        mean, std = _stats(honest, name)
        return mean - z * std

    def alie(own: StateDict, honest: Sequence[StateDict], g: torch.Generator) -> StateDict:
        """mean - z * std, coordinate-wise over the honest models."""
        return _map(own, lambda n, t: shifted(honest, n))

    return alie


def ipm(own: StateDict, honest: Sequence[StateDict], g: torch.Generator) -> StateDict:
    """Inner-product manipulation: -epsilon times the honest mean."""
    return _map(own, lambda n, t: -IPM_EPSILON * _stats(honest, n)[0])


RATCHET_MARGIN = 0.99  # of the receiver's bound


def ratchet_direction(own: StateDict, g: torch.Generator) -> StateDict:
    """A random direction of unit norm over the averaged tensors (one per attacker)."""
    noise = _map(own, lambda n, t: torch.randn(t.shape, generator=g))
    norm = math.sqrt(sum(float((t**2).sum()) for n, t in noise.items() if is_averaged(n, t)))
    return _map(noise, lambda n, t: t / norm)


def ratchet(receiver: StateDict, bound: float, direction: StateDict) -> StateDict:
    """The receiver's own model plus ``direction`` scaled to just under ``bound``."""
    return _map(receiver, lambda n, t: t + RATCHET_MARGIN * bound * direction[n].to(t.dtype))


def model_attack(name: str, *, nodes: int, byzantine: int) -> ModelAttack | None:
    """The model-poisoning function for ``name`` (None for none, label-flip and the
    per-receiver ratchet)."""
    if name in ("none", "label-flip", "ratchet"):
        return None
    if name == "sign-flip":
        return sign_flip
    if name == "gaussian":
        return gaussian
    if name == "alie":
        return make_alie(nodes, byzantine)
    if name == "ipm":
        return ipm
    raise LocalProtocolError(f"unknown attack {name!r}; known: {', '.join(ATTACKS)}")
