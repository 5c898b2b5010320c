"""Checks every received model passes before it is merged (the daemon, the embedding API's
``merge`` and the simulator run the same ones):

* the same layout as ours: tensor names, shapes and dtypes;
* every value finite (one NaN from one peer used to spread to every node of the swarm);
* an update norm within a bound: ``||received - own|| <= ratio * (||own|| + sqrt(n))`` over
  the averaged tensors, ``n`` being their number of elements. ``sqrt(n)`` is the norm of an
  all-ones model, so the bound allows any reasonable model (independently initialised
  ones included) and refuses the absurdly scaled ones robust rules cannot bound either.

Failures are ``RemoteProtocolError`` with ``Offence.BAD_MODEL``: the sender is scored.

That bound is relative to our own model, so a peer can move it: a member that sent our
model plus a change just under it, round after round, was merged 25 times in a row while
the bound grew from 616 to 5e19. ``UpdateBound`` adds a bound no one sender can steer: the
median of the distances of the latest models of *other* recent senders, times ``clip``.
A model farther away than that is not refused (an honest newcomer's model may be far) but
scaled back toward ours to that distance before any merge (centered clipping), so one
sender moves our model by a bounded step per round whatever it sends.
"""

from __future__ import annotations

import math
import statistics
from collections import OrderedDict
from collections.abc import Hashable, Mapping
from dataclasses import dataclass

import torch

from peerlearn.errors import Offence, RemoteProtocolError
from peerlearn.learning.aggregate import flat_chunks, is_averaged
from peerlearn.learning.choices import SHARED_START

DEFAULT_MAX_UPDATE_RATIO = 10.0
DEFAULT_CLIP_RATIO = 1.0  # times the median distance of other senders' models
REFERENCE_SENDERS = 2  # other senders whose distances the relative bound needs
TRACKED_SENDERS = 32  # senders whose latest distance is kept (the least recent go first)


def check_layout(
    received: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]
) -> None:
    """Names, shapes and dtypes as in ``reference``."""
    if received.keys() != reference.keys():
        missing = sorted(set(reference) - set(received))[:3]
        extra = sorted(set(received) - set(reference))[:3]
        raise RemoteProtocolError(
            f"model layout differs: missing {missing}, unexpected {extra}", Offence.BAD_MODEL
        )
    for name, tensor in received.items():
        ref = reference[name]
        if tensor.shape != ref.shape or tensor.dtype != ref.dtype:
            raise RemoteProtocolError(
                f"{name}: got {tuple(tensor.shape)} {tensor.dtype}, "
                f"expected {tuple(ref.shape)} {ref.dtype}",
                Offence.BAD_MODEL,
            )


def check_finite(model: Mapping[str, torch.Tensor]) -> None:
    for name, tensor in model.items():
        # A sum is finite only if every value is: one pass, no mask (15x faster than
        # isfinite().all()); a huge but finite model falls through to the exact test.
        if (
            tensor.is_floating_point()
            and not bool(torch.isfinite(tensor.sum(dtype=_norm_dtype(tensor))))
            and not bool(torch.isfinite(tensor).all())
        ):
            raise RemoteProtocolError(f"{name} holds NaN or infinite values", Offence.BAD_MODEL)


def _norm_dtype(tensor: torch.Tensor) -> torch.dtype:
    """Half precision sums and norms in float32; float32 and float64 in their own."""
    return torch.float32 if tensor.element_size() < 4 else tensor.dtype


def _norm(tensor: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(tensor.detach(), dtype=_norm_dtype(tensor)))


def update_norm_bound(reference: Mapping[str, torch.Tensor], ratio: float) -> float:
    own = 0.0
    count = 0
    for name, tensor in reference.items():
        if is_averaged(name, tensor):
            own += _norm(tensor) ** 2
            count += tensor.numel()
    return ratio * (math.sqrt(own) + math.sqrt(count))


def update_distance(
    received: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]
) -> float:
    """``||received - reference||`` over the averaged tensors, a chunk at a time."""
    squared = 0.0
    for name, tensor in reference.items():
        if is_averaged(name, tensor):
            dtype = _norm_dtype(tensor)  # half precision could overflow to inf
            for theirs, ours in zip(flat_chunks(received[name]), flat_chunks(tensor), strict=True):
                squared += _norm(theirs.to(dtype) - ours.to(dtype)) ** 2
    return math.sqrt(squared)


def check_update_norm(
    received: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], ratio: float
) -> float:
    """``||received - reference||`` (returned) within the bound (``ratio`` <= 0: none)."""
    distance = update_distance(received, reference)
    if ratio <= 0:
        return distance
    bound = update_norm_bound(reference, ratio)
    if distance > bound:
        raise RemoteProtocolError(
            f"update norm {distance:.3g} exceeds the bound {bound:.3g}", Offence.BAD_MODEL
        )
    return distance


