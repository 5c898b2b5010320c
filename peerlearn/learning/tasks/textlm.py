"""``textlm``: a small transformer language model on text it generates, sized by an option.

The corpus is made on the spot from a seeded grammar (nothing is downloaded): short English
sentences about coloured animals, and arithmetic facts ("seven plus five is twelve"). Tokens
are characters. A node's shard is its own stream of sentences (IID across nodes); the test
set is one fixed stream every node shares, so metrics are comparable across the swarm.

Metrics: ``accuracy`` (next-character accuracy, the task's metric; a fresh model is near
1/vocabulary, a trained one well above 0.5) and ``loss`` (cross-entropy, nats per character).

Options (``--task-opt``):

* ``size_mb`` (default 1): float32 megabytes of parameters; the width follows from it (a
  multiple of 32), e.g. 1 MB -> width 96, 50 MB -> 736, 200 MB -> 1472 with 2 layers.
* ``layers`` (default 2), ``context`` (default 64 characters), ``lr`` (AdamW, default 3e-3).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from functools import cache

import torch

from peerlearn.learning.task import Task, TaskContext, TaskError, TaskOptions

ALPHABET = " abcdefghijklmnopqrstuvwxyz.,"
HEAD_WIDTH = 32
TEST_SEQUENCES = 32
_COLOURS = ["red", "blue", "green", "grey", "black", "white", "brown", "golden"]
_ANIMALS = ["fox", "dog", "cat", "owl", "horse", "mouse", "eagle", "whale", "bee"]
_VERBS = ["sees", "chases", "follows", "greets", "avoids", "feeds", "watches"]
_PLACES = ["in the field", "by the river", "near the barn", "under the tree", "at night"]
_NUMBERS = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
]  # fmt: skip


def sentence(rng: random.Random) -> str:
    """One sentence of the grammar."""
    if rng.random() < 0.4:
        a, b = rng.randrange(10), rng.randrange(9)
        return f"{_NUMBERS[a]} plus {_NUMBERS[b]} is {_NUMBERS[a + b]}."
    subject = f"the {rng.choice(_COLOURS)} {rng.choice(_ANIMALS)}"
    obj = f"the {rng.choice(_COLOURS)} {rng.choice(_ANIMALS)}"
    return f"{subject} {rng.choice(_VERBS)} {obj} {rng.choice(_PLACES)}."


def encode(text: str) -> torch.Tensor:
    return torch.tensor([ALPHABET.index(c) for c in text], dtype=torch.long)


class Sentences:
    """An endless, seeded stream of characters cut into training windows."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.buffer = torch.empty(0, dtype=torch.long)

    def batch(self, size: int, context: int) -> torch.Tensor:
        """``[size, context + 1]`` consecutive characters (inputs and next-character targets)."""
        need = size * (context + 1)
        while len(self.buffer) < need:
            more = " ".join(sentence(self.rng) for _ in range(64)) + " "
            self.buffer = torch.cat([self.buffer, encode(more)])
        out, self.buffer = self.buffer[:need], self.buffer[need:]
        return out.view(size, context + 1)


def width_for(size_mb: float, layers: int, context: int) -> int:
    """The model width (a multiple of 32) whose float32 parameters come closest to size_mb."""
    target = size_mb * 2**20 / 4
    vocab = len(ALPHABET)
    # parameters ~ layers * 12 d^2 + (2 * vocab + context) * d
    a, b = 12 * layers, 2 * vocab + context
    d = (-b + math.sqrt(b * b + 4 * a * target)) / (2 * a)
    return max(HEAD_WIDTH, round(d / HEAD_WIDTH) * HEAD_WIDTH)


