"""``digits``: scikit-learn's 1797 8x8 digit images (shipped with the package), two small models.

* ``model=mlp`` (the default): 64 -> hidden -> 10 with ReLU, Xavier-initialised weights, zero
  biases; every tensor is exchanged.
* ``model=transfer`` (the default when Bristle filters): a frozen feature extractor shared by
  the whole swarm (a fixed random ReLU projection seeded by ``FEATURE_SEED``, not part of the
  state_dict) and an output layer without bias, zero-initialised, as Bristle requires; only
  ``out.weight`` is trained and exchanged.

Options (``--task-opt``): ``model`` (mlp, transfer), ``hidden`` (units or features).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache

import numpy as np
import torch

from peerlearn.learning import attacks, bristle, data
from peerlearn.learning.data import NUM_CLASSES, Dataset
from peerlearn.learning.task import Task, TaskContext, TaskError, TaskOptions

FEATURE_SEED = 20211021  # fixed: every node must have the same frozen extractor
INPUT_FEATURES = 64
OUTPUT_LAYER = "out.weight"
SCORE_BATCH = 64  # samples of a node's shard its contribution scores are measured on
SCORE_SEED_OFFSET = 424_242  # their draw has a generator of its own


@cache
def _frozen_extractor(width: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(FEATURE_SEED)
    projection = torch.randn(width, INPUT_FEATURES, generator=generator) / 8
    bias = torch.randn(width, generator=generator) * 0.5
    return projection, bias


class DigitsNet(torch.nn.Module):
    """``mlp`` or ``transfer``; ``features`` then ``head`` is ``forward``."""

    projection: torch.Tensor
    projection_bias: torch.Tensor

    def __init__(self, kind: str, hidden: int, generator: torch.Generator) -> None:
        super().__init__()
        self.kind = kind
        # Built on the meta device, then initialised from ``generator``: constructing the
        # layers must not draw from (and so change) torch's process-wide generator.
        if kind == "transfer":
            projection, bias = _frozen_extractor(hidden)
            self.out = torch.nn.Linear(hidden, NUM_CLASSES, bias=False, device="meta")
            self.to_empty(device="cpu")
            self.register_buffer("projection", projection, persistent=False)
            self.register_buffer("projection_bias", bias, persistent=False)
            with torch.no_grad():
                self.out.weight.zero_()
            return
        self.fc1 = torch.nn.Linear(INPUT_FEATURES, hidden, device="meta")
        self.fc2 = torch.nn.Linear(hidden, NUM_CLASSES, device="meta")
        self.to_empty(device="cpu")
        with torch.no_grad():
            for layer in (self.fc1, self.fc2):
                bound = (6.0 / sum(layer.weight.shape)) ** 0.5
                layer.weight.uniform_(-bound, bound, generator=generator)
                layer.bias.zero_()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """What the trainable part sees (the frozen extractor's output for ``transfer``)."""
        if self.kind != "transfer":
            return x
        return torch.relu(x @ self.projection.T + self.projection_bias)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        if self.kind == "transfer":
            return self.out(features)  # type: ignore[no-any-return]
        return self.fc2(torch.relu(self.fc1(features)))  # type: ignore[no-any-return]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@cache
def _digits() -> tuple[Dataset, Dataset]:
    return data.digits()


def shard_indices(labels: np.ndarray, context: TaskContext, rng: np.random.Generator) -> np.ndarray:
    """This node's sample indices: ``context.shard`` of ``context.shards`` cut as asked."""
    if context.partition == "iid":
        parts = data.partition_iid(labels, context.shards, rng)
    elif context.partition == "label-skew":
        parts = data.partition_label_skew(labels, context.shards, context.classes_per_node, rng)
    elif context.partition == "dirichlet":
        parts = data.partition_dirichlet(labels, context.shards, context.dirichlet_alpha, rng)
    else:
        raise TaskError(f"digits cannot cut shards by {context.partition!r}")
    return parts[context.shard]


class DigitsTask(Task):
    """Digit classification on this node's shard; evaluated on the shared 20% test split."""

    metric = "accuracy"

    def __init__(self, context: TaskContext) -> None:
        options = TaskOptions("digits", context.options)
        default_kind = "transfer" if context.bristle else "mlp"
        self.kind = options.choice("model", default_kind, ("mlp", "transfer"))
        self.hidden = options.int("hidden", 256 if self.kind == "transfer" else 32)
        options.finish()
        if context.bristle and self.kind != "transfer":
            raise TaskError("Bristle needs the digits transfer model (model=transfer)")
        self.context = context
        self.training = context.training
        train, test = _digits()
        rng = np.random.default_rng(context.data_seed)
        local = train.subset(shard_indices(train.y.numpy(), context, rng))
        net = DigitsNet(self.kind, self.hidden, torch.Generator())
        with torch.no_grad():  # the frozen extractor runs once, not at every step
            self.test = Dataset(net.features(test.x), test.y)
            local = Dataset(net.features(local.x), local.y)
        self.familiar = data.classes_present(local.y)
        self.bristle_test: Dataset | None = None
        if context.bristle:
            self.bristle_test, local = bristle.split_local_test(local, rng)
        if context.poison_labels:
            local = Dataset(local.x, attacks.flip_labels(local.y))
        self.train = local
        self.generator = torch.Generator().manual_seed(context.seed)
        scored = torch.Generator().manual_seed(context.seed + SCORE_SEED_OFFSET)
        self.score_batch = local.subset(
            torch.randint(0, len(local), (SCORE_BATCH,), generator=scored).numpy()
        )

    def create_model(self, generator: torch.Generator) -> torch.nn.Module:
        return DigitsNet(self.kind, self.hidden, generator)

    def default_lr(self) -> float:
        return 0.5 if self.kind == "transfer" else 0.1

    def exchanged(self, model: torch.nn.Module) -> list[str] | None:
        return [OUTPUT_LAYER] if self.kind == "transfer" else None

    def train_round(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer
    ) -> Mapping[str, float]:
        assert isinstance(model, DigitsNet)
        steps, batch = self.training.local_steps, min(self.training.batch_size, len(self.train))
        total = 0.0
        for _ in range(steps):
            index = torch.randint(0, len(self.train), (batch,), generator=self.generator)
            loss = torch.nn.functional.cross_entropy(
                model.head(self.train.x[index]), self.train.y[index]
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            total += float(loss.detach())
        return {"loss": total / max(steps, 1)}

    def contribution_loss(self, model: torch.nn.Module) -> float:
        """Cross-entropy on ``SCORE_BATCH`` samples of our shard (drawn once; they are
        also trained on: the shard is too small to set them aside)."""
        assert isinstance(model, DigitsNet)
        with torch.no_grad():
            logits = model.head(self.score_batch.x)
            return float(torch.nn.functional.cross_entropy(logits, self.score_batch.y))

    def evaluate(self, model: torch.nn.Module) -> Mapping[str, float]:
        assert isinstance(model, DigitsNet)
        with torch.no_grad():
            predicted = model.head(self.test.x).argmax(dim=1)
        return {"accuracy": float((predicted == self.test.y).float().mean())}

    def bristle_view(self) -> bristle.BristleView:
        """What Bristle needs: the exchanged output layer, a local test set, our classes."""
        if self.bristle_test is None:
            raise TaskError("this digits task was not built for Bristle")
        test = self.bristle_test

        def predict(layer: torch.Tensor) -> torch.Tensor:
            return (test.x @ layer.T).argmax(dim=1)

        return bristle.BristleView(OUTPUT_LAYER, predict, test.y, self.familiar)

    @property
    def train_samples(self) -> int:
        return len(self.train)
