"""Datasets that ship with packages (scikit-learn's digits) and how to split them over nodes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from peerlearn.errors import LocalProtocolError

NUM_CLASSES = 10
TEST_FRACTION = 0.2
_SPLIT_SEED = 0  # the train/test split is the same for every experiment


@dataclass(frozen=True)
class Dataset:
    x: torch.Tensor  # float32 [n, features]
    y: torch.Tensor  # int64 [n]

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, index: np.ndarray) -> Dataset:
        idx = torch.as_tensor(index, dtype=torch.long)
        return Dataset(self.x[idx], self.y[idx])


def digits() -> tuple[Dataset, Dataset]:
    """The 1797 8x8 digit images (pixels scaled to [0, 1]) split 80/20 into train/test."""
    from sklearn.datasets import load_digits  # here: importing scikit-learn takes 1.2 s

    bunch = load_digits()
    x = torch.tensor(bunch.data / 16.0, dtype=torch.float32)
    y = torch.tensor(bunch.target, dtype=torch.long)
    order = np.random.default_rng(_SPLIT_SEED).permutation(len(y))
    cut = int(len(y) * (1 - TEST_FRACTION))
    full = Dataset(x, y)
    return full.subset(order[:cut]), full.subset(order[cut:])


def _with_minimum(
    parts: list[np.ndarray], pool: np.ndarray, minimum: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Top up partitions smaller than ``minimum`` with samples from ``pool`` (overlapping)."""
    return [
        part
        if len(part) >= minimum
        else np.concatenate([part, rng.choice(pool, minimum - len(part), replace=True)])
        for part in parts
    ]


def partition_iid(
    labels: np.ndarray, nodes: int, rng: np.random.Generator, minimum: int = 8
) -> list[np.ndarray]:
    """Shuffle and deal the samples round-robin; tiny shares are topped up with overlap."""
    order = rng.permutation(len(labels))
    return _with_minimum([order[i::nodes] for i in range(nodes)], order, minimum, rng)


def partition_label_skew(
    labels: np.ndarray,
    nodes: int,
    classes_per_node: int,
    rng: np.random.Generator,
    minimum: int = 8,
) -> list[np.ndarray]:
    """Node i holds ``classes_per_node`` consecutive classes starting at i mod C (as in Bristle)."""
    if not 1 <= classes_per_node <= NUM_CLASSES:
        raise LocalProtocolError(f"classes_per_node must be 1..{NUM_CLASSES}")
    owners: dict[int, list[int]] = {c: [] for c in range(NUM_CLASSES)}
    for node in range(nodes):
        for k in range(classes_per_node):
            owners[(node + k) % NUM_CLASSES].append(node)
    parts: list[list[int]] = [[] for _ in range(nodes)]
    for c, holders in owners.items():
        if not holders:
            continue
        members = rng.permutation(np.flatnonzero(labels == c))
        for j, sample in enumerate(members):
            parts[holders[j % len(holders)]].append(int(sample))
    out = []
    for node, part in enumerate(parts):
        own_classes = [(node + k) % NUM_CLASSES for k in range(classes_per_node)]
        pool = np.flatnonzero(np.isin(labels, own_classes))
        out.append(np.array(part, dtype=np.int64) if part else pool[:0])
        out[-1] = _with_minimum([out[-1]], pool, minimum, rng)[0]
    return out


def partition_dirichlet(
    labels: np.ndarray, nodes: int, alpha: float, rng: np.random.Generator, minimum: int = 8
) -> list[np.ndarray]:
    """Per class, split its samples over nodes with proportions ~ Dirichlet(alpha)."""
    parts: list[list[int]] = [[] for _ in range(nodes)]
    for c in range(NUM_CLASSES):
        members = rng.permutation(np.flatnonzero(labels == c))
        shares = rng.dirichlet(np.full(nodes, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
        for node, chunk in enumerate(np.split(members, cuts)):
            parts[node].extend(int(s) for s in chunk)
    pool = np.arange(len(labels))
    return _with_minimum([np.array(p, dtype=np.int64) for p in parts], pool, minimum, rng)


def classes_present(labels: torch.Tensor) -> list[int]:
    return sorted(int(c) for c in torch.unique(labels))