class TinyLM(torch.nn.Module):
    """Token and position embeddings, pre-norm causal transformer blocks, a linear head."""

    def __init__(self, width: int, layers: int, context: int, generator: torch.Generator) -> None:
        super().__init__()
        vocab = len(ALPHABET)
        self.context = context
        # Built on the meta device and initialised from ``generator``: no draw from torch's
        # process-wide generator.
        self.tokens = torch.nn.Embedding(vocab, width, device="meta")
        self.positions = torch.nn.Embedding(context, width, device="meta")
        block = torch.nn.TransformerEncoderLayer(
            width,
            width // HEAD_WIDTH,
            4 * width,
            dropout=0.0,
            batch_first=True,
            norm_first=True,
            device="meta",
        )
        self.blocks = torch.nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = torch.nn.LayerNorm(width, device="meta")
        self.head = torch.nn.Linear(width, vocab, device="meta")
        self.to_empty(device="cpu")
        with torch.no_grad():
            for name, parameter in self.named_parameters():
                if parameter.dim() >= 2:
                    parameter.normal_(0.0, 0.02, generator=generator)
                elif (
                    name.endswith("norm1.weight")
                    or name.endswith("norm2.weight")
                    or name == "norm.weight"
                ):
                    parameter.fill_(1.0)
                else:
                    parameter.zero_()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        positions = torch.arange(length, device=tokens.device)
        x = self.tokens(tokens) + self.positions(positions)
        mask = torch.nn.Transformer.generate_square_subsequent_mask(length, device=tokens.device)
        x = self.blocks(x, mask=mask, is_causal=True)
        return self.head(self.norm(x))  # type: ignore[no-any-return]


SCORE_SEQUENCES = 16  # held-out sentences a node's contribution scores are measured on


@cache
def _test_set(data_seed: int, context: int) -> torch.Tensor:
    return Sentences(data_seed * 7 + 1).batch(TEST_SEQUENCES, context)


class TextLMTask(Task):
    """Next-character prediction on generated sentences."""

    metric = "accuracy"

    def __init__(self, context: TaskContext) -> None:
        options = TaskOptions("textlm", context.options)
        self.size_mb = options.float("size_mb", 1.0, minimum=0.01)
        self.layers = options.int("layers", 2)
        self.context_length = options.int("context", 64, minimum=2)
        self.lr = options.float("lr", 3e-3, minimum=0.0)
        options.finish()
        if context.partition != "iid" or context.poison_labels or context.bristle:
            raise TaskError("textlm shards are IID text: no label-skew, label flips or Bristle")
        self.training = context.training
        self.width = width_for(self.size_mb, self.layers, self.context_length)
        self.device = torch.device(context.device)
        # Every shard is its own stream; the data seed keeps shards apart across swarms.
        self.stream = Sentences(context.data_seed * 1_000_003 + context.shard * 2 + 2)
        self.test = _test_set(context.data_seed, self.context_length)
        # held out: sentences of our shard's kind that training never sees
        held_out = Sentences(context.data_seed * 1_000_003 + context.shard * 2 + 3)
        self.score_batch = held_out.batch(SCORE_SEQUENCES, self.context_length)

    def create_model(self, generator: torch.Generator) -> torch.nn.Module:
        return TinyLM(self.width, self.layers, self.context_length, generator)

    def create_optimizer(self, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)

    def default_lr(self) -> float:
        return self.lr

    def _loss(self, model: torch.nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, float]:
        batch = batch.to(self.device)
        logits = model(batch[:, :-1])
        targets = batch[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        accuracy = float((logits.argmax(-1) == targets).float().mean())
        return loss, accuracy

    def train_round(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer
    ) -> Mapping[str, float]:
        total = 0.0
        steps = self.training.local_steps
        for _ in range(steps):
            loss, _ = self._loss(
                model, self.stream.batch(self.training.batch_size, self.context_length)
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            total += float(loss.detach())
        return {"loss": total / max(steps, 1)}

    def contribution_loss(self, model: torch.nn.Module) -> float:
        """Next-character loss on ``SCORE_SEQUENCES`` held-out sentences of our shard."""
        with torch.no_grad():
            loss, _ = self._loss(model, self.score_batch)
        return float(loss)

    def evaluate(self, model: torch.nn.Module) -> Mapping[str, float]:
        with torch.no_grad():
            loss, accuracy = self._loss(model, self.test)
        return {"accuracy": accuracy, "loss": float(loss)}