def check_received(
    received: Mapping[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor],
    *,
    max_update_ratio: float = DEFAULT_MAX_UPDATE_RATIO,
) -> float:
    """All three checks, cheapest first; ``RemoteProtocolError`` (bad model) if one fails.
    Returns the update's norm (its distance to ``reference``)."""
    check_layout(received, reference)
    check_finite(received)
    return check_update_norm(received, reference, max_update_ratio)


def clip_update(
    received: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], scale: float
) -> dict[str, torch.Tensor]:
    """``reference + scale * (received - reference)`` over the averaged tensors (a new
    model; ``received`` may be shared)."""
    out = dict(received)
    for name, tensor in reference.items():
        if is_averaged(name, tensor):
            dtype = _norm_dtype(tensor)
            change = received[name].to(dtype) - tensor.to(dtype)
            out[name] = (tensor.to(dtype) + change * scale).to(tensor.dtype)
    return out


@dataclass(frozen=True)
class Admitted:
    """A received model as it may be merged: clipped to ``limit`` if it was farther."""

    model: dict[str, torch.Tensor]
    distance: float  # from our model, as received
    clipped: bool


def admit_received(
    received: Mapping[str, torch.Tensor],
    own: Mapping[str, torch.Tensor],
    *,
    max_update_ratio: float,
    limit: float | None,
) -> Admitted:
    """``check_received``, then the model scaled back to ``limit`` (``UpdateBound``'s for
    its sender; None: no limit yet) if it lies farther from ``own``. Pure: safe in a
    worker thread."""
    distance = check_received(received, own, max_update_ratio=max_update_ratio)
    if limit is not None and distance > limit:
        return Admitted(clip_update(received, own, limit / distance), distance, True)
    return Admitted(dict(received), distance, False)


class UpdateBound:
    """One node's bound on how far a received model may lie from its own: ``clip`` times
    the median of the latest distances of the other recent senders (at least
    ``REFERENCE_SENDERS`` of them), so no one sender sets its own bound; distances are
    recorded after clipping, so what one sender sent weighs at most ``clip`` times the
    others' in anyone's later bound. With ``clip`` 0 there is no relative bound."""

    def __init__(
        self, max_update_ratio: float = DEFAULT_MAX_UPDATE_RATIO, clip: float = DEFAULT_CLIP_RATIO
    ) -> None:
        self.max_update_ratio = max_update_ratio
        self.clip = clip
        self._distances: OrderedDict[Hashable, float] = OrderedDict()
        self.clipped = 0

    def limit_for(self, sender: Hashable) -> float | None:
        """How far ``sender``'s next model may lie from ours (None: no relative bound yet)."""
        if self.clip <= 0:
            return None
        others = [d for s, d in self._distances.items() if s != sender]
        if len(others) < REFERENCE_SENDERS:
            return None
        return self.clip * statistics.median(others)

    def record(self, sender: Hashable, admitted: Admitted, limit: float | None) -> None:
        """Remember ``sender``'s latest distance (as clipped)."""
        self.clipped += admitted.clipped
        distance = admitted.distance if limit is None else min(admitted.distance, limit)
        self._distances.pop(sender, None)
        self._distances[sender] = distance
        while len(self._distances) > TRACKED_SENDERS:
            self._distances.popitem(last=False)

    def admit(
        self,
        sender: Hashable,
        received: Mapping[str, torch.Tensor],
        own: Mapping[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """``admit_received`` with ``sender``'s limit, recorded (single-threaded callers)."""
        limit = self.limit_for(sender)
        admitted = admit_received(
            received, own, max_update_ratio=self.max_update_ratio, limit=limit
        )
        self.record(sender, admitted, limit)
        return admitted.model

    @classmethod
    def for_merge(
        cls, algo: str, filter_: str, max_update_ratio: float, clip: float
    ) -> UpdateBound:
        """The bound a node running ``algo`` with robust rule ``filter_`` applies. Clipping
        serves merges that mix received models into ours (gossip, D-PSGD). Not Bristle's:
        it weighs each class of each model by how it does on our data, and a clipped model
        loses exactly what Bristle takes from it (the rows of classes we do not hold). Nor
        where all nodes share a start and adopt the round's aggregate (MoDeST, FedAvg):
        a node's own model there is the round it last saw, not a reference for the next
        one (clipping to it cost MoDeST 5 pp). These get the absolute bound only."""
        mixes = algo not in SHARED_START and filter_ != "bristle"
        return cls(max_update_ratio, clip if mixes else 0.0)

    def status(self) -> dict[str, float | int | None]:
        distances = list(self._distances.values())
        return {
            "updates_clipped": self.clipped,
            "median_distance": statistics.median(distances) if distances else None,
        }
