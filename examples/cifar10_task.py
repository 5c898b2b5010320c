"""Your own data set as a peerlearn task: CIFAR-10 and a small CNN, in one file.

Run it in a swarm (``examples/`` on the Python path; torchvision only to download once)::

    pip install torchvision
    PYTHONPATH=examples peerlearn node start --swarm cifar --algo modest \
        --task cifar10_task:CifarTask --task-opt root=~/data --task-opt download=1

or in the simulator: ``PYTHONPATH=examples peerlearn sim run --task cifar10_task:CifarTask
--task-opt root=~/data --nodes 8``. Options: ``root`` (the folder holding
``cifar-10-batches-py``), ``download`` (1: fetch it with torchvision when missing).

A node trains on shard ``context.shard`` of ``context.shards`` (an IID cut every node
computes alike from ``context.data_seed``) and reports test accuracy.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from peerlearn import Task, TaskContext, TaskError, TaskOptions

FOLDER = "cifar-10-batches-py"


def load_batches(folder: Path, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as float [n, 3, 32, 32] in [0, 1] and labels, from CIFAR-10's python batches
    (pickled dicts, as the data set's authors ship them: load only files you downloaded)."""
    images, labels = [], []
    for name in names:
        with (folder / name).open("rb") as f:
            batch = pickle.load(f, encoding="bytes")
        images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(batch[b"labels"])
    x = torch.from_numpy(np.concatenate(images)).float() / 255.0
    return x, torch.tensor(labels, dtype=torch.long)


class SmallCNN(torch.nn.Sequential):
    def __init__(self) -> None:
        super().__init__(
            torch.nn.Conv2d(3, 32, 3),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(32, 64, 3),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
            torch.nn.Flatten(),
            torch.nn.Linear(64 * 6 * 6, 128),
            torch.nn.ReLU(),
            torch.nn.Linear(128, 10),
        )


class CifarTask(Task):
    metric = "accuracy"

    def __init__(self, context: TaskContext) -> None:
        options = TaskOptions("cifar10", context.options)
        root = Path(options.text("root", "~/.peerlearn/data")).expanduser()
        download = options.choice("download", "0", ["0", "1"]) == "1"
        options.finish()
        folder = root / FOLDER
        if not folder.is_dir():
            if not download:
                raise TaskError(
                    f"no CIFAR-10 in {folder}: add --task-opt download=1 (needs torchvision)"
                )
            import torchvision  # type: ignore[import-not-found]

            torchvision.datasets.CIFAR10(str(root), download=True)
        x, y = load_batches(folder, [f"data_batch_{i}" for i in range(1, 6)])
        order = np.random.default_rng(context.data_seed).permutation(len(y))
        mine = torch.as_tensor(order[context.shard :: context.shards])
        self.x, self.y = x[mine], y[mine]
        self.test_x, self.test_y = load_batches(folder, ["test_batch"])
        self.device = torch.device(context.device)
        self.training = context.training
        self.generator = torch.Generator().manual_seed(context.seed)

    def create_model(self, generator: torch.Generator) -> torch.nn.Module:
        # Initial weights from `generator` (MoDeST starts every node from the same model);
        # fork_rng keeps torch's global generator as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(generator.initial_seed())
            return SmallCNN()

    def create_optimizer(self, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)

    def default_lr(self) -> float:
        return 0.01

    def train_round(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer
    ) -> Mapping[str, float]:
        total = 0.0
        for _ in range(self.training.local_steps):
            size = min(self.training.batch_size, len(self.y))
            index = torch.randint(0, len(self.y), (size,), generator=self.generator)
            x, y = self.x[index].to(self.device), self.y[index].to(self.device)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            total += float(loss.detach())
        return {"loss": total / max(self.training.local_steps, 1)}

    def evaluate(self, model: torch.nn.Module) -> Mapping[str, float]:
        correct = 0
        for start in range(0, len(self.test_y), 1000):
            x = self.test_x[start : start + 1000].to(self.device)
            predicted = model(x).argmax(dim=1).cpu()
            correct += int((predicted == self.test_y[start : start + 1000]).sum())
        return {"accuracy": correct / len(self.test_y)}

    @property
    def train_samples(self) -> int:
        return len(self.y)
