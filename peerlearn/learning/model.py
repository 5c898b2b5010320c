"""Small models as plain state_dicts plus a pure forward function, and SGD/evaluation helpers.

Two kinds:

* ``mlp``: 64 -> hidden -> 10 with ReLU, Xavier-initialised weights, zero biases.
* ``transfer``: a frozen feature extractor shared by the whole swarm (a fixed random ReLU
  projection seeded by ``FEATURE_SEED``) and an exchanged output layer without bias, zero
  initialised, as Bristle requires. Only ``out.weight`` is ever trained or exchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from peerlearn.learning.data import NUM_CLASSES, Dataset

StateDict = dict[str, torch.Tensor]
FEATURE_SEED = 20211021  # fixed: every node must have the same frozen extractor
INPUT_FEATURES = 64


@dataclass(frozen=True)
class ModelSpec:
    kind: str = "mlp"  # "mlp" or "transfer"
    hidden: int = 32  # mlp hidden units, or transfer features

    def init(self, generator: torch.Generator) -> StateDict:
        """A fresh, independently initialised model (Xavier for mlp, zeros for transfer)."""
        if self.kind == "transfer":
            return {"out.weight": torch.zeros(NUM_CLASSES, self.hidden)}
        w1 = torch.empty(self.hidden, INPUT_FEATURES)
        w2 = torch.empty(NUM_CLASSES, self.hidden)
        for w in (w1, w2):
            bound = (6.0 / sum(w.shape)) ** 0.5
            w.uniform_(-bound, bound, generator=generator)
        return {
            "fc1.weight": w1,
            "fc1.bias": torch.zeros(self.hidden),
            "fc2.weight": w2,
            "fc2.bias": torch.zeros(NUM_CLASSES),
        }

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Inputs the trainable part sees (the frozen extractor's output for ``transfer``)."""
        if self.kind != "transfer":
            return x
        projection, bias = _frozen_extractor(self.hidden)
        return torch.relu(x @ projection.T + bias)

    def logits(self, state: StateDict, features: torch.Tensor) -> torch.Tensor:
        if self.kind == "transfer":
            return features @ state["out.weight"].T
        hidden = torch.relu(features @ state["fc1.weight"].T + state["fc1.bias"])
        return hidden @ state["fc2.weight"].T + state["fc2.bias"]


_EXTRACTORS: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def _frozen_extractor(width: int) -> tuple[torch.Tensor, torch.Tensor]:
    if width not in _EXTRACTORS:
        generator = torch.Generator().manual_seed(FEATURE_SEED)
        projection = torch.randn(width, INPUT_FEATURES, generator=generator) / 8
        bias = torch.randn(width, generator=generator) * 0.5
        _EXTRACTORS[width] = (projection, bias)
    return _EXTRACTORS[width]


def featurize(spec: ModelSpec, data: Dataset) -> Dataset:
    """Apply the frozen extractor once, so training and evaluation skip it."""
    return Dataset(spec.features(data.x), data.y)


def sgd(
    spec: ModelSpec,
    state: StateDict,
    data: Dataset,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    generator: torch.Generator,
) -> StateDict:
    """``steps`` mini-batch SGD steps on featurized ``data``; returns a new state_dict."""
    params = {name: t.detach().clone().requires_grad_(True) for name, t in state.items()}
    order = list(params)
    for _ in range(steps):
        index = torch.randint(0, len(data), (min(batch_size, len(data)),), generator=generator)
        loss = torch.nn.functional.cross_entropy(spec.logits(params, data.x[index]), data.y[index])
        grads = torch.autograd.grad(loss, [params[n] for n in order])
        with torch.no_grad():
            for name, grad in zip(order, grads, strict=True):
                params[name] -= lr * grad
    return {name: t.detach() for name, t in params.items()}


def accuracy(spec: ModelSpec, state: StateDict, data: Dataset) -> float:
    with torch.no_grad():
        predictions = spec.logits(state, data.x).argmax(dim=1)
    return float((predictions == data.y).float().mean())


def predictions(spec: ModelSpec, state: StateDict, data: Dataset) -> torch.Tensor:
    with torch.no_grad():
        return spec.logits(state, data.x).argmax(dim=1)
